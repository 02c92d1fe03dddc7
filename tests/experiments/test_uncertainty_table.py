"""experiments/uncertainty_table.py runs end to end (--quick) and writes the tables it promises."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "uncertainty_table.py"
CLASSIFICATION_HEADER = ["method", "accuracy ↑", "NLL ↓", "ECE ↓", "Brier ↓", "AURC ↓", "OOD AUROC (entropy) ↑",
                         "FPR95 (entropy) ↓", "OOD AUROC (MI) ↑", "train s ↓", "predict ms ↓"]  # fmt: skip
REGRESSION_HEADER = ["method", "RMSE ↓", "NLL ↓", "95% coverage →0.95", "CRPS ↓", "OOD AUROC (total var.) ↑",
                     "FPR95 (total var.) ↓", "OOD AUROC (epist. var.) ↑", "train s ↓", "predict ms ↓"]  # fmt: skip


@pytest.fixture
def script(monkeypatch):
    """experiments/uncertainty_table.py imported as a module."""
    spec = importlib.util.spec_from_file_location("uncertainty_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "uncertainty_table", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def first_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header and ``{first cell: other cells}`` of the first markdown table in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|-"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return table[0], {row[0]: row[1:] for row in table[1:]}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, run_script):
    out = tmp_path_factory.mktemp("results")
    (out / "digits.md").write_text("# old table\n\n## Findings\n\nWritten by hand: kept.\n")
    stdout = run_script("uncertainty_table.py", "--quick", "--datasets", "digits", "regression_gap",
                        "--methods", "deterministic", "temperature", "mc_dropout", "--out", str(out))  # fmt: skip
    return out, stdout


def test_classification_table_has_a_row_per_method_and_every_metric(quick_run):
    out, stdout = quick_run
    text = (out / "digits.md").read_text()
    header, rows = first_table(text)
    assert header == CLASSIFICATION_HEADER
    assert list(rows) == ["deterministic", "deterministic + temperature scaling", "MC dropout"]
    for method, cells in rows.items():
        numbers = {title: cell for title, cell in zip(header[1:], cells)}
        if method != "MC dropout":
            assert numbers.pop("OOD AUROC (MI) ↑") == "n/a"  # a single network has no epistemic score
        values = {title: float(cell) for title, cell in numbers.items()}  # one seed: plain numbers
        assert 0 <= values["accuracy ↑"] <= 1 and values["NLL ↓"] > 0 and 0 <= values["ECE ↓"] <= 1
        assert 0 <= values["OOD AUROC (entropy) ↑"] <= 1 and values["train s ↓"] > 0 and values["predict ms ↓"] > 0
    accuracy = {method: cells[0] for method, cells in rows.items()}
    assert accuracy["deterministic"] == accuracy["deterministic + temperature scaling"]  # temperature keeps the argmax
    assert "## Expected shape" in text and "![NLL and OOD AUROC per method](digits.png)" in text
    assert text.rstrip().endswith("## Findings\n\nWritten by hand: kept.")
    assert text in stdout  # printed as well
    def no_nan(constant):  # strict JSON: NaN/Infinity are not JSON (an undefined metric is null)
        raise AssertionError(f"{constant} in digits.json")

    data = json.loads((out / "digits.json").read_text(), parse_constant=no_nan)
    assert data["seeds"] == [0] and 0 < data["results"]["deterministic"][0]["metrics"]["accuracy"] <= 1
    assert data["results"]["temperature"][0]["metrics"]["temperature"] > 0
    assert (out / "digits.png").stat().st_size > 0


def test_regression_table_skips_temperature_scaling_and_reports_coverage(quick_run):
    out, _ = quick_run
    header, rows = first_table((out / "regression_gap.md").read_text())
    assert header == REGRESSION_HEADER
    assert list(rows) == ["deterministic", "MC dropout"]
    coverage = [float(cells[2]) for cells in rows.values()]
    assert all(0 <= value <= 1 for value in coverage)
    assert 0 <= float(rows["MC dropout"][6]) <= 1 and rows["deterministic"][6] == "n/a"
    assert (out / "regression_gap.png").exists() and not (out / "mnist1d_reference.md").exists()


def test_arguments_are_checked_and_quick_means_one_seed(script, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(script.tempfile, "tempdir", str(tmp_path))  # parsing made a temporary folder, even when refused
    args = script.parse_args(["--quick", "--methods", "svi", "deterministic"])
    assert args.seeds == [0] and args.methods == ["deterministic", "svi"]  # the table's order
    assert script.parse_args(["--seeds", "2"]).seeds == [0, 1]
    for wrong in (["--seeds", "0"], ["--methods", "laplace"], ["--epochs-scale", "0"], ["--nuts-samples", "2"],
                  ["--datasets", "digits", "--methods", "nuts"]):  # fmt: skip  (NUTS is regression only: an empty table)
        with pytest.raises(SystemExit):
            script.parse_args(wrong)
    # inf failed every run; one message named all three arguments and no value
    for wrong, message in ((["--epochs-scale", "inf"], "--epochs-scale must be a finite number > 0, got inf"),
                           (["--nuts-warmup", "-1"], "--nuts-warmup must be >= 0, got -1"),
                           (["--nuts-hidden", "8", "0"], "--nuts-hidden sizes must be >= 1, got 8 0")):  # fmt: skip
        with pytest.raises(SystemExit):
            script.parse_args(wrong)
        assert message in capsys.readouterr().err
    # a smoke run without --out must not overwrite the committed results
    assert script.parse_args(["--quick"]).out is None  # main makes a temporary folder
    assert script.parse_args([]).out == script.ROOT / "experiments" / "results"
    assert not list(tmp_path.iterdir())


def test_predict_time_leaves_the_first_batch_out(script, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(script.time, "perf_counter", lambda: clock[0])

    def predict(x):  # a fake clock: the first call's one-time costs take 100 s, every call 1 s
        clock[0] += 1.0 if clock[0] else 101.0

    loader = [(torch.zeros(2, 3),)] * 4
    assert script.time_predictions(predict, loader, torch.device("cpu")) == 4000.0  # 4 batches, 1 s each


def test_nuts_with_two_chains_reports_weight_and_function_space_diagnostics(script, monkeypatch, tmp_path):
    # --quick runs one chain, which has no R-hat: here the path of `make results` (two chains), at a tiny size
    args = script.parse_args(["--quick", "--nuts-hidden", "4", "--runs-dir", str(tmp_path)])
    monkeypatch.setattr(script, "nuts_settings", lambda _: (2, 4, 6, 2))
    result = script.run_nuts("regression_gap", 0, args)
    metrics, (note,) = result.metrics, result.notes
    assert note.startswith("2 chain(s) x 6 draws") and "weight space: max R-hat" in note and "function space" in note
    assert "rank-normalised" in note
    for name in ("max_r_hat", "function_space_max_r_hat", "max_rank_r_hat", "function_space_max_rank_r_hat"):
        assert metrics[name] >= 1 or metrics[name] != metrics[name]  # R-hat >= 1, or NaN (a weight that never moved)
    # Stan's ESS of the mean is at most S log10(S) for S draws (more than S for antithetic chains)
    assert 0 < metrics["function_space_min_ess"] <= 2 * 6 * math.log10(2 * 6) or metrics["function_space_min_ess"] == float("inf")
    assert metrics["rmse"] > 0 and metrics["divergences"] >= 0


def test_the_shape_check_compares_an_epistemic_auroc_with_the_baselines_total_one(script):
    # compared with chance (0.5), every method's MI AUROC passed on digits, where each one is below the single
    # network's entropy AUROC on every seed

    def run(entropy, mutual_information=0.5):
        metrics = {"nll": 0.1, "ece": 0.01, "ood/predictive_entropy/auroc": entropy, "ood/mutual_information/auroc": mutual_information}
        return [script.RunResult(metrics, [], None)]

    table = script.shape_check("digits", {"deterministic": run(0.97), "ensemble": run(0.96, 0.96), "mc_dropout": run(0.96, 0.98)})[0]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert "OOD AUROC (MI) above 0.5 and the baseline's (entropy)" in table.splitlines()[0]
    assert rows["deep ensemble (5)"][-1] == "**no**" and rows["MC dropout"][-1] == "yes"
    # and above chance where the baseline's is below it (the regression toy's total variance: 0.008)
    table = script.shape_check("digits", {"deterministic": run(0.01), "ensemble": run(0.96, 0.4)})[0]
    assert table.splitlines()[2].split("|")[-2].strip() == "**no**"


def test_one_seed_is_said_to_have_no_spread(script):
    # the MNIST-1D reference table's line said "sample std over 1 seed(s)" beside plain numbers
    assert script.spread_line(script.parse_args(["--seeds", "1"])).endswith("over 1 seed(s) (one seed: no std)")
    assert script.spread_line(script.parse_args(["--seeds", "3"])) == "Mean ± sample std (n - 1) over 3 seed(s)"
