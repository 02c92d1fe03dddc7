"""experiments/benchmark_predict.py still runs end to end (tiny settings)."""


def test_predict_benchmark_prints_every_method_with_ratios(run_script):
    out = run_script("benchmark_predict.py", "--quick", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    methods = {line.split("|")[2].strip().rstrip(" *") for line in rows}
    assert methods == {"floor", "floor/5", "loop", "batched", "vmap"}
    assert len(rows) == 8 and all(float(line.split("|")[5]) > 0 for line in rows)
    assert sum(line.split("|")[2].strip().endswith("*") for line in rows) == 3  # one auto pick per model
