"""experiments/benchmark_peers.py and experiments/peer_quality.py run end to end (tiny settings), peers or not.

The peer libraries are optional: where one is missing, its rows must say "not installed" and the rest
of the table must still be measured. The scripts run in the test's process: most of a separate run's
time would go to importing torch again.
"""

import importlib
import importlib.metadata
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


def load_script(name, monkeypatch):
    """An experiments/ script as a module (its sibling imports found on the path)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "experiments"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, name, script)
    spec.loader.exec_module(script)
    return script


def test_each_predictions_memory_window_pays_for_its_own_buffers(monkeypatch):
    # the reparam row's loop left weight-sample buffers that its bdl.predict window reused (9 MiB uncounted),
    # where the local and flipout rows' bdl.predict window allocated them: the same work, 28-32 MiB apart
    script = load_script("benchmark_peers", monkeypatch)
    variant = script.bdl_variants()[0]
    model = variant.build((256, 256, 4))  # 65,536 weights: above the size whose samples go into kept buffers
    variant.predict(model, torch.randn(8, 256), 2)
    assert any(key[0] == "sample" for key in model[0]._std_cache)
    script.forget_prediction_buffers(model)
    assert all(not module._std_cache for module in model.modules() if hasattr(module, "_std_cache"))
    script.forget_prediction_buffers(None)  # a row without a model (a peer's that failed to build)


def test_scripts_name_bdls_version_and_a_single_seed_has_no_spread(monkeypatch):
    import bdl

    peers = load_script("benchmark_peers", monkeypatch)

    def no_metadata(distribution):  # a checkout on the path, not installed: "bdl not installed" above bdl's rows
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(peers.importlib.metadata, "version", no_metadata)
    assert peers.version("bdl") == bdl.__version__ and peers.version("blitz-bayesian-pytorch") == "not installed"
    quality = load_script("peer_quality", monkeypatch)
    assert quality.mean_std([0.8724]) == "0.872"  # "0.872 ± 0.000": one seed's std is undefined, not 0
    assert quality.mean_std([0.8, 0.9]) == "0.850 ± 0.071"
