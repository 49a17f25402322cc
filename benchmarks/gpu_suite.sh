#!/usr/bin/env bash
# The whole GPU check in one call, for a lent H100/H200 (a few minutes): versions, build for
# sm_90, the CUDA tests, the per-op and training-step benchmarks at GPU sizes, a profile of the
# training step, a Markdown table.
# Results go to benchmarks/results/<card>-<date>-<bench>.json and <card>-<date>.md; when OUT is
# set, each JSON also goes to $OUT as soon as it is written (a run cut short still returns what it
# measured; the .md is made from the JSON by benchmarks/report.py).
# Stops at the first failure with its error in the last lines, unless --keep-going. A benchmark file
# with a failing row still publishes the rows it measured before the failure is recorded.
#
#   bash benchmarks/gpu_suite.sh                 # on the GPU machine: every part
#   bash benchmarks/gpu_suite.sh --keep-going    # a failed step is reported and the rest still run
#                                                # (a failed CUDA build falls back to the CPU-only
#                                                # build, so the Triton kernels are still measured)
#   bash benchmarks/gpu_suite.sh --dry-run       # on a CPU: same steps, CPU-only build, tiny sizes, each
#                                                # benchmark's CUDA configuration (dtypes, autocast:
#                                                # pytest --cuda-config), results to a temporary folder,
#                                                # and a check that a failing row loses no results (CI)
#   bash benchmarks/gpu_suite.sh --part step,momentum
#                                                # parts, comma-separated (the ceilings always run):
#       step      the CUDA tests, the training step (eager reference, eager fused, graphed, compiled +
#                 graphed: samples/s, MFU, peak memory, paired ratios), its profile and per-op
#                 ablation (about 8 minutes on an H200, estimated, not yet timed)
#       momentum  momentum_itc_loss against ALBEF's queue path, and its CUDA tests
#       retrieval re-ranking against ALBEF's loop, a COCO-5k-sized evaluation end to end (ALBEF's loop
#                 on a subset, scaled), and the CUDA tests of indexed_attention and retrieval
#                 (estimated 4 minutes on an H200, not yet timed)
#       ops       the other per-op files and the data loader's (no tests)
#   Parts never yet run on a card: docs/benchmarks.md, "The GPU suite".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
dry_run=0 keep_going=0 parts=step,momentum,retrieval,ops
while (( $# )); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --keep-going) keep_going=1 ;;
        --part) parts=${2:-}; shift ;;
        *) echo "gpu_suite.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[[ $parts == all ]] && parts=step,momentum,retrieval,ops
for part in ${parts//,/ }; do
    [[ $part == step || $part == momentum || $part == retrieval || $part == ops ]] \
        || { echo "gpu_suite.sh: --part takes step, momentum, retrieval, ops (comma-separated) or all, got '$parts'" >&2
             exit 2; }
done
wants() { [[ ",$parts," == *",$1,"* ]]; }
# The dry run takes each benchmark's CUDA configuration on the CPU (benchmarks/timing.py reads it;
# the profile script too)
[[ $dry_run == 1 ]] && export VLFAST_BENCH_CUDA_CONFIG=1
python=${PYTHON:-python3}
failed=()

step() { echo; echo "=== $* ($(date -u +%T))"; }
fail() {  # fail STEP: record it; stop unless --keep-going
    failed+=("$1")
    echo "!!! FAILED: $1"
    [[ $keep_going == 1 ]] || exit 1
}
publish() {  # publish FILE...: copy to $OUT when set (a lent GPU's results come back from there)
    [[ -z "${OUT:-}" ]] || cp "$@" "$OUT/" || echo "!!! could not copy $* to $OUT"
}

step "machine"
$python - <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
PY
[[ $? == 0 ]] || { echo "!!! torch does not import: nothing else can run"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || true
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
card=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')") \
    || { echo "!!! could not name the device"; exit 1; }

step "build"
build() {  # build CUDA_SWITCH: 0 = C++ CPU kernels only, 1 = with the CUDA kernels for sm_90
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" VLFAST_BUILD_CUDA=$1 MAX_JOBS=$(nproc) \
        $python setup.py build_ext --inplace > /tmp/vlfast-build.log 2>&1 || { tail -40 /tmp/vlfast-build.log; return 1; }
}
if [[ $dry_run == 1 ]]; then
    build 0 || fail build
elif ! build 1; then
    fail "CUDA build"
    step "build without the CUDA kernels (Triton kernels and the C++ CPU kernels only)"
    build 0 || { fail build; exit 1; }
fi
$python -m vlfast || fail "import"

# pytest-xdist, when installed, spreads the CUDA tests (mostly Triton compiles, CPU-bound) over
# the cores; pytest-timeout, when installed, ends a hung test or benchmark so the rest still run.
parallel=() per_test_limit=()
$python -c "import xdist" 2>/dev/null && parallel=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))")
$python -c "import pytest_timeout" 2>/dev/null && per_test_limit=(--timeout=180)
cuda_tests=()
if wants step; then
    cuda_tests=(tests)
else
    wants momentum && cuda_tests+=(tests/test_momentum_contrastive.py)
    wants retrieval && cuda_tests+=(tests/test_indexed_attention.py tests/test_fusion_cache.py tests/test_retrieve.py)
fi
if (( ${#cuda_tests[@]} )); then
    step "CUDA tests (${cuda_tests[*]})"  # on a CPU every cuda test skips: the step still proves collection and markers work
    $python -m pytest -q -m cuda -p no:cacheprovider -rfE --tb=short "${parallel[@]}" "${per_test_limit[@]}" \
        "${cuda_tests[@]}" || fail "CUDA tests"
fi

step "benchmarks"
name="$card-$(date -u +%F)"
if [[ $dry_run == 1 ]]; then
    results=$(mktemp -d)
    selection="cpu and not vit_b16 and not bert_base and not 256 and not compiled"  # compiling: minutes on a CPU
    timing=(--benchmark-max-time=0.01 --benchmark-min-rounds=1 --benchmark-warmup=off --cuda-config)
else
    results=benchmarks/results
    selection=cuda
    timing=(--benchmark-max-time=0.25 --benchmark-min-rounds=5)
fi
# One JSON per pytest run, each kept (and published) as soon as it is written (pytest-benchmark
# writes at the end of a run), so a run cut short or a failed file still leaves the others.
# Order by what a lease most needs: the ceilings (the MFU and roofline of every later row), the
# training step's paired ratios (the target), its single-path rows (MFU, memory), its profile and
# ablation, then the per-op files.
run_bench() {  # run_bench FILE [OUTPUT SELECTION]: benchmarks/bench_FILE.py into $results/$name-OUTPUT.json
    run_bench_file "benchmarks/bench_$1.py" "${2:-$1}" "${3:-}"
}
run_bench_file() {  # run_bench_file PATH OUTPUT SELECTION: what ran is published, then a failure recorded
    local json="$results/$name-$2.json" select="$selection${3:+ and ($3)}" status=0
    $python -m pytest -q -p no:cacheprovider "$1" --benchmark-enable "${timing[@]}" \
        -k "$select" "${per_test_limit[@]}" --benchmark-json="$json" --benchmark-columns=median,rounds || status=$?
    [[ -s $json ]] && $python benchmarks/slim_results.py "$json" && publish "$json"  # raw rounds dropped
    (( status == 0 )) || fail "bench_$2"
}
run_bench ceilings
if wants step; then
    # Single-path rows (samples/s, MFU, memory) not at 256 px: its paired row has the ratio.
    # Paired: eager fused, graphed, compiled + graphed, each against the eager reference in the same
    # rounds, at 224 px batch 64 and on the tiny config (256 px: the per-op files' shapes cover it).
    run_bench train_step train_step_paired "paired and not 256"
    run_bench train_step train_step "not paired and not 256"
    step "profile of the training step (launch cost, GPU busy time, top operators)"
    # Printed here (a lease's suite.log holds it) and kept beside the results.
    profile_args=(--steps 2)
    [[ $dry_run == 1 ]] && profile_args=(--config tiny --steps 1)
    $python benchmarks/profile_train_step.py "${profile_args[@]}" 2>&1 | tee "$results/$name-profile.txt" || fail profile
    publish "$results/$name-profile.txt"
    step "each op on its reference inside the fused step (which op gives or costs what)"
    ablate_args=(--ablate 4)
    [[ $dry_run == 1 ]] && ablate_args=(--config tiny --ablate 1)
    $python benchmarks/profile_train_step.py "${ablate_args[@]}" 2>&1 | tee "$results/$name-ablation.txt" || fail ablation
    publish "$results/$name-ablation.txt"
fi
if wants momentum; then
    step "momentum ITC benchmark"
    run_bench momentum_contrastive
fi
if wants retrieval; then
    step "retrieval: re-ranking against ALBEF's loop, a COCO-5k-sized evaluation end to end"
    run_bench retrieval
fi
if wants ops; then
    step "per-op benchmarks"
    for bench in ema patch_gather contrastive dropout_add_layer_norm attention data; do
        run_bench $bench
    done
fi
if [[ $dry_run == 1 ]]; then
    # What a lease must never lose: a file whose second row fails still publishes its first, and the
    # failure is recorded (benchmarks/suite_check.py: one row passes, one raises).
    step "check: a failing benchmark row loses no results"
    check_out=$(mktemp -d)
    (
        OUT=$check_out keep_going=1 failed=()
        run_bench_file benchmarks/suite_check.py suite_check ""
        [[ ${failed[*]} == bench_suite_check ]] || { echo "the failing row was not recorded: ${failed[*]}"; exit 1; }
        $python - "$check_out/$name-suite_check.json" <<'PY' || exit 1
import json, sys
names = [bench["name"] for bench in json.load(open(sys.argv[1]))["benchmarks"]]
assert names == ["bench_suite_check[passes-cpu]"], f"published rows: {names}"
print("published despite the failing row:", names)
PY
    ) || fail "check: results of a failing file"
fi

step "results"
$python benchmarks/report.py "$results/$name"-*.json > "$results/$name.md" || fail report
cat "$results/$name.md"
if [[ $dry_run == 0 ]]; then  # every committed run's table, README's headline and docs/benchmarks.md's by-shape table
    $python benchmarks/report.py benchmarks/results/*.json > benchmarks/results/README.md || fail report
    $python benchmarks/report.py --readme README.md benchmarks/results/*.json || fail "README headline"
fi
if (( ${#failed[@]} )); then
    step "done with failures: ${failed[*]}"
    exit 1
fi
step "done: $results/$name-*.json, $name.md"
