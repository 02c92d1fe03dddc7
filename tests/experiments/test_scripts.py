"""The on-demand scripts in experiments/ still run end to end (tiny settings)."""

import pytest
import torch


@pytest.mark.slow
def test_mlp_comparison_prints_both_models(run_script, tmp_path):
    # its run folders under tmp_path: the default (runs/compare_mlp) was a folder in the checkout
    out = run_script("compare_mlp.py", "--epochs", "2", "--num-samples", "4", "--out", str(tmp_path / "compare_mlp"))
    assert "nn.Linear MLP" in out and "bdl.BayesLinear MLP" in out and "ECE" in out


def test_layer_benchmark_prints_a_table_with_ratios(run_script):
    tiny = ("--sizes", "16", "32", "4", "--steps", "2", "--batch-size", "8")
    out = run_script("benchmark_layers.py", *tiny, "--protocol", "interleaved")
    rows = [line for line in out.splitlines() if line.startswith("| BayesLinear")]
    assert len(rows) == 4 and all(line.count("|") == 6 for line in rows)
    # the default protocol: every variant (here nn.Linear and one Bayesian layer) in processes of its own
    # written as the other benchmarks take it: one network's widths joined by '-'
    tiny = ("--sizes", "16-32-4") + tiny[4:]
    out = run_script("benchmark_layers.py", *tiny, "--rounds", "1", "--variants", "BayesLinear flipout", "--optimizer", "default")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "process of its own" in out and list(rows) == ["layer", "nn.Linear", "BayesLinear flipout"]
    assert "Adam (default)" in rows["layer"] and "fused" not in rows["layer"]
    assert rows["nn.Linear"].count("1.00") == 1 and float(rows["BayesLinear flipout"].split("|")[3]) > 0


def test_resnet_benchmark_times_every_estimator_against_conv2d(run_script):
    out = run_script("benchmark_resnet.py", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "1")
    lines = [line for line in out.splitlines() if line.startswith("| ") and "ms/step" not in line]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in lines}
    assert list(rows) == ["nn.Conv2d", "reparam", "local", "flipout"] and "(25000 steps)" in out  # one CIFAR-10 epoch at batch 2
    assert float(rows["nn.Conv2d"][1]) == 1.0 and all(float(ms) > 0 for ms, _ in rows.values())


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("benchmark_layers.py", ["--steps", "0"], "--steps must be >= 1, got 0"),
        ("benchmark_layers.py", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
        ("benchmark_layers.py", ["--threads", "0"], "--threads must be >= 1, got 0"),
        ("benchmark_layers.py", ["--batch-size", "0", "--protocol", "interleaved"], "--batch-size must be >= 1, got 0"),
        ("benchmark_layers.py", ["--sizes", "16"], "--sizes: sizes must be positive layer widths joined by '-'"),
        ("benchmark_svi.py", ["--sizes", "16-0-4"], "--sizes: sizes must be positive layer widths joined by '-'"),
        ("benchmark_svi.py", ["--sizes", "16-8-4", "8-4-2"], "--sizes: one network here, as 784-1200-1200-10 or 784 1200 1200 10, got 16-8-4 8-4-2"),
        ("benchmark_predict.py", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
        ("benchmark_predict.py", ["--batches", "64", "0"], "--batches must be >= 1, got 0"),
        ("benchmark_predict.py", ["--sizes", "16-x-4"], "sizes must be positive layer widths"),
        ("benchmark_svi.py", ["--steps", "0"], "--steps must be >= 1, got 0"),
        ("benchmark_resnet.py", ["--steps", "0"], "--steps must be >= 1, got 0"),
        ("benchmark_resnet.py", ["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        ("peer_quality.py", ["--seeds", "0", "0"], "--seeds must be different"),
        ("compare_mlp.py", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ],
)
def test_scripts_refuse_counts_that_measure_nothing(script, args, message, run_script, capsys):
    # they crashed with tracebacks, or printed tables of empty batches, inf and NaN
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, *args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script", ["benchmark_peers.py", "benchmark_layers.py", "benchmark_predict.py", "benchmark_svi.py", "benchmark_resnet.py"])
def test_a_cuda_benchmark_without_cuda_is_refused(script, capsys, run_script, monkeypatch):
    # the peers' benchmark ran every row into "no NVIDIA driver" and exited 0; the others stopped with that traceback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        run_script(script, "--device", "cuda")
    assert exit_info.value.code == 2 and "--device cuda: no CUDA device is available here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # torch's "Expected one of cpu, cuda, ipu, ... device type" traceback
        run_script(script, "--device", "gpu")
    assert exit_info.value.code == 2 and "--device must be a torch device such as cpu, cuda or cuda:1, got 'gpu'" in capsys.readouterr().err
