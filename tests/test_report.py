import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_results_table_is_generated_from_the_committed_results():
    # README's performance table must be what report.py makes of the results files, no hand edits.
    files = sorted(str(p) for p in RESULTS.glob("*.json"))
    generated = subprocess.run([sys.executable, "benchmarks/report.py", *files], cwd=RESULTS.parents[1],
                               capture_output=True, text=True, check=True).stdout
    assert (RESULTS / "README.md").read_text() == generated
    assert "| cpu: " in generated and "× |" in generated
