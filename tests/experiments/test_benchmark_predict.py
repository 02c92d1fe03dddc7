"""experiments/benchmark_predict.py still runs end to end (tiny settings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_predict_benchmark_prints_every_method_with_ratios():
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "benchmark_predict.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    methods = {line.split("|")[2].strip().rstrip(" *") for line in rows}
    assert methods == {"floor", "floor/5", "loop", "batched", "vmap"}
    assert len(rows) == 8 and all(float(line.split("|")[5]) > 0 for line in rows)
    assert sum(line.split("|")[2].strip().endswith("*") for line in rows) == 3  # one auto pick per model
