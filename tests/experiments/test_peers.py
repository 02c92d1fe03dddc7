"""experiments/benchmark_peers.py and experiments/peer_quality.py run end to end (tiny settings), peers or not.

The peer libraries are optional: where one is missing, its rows must say "not installed" and the rest
of the table must still be measured. The scripts run in the test's process: most of a separate run's
time would go to importing torch again.
"""

import importlib
import importlib.util
import re

import pytest
import torch

PEER_MODULES = {
    "bayesian-torch": "bayesian_torch.layers",
    "blitz": "blitz.modules",
    "torchbnn": "torchbnn",
    "torch-uncertainty": "torch_uncertainty.layers.bayesian",
}
BENCHMARK_ROWS = [
    "nn.Linear",
    "bdl BayesLinear reparam",
    "bdl BayesLinear local",
    "bdl BayesLinear flipout",
    "bayesian-torch LinearReparameterization",
    "bayesian-torch LinearFlipout",
    "blitz BayesianLinear",
    "torchbnn BayesLinear",
    "torch-uncertainty BayesLinear",
]


def importable(module: str) -> bool:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - installed but broken counts as missing, as in the scripts
        return False
    return True


def table_rows(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|-")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, run_script):
    out = tmp_path_factory.mktemp("peer_quality") / "quality.md"
    return {
        "benchmark": run_script("benchmark_peers.py", "--quick", "--threads", "1"),
        "quality": run_script("peer_quality.py", "--epochs", "1", "--seeds", "0", "1", "--num-samples", "2",
                              "--threads", "1", "--out", str(out)),
        "quality_file": out.read_text() if out.exists() else "",
    }


def test_peer_benchmark_measures_every_installed_library_and_names_the_missing(outputs):
    rows = table_rows(outputs["benchmark"])
    assert list(rows) == BENCHMARK_ROWS
    assert "peak MiB" in outputs["benchmark"]
    assert rows["nn.Linear"][1] == rows["nn.Linear"][3] == "1.00"
    for name, cells in rows.items():
        library = next((peer for peer in PEER_MODULES if name.startswith(peer + " ")), None)
        if library is not None and not importable(PEER_MODULES[library]):
            assert cells[0].startswith("not installed:"), (name, cells)
            continue
        train_ms, train_ratio, predict_ms, predict_ratio, api_ms, api_ratio, train_mib, predict_mib, api_mib = cells
        numbers = [train_ms, train_ratio, predict_ms, predict_ratio, train_mib, predict_mib]
        # bdl's rows are also timed through bdl.predict; the other rows have no such column
        api = [api_ms, api_ratio, api_mib]
        if name.startswith("bdl "):
            numbers += api
        else:
            assert api == ["-", "-", "-"], (name, cells)
        assert all(float(cell) >= 0 for cell in numbers), (name, cells)
        assert float(train_ms) > 0 and float(predict_ms) > 0 and float(train_ratio) > 0 and float(predict_ratio) > 0, (name, cells)


def test_peer_quality_reports_mean_and_std_over_seeds_and_writes_the_table(outputs):
    main, _, paired = outputs["quality"].partition("Paired differences")
    rows = table_rows(main)
    assert list(rows) == ["bdl", "bdl (softplus)", "bdl (mean KL)", "bayesian-torch (own KL)", "bayesian-torch (summed KL)"]
    for name in ("bdl", "bdl (softplus)", "bdl (mean KL)"):
        accuracy, nll, ece, auroc, train_s = (float(cell.split(" ± ")[0]) for cell in rows[name])
        assert all(" ± " in cell for cell in rows[name])
        assert 0.5 < accuracy <= 1 and nll > 0 and 0 <= ece <= 1 and 0 <= auroc <= 1 and train_s >= 0  # a fast machine trains the tiny setting in < 0.05 s
    for name in ("bayesian-torch (own KL)", "bayesian-torch (summed KL)"):
        if importable(PEER_MODULES["bayesian-torch"]):
            assert all(" ± " in cell for cell in rows[name]), rows[name]
        else:
            assert rows[name][0].startswith("not installed:"), rows[name]
    assert outputs["quality_file"] and outputs["quality_file"].strip() in outputs["quality"]
    if not importable(PEER_MODULES["bayesian-torch"]):
        assert not paired
        return
    differences = table_rows(paired)
    assert list(differences) == ["bdl - bayesian-torch (summed KL)", "bdl (softplus) - bayesian-torch (summed KL)",
                                 "bdl (mean KL) - bayesian-torch (own KL)"]
    for cells in differences.values():
        assert all(re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", cell) for cell in cells), cells
    # the same parameters and noise give the same ELBO step in both libraries
    loss_diff, grad_diff = re.search(r"\|loss difference\| (\S+) .*max \|gradient difference\| (\S+)", paired).groups()
    assert float(loss_diff) < 1e-4 and float(grad_diff) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_benchmark_without_cuda_is_refused(capsys, run_script):
    # every row failed with "no NVIDIA driver" and the run exited 0
    with pytest.raises(SystemExit) as exit_info:
        run_script("benchmark_peers.py", "--quick", "--device", "cuda")
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err
