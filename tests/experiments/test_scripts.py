"""The on-demand scripts in experiments/ still run end to end (tiny settings)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_mlp_comparison_prints_both_models():
    out = run("compare_mlp.py", "--epochs", "2", "--num-samples", "4")
    assert "nn.Linear MLP" in out and "bdl.BayesLinear MLP" in out and "ECE" in out


def test_layer_benchmark_prints_a_table_with_ratios():
    out = run("benchmark_layers.py", "--sizes", "16", "32", "4", "--steps", "2", "--batch-size", "8")
    rows = [line for line in out.splitlines() if line.startswith("| BayesLinear")]
    assert len(rows) == 4 and all(line.count("|") == 6 for line in rows)
