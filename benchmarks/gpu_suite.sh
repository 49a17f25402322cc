#!/usr/bin/env bash
# The whole GPU check in one call, for a lent H100/H200 (a few minutes): versions, build for
# sm_90, the CUDA tests, the per-op and training-step benchmarks at GPU sizes, a Markdown table. Results go to
# benchmarks/results/<card>-<date>.{json,md} and, when set, to $OUT. Stops at the first failure
# with its error in the last lines.
#
#   bash benchmarks/gpu_suite.sh            # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run  # on a CPU: same steps, CPU-only build, tiny sizes,
#                                           # results to a temporary folder (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1
python=${PYTHON:-python3}

step() { echo; echo "=== $* ($(date -u +%T))"; }

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
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || true
card=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")

step "build"
if [[ $dry_run == 1 ]]; then
    VLFAST_BUILD_CUDA=0 MAX_JOBS=$(nproc) $python setup.py build_ext --inplace > /tmp/vlfast-build.log 2>&1 \
        || { tail -40 /tmp/vlfast-build.log; exit 1; }
else
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" VLFAST_BUILD_CUDA=1 MAX_JOBS=$(nproc) \
        $python setup.py build_ext --inplace > /tmp/vlfast-build.log 2>&1 || { tail -40 /tmp/vlfast-build.log; exit 1; }
fi
$python -m vlfast

step "CUDA tests"
# On a CPU every cuda test skips: the step still proves collection and markers work.
$python -m pytest -q -m cuda -p no:cacheprovider tests

step "benchmarks"
if [[ $dry_run == 1 ]]; then
    results=$(mktemp -d)
    selection=(-k "cpu and (small or 64 or tiny) and not vit_b16")
    timing=(--benchmark-max-time=0.01 --benchmark-min-rounds=1 --benchmark-warmup=off)
else
    results=benchmarks/results
    selection=(-k cuda)
    timing=(--benchmark-max-time=0.5 --benchmark-min-rounds=5)
fi
name="$card-$(date -u +%F)"
$python -m pytest -q -p no:cacheprovider benchmarks --benchmark-enable "${timing[@]}" "${selection[@]}" \
    --benchmark-json="$results/$name.json" --benchmark-columns=median,rounds
$python benchmarks/report.py "$results/$name.json" > "$results/$name.md"
cat "$results/$name.md"
if [[ $dry_run == 0 ]]; then  # the table README links to, over every committed run
    $python benchmarks/report.py benchmarks/results/*.json > benchmarks/results/README.md
fi
if [[ -n "${OUT:-}" ]]; then
    cp "$results/$name.json" "$results/$name.md" "$OUT/"
fi
step "done: $results/$name.{json,md}"
