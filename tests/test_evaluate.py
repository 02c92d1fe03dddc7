"""bdl/evaluate.py: one call gives every metric, a markdown table and a directory of files."""

import json
import math
import re
import struct
import sys

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bdl
from bdl import BayesLinear, GaussianHead, Prediction, Report, evaluate
from bdl.metrics import functional as M

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def blobs(num_examples, *, shift=0.0):
    """Three Gaussian blobs in 2-D; `shift` moves every input away from the training data."""
    target = torch.randint(0, 3, (num_examples,))
    centres = torch.tensor([[0.0, 2.0], [-2.0, -1.0], [2.0, -1.0]])
    return centres[target] + 0.9 * torch.randn(num_examples, 2) + shift, target


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width) and width > 200 and height > 200, path
    assert image[..., :3].std() > 0.05, f"{path} looks blank"


def check_report_directory(report, directory, expected_pngs):
    files = {path.name for path in directory.iterdir()}
    assert files == {"metrics.json", "report.md"} | {f"{stem}.png" for stem in expected_pngs}
    saved = json.loads((directory / "metrics.json").read_text())
    assert saved["task"] == report.task and saved["num_examples"] == len(report.targets)
    assert saved["metrics"] == pytest.approx(report.metrics)
    markdown = (directory / "report.md").read_text()
    assert markdown.startswith(report.to_markdown())
    for stem in expected_pngs:
        assert f"]({stem}.png)" in markdown
        check_png(directory / f"{stem}.png")
        assert sys.modules["bdl.evaluate"]._FIGURE_STEM.fullmatch(stem)  # a later save removes it where that report has none


@pytest.mark.slow
def test_report_of_a_small_trained_bayesian_classifier(tmp_path):
    x, y = blobs(600)
    model = nn.Sequential(BayesLinear(2, 32), nn.ReLU(), BayesLinear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        nll = nn.functional.cross_entropy(model(x), y)
        bdl.elbo_loss(nll, bdl.kl_divergence(model), num_data=600).loss.backward()
        optimizer.step()
    test_x, test_y = blobs(400)
    loader = DataLoader(TensorDataset(test_x, test_y), batch_size=64, shuffle=True)
    ood_x = 0.3 * torch.randn(300, 2)  # where the three classes meet: no class is likely
    report = evaluate(model, loader, ood_data=ood_x, num_samples=16)

    assert report.metrics["accuracy"] > 0.85
    assert report.metrics["ood/predictive_entropy/auroc"] > 0.9
    # the report's numbers are the functional metrics of its own prediction
    probs, targets = report.prediction.probs, report.targets
    assert report.metrics["ece"] == pytest.approx(M.ece(probs, targets).item())
    assert report.metrics["nll"] == pytest.approx(M.nll(probs, targets).item())
    scores_in, scores_out = report.ood_scores["energy"]
    assert report.metrics["ood/energy/fpr_at_95_tpr"] == pytest.approx(M.fpr_at_tpr(scores_in, scores_out).item())

    directory = report.save(tmp_path / "report")
    check_report_directory(report, directory, ["reliability_diagram", "risk_coverage", "ood_histograms", "ood_roc"])
    markdown = report.to_markdown()
    assert f"| accuracy | {report.metrics['accuracy']:.4f} |" in markdown
    for score in M.scores_for_task("classification"):
        row = f"| {score} | {report.metrics[f'ood/{score}/auroc']:.4f} |"
        assert row in markdown


def test_a_ready_prediction_gives_the_same_report_as_the_model():
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = blobs(200)
    ood_x, _ = blobs(100, shift=5.0)
    from_model = evaluate(model, (x, y), ood_data=ood_x, num_samples=1)
    prediction = Prediction.from_logits(model(x).detach()[None])
    ood_prediction = Prediction.from_logits(model(ood_x).detach()[None])
    from_prediction = evaluate(prediction, y, ood_data=ood_prediction)
    assert from_prediction.metrics == pytest.approx(from_model.metrics)
    prediction.targets = y
    assert evaluate(prediction).metrics["accuracy"] == from_model.metrics["accuracy"]
    assert from_model.metrics["mean_mutual_information"] == pytest.approx(0, abs=1e-6)  # one deterministic sample


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: bdl.MCDropout(nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))),
        lambda: bdl.DeepEnsemble.from_factory(lambda: nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3)), 4),
    ],
    ids=["mc_dropout", "deep_ensemble"],
)
def test_every_model_kind_of_predict_gets_a_report(make_model):
    x, y = blobs(120)
    report = evaluate(make_model(), (x, y), ood_data=0.3 * torch.randn(40, 2), num_samples=None)
    assert report.prediction.num_samples in (4, 32)  # one per ensemble member; predict's default otherwise
    assert report.metrics["mean_mutual_information"] > 1e-4  # the samples disagree
    assert report.metrics["ood/mutual_information/auroc"] == pytest.approx(
        M.auroc(*report.ood_scores["mutual_information"]).item()
    )


def test_datasets_give_the_report_of_their_tensors():
    x, y = blobs(90)
    model = nn.Linear(2, 3)
    from_tensors = evaluate(model, (x, y), ood_data=x + 5, num_samples=1)
    from_datasets = evaluate(model, TensorDataset(x, y), ood_data=TensorDataset(x + 5), num_samples=1, batch_size=32)
    assert from_datasets.metrics == pytest.approx(from_tensors.metrics, rel=1e-6)
    assert torch.equal(from_datasets.targets, y)
    # a binary classifier's labels as binary cross-entropy takes them: 0./1. floats of shape [N, 1]
    binary = evaluate(nn.Linear(2, 1), (x, (y > 0).float()[:, None]), num_samples=1)
    assert torch.equal(binary.targets, (y > 0).long())
    # the report's prediction carries its targets from tensors too, as from a loader (triage by error rate needs them)
    assert torch.equal(from_tensors.prediction.targets, y) and torch.equal(from_datasets.prediction.targets, y)
    ready = evaluate(from_tensors.prediction, TensorDataset(x, y), ood_data=from_tensors.ood_prediction)
    assert ready.metrics == pytest.approx(from_tensors.metrics, rel=1e-6)


def test_a_ready_prediction_refuses_a_shuffled_loader_and_inputs_of_another_length():
    # the loader's targets came in another order than the prediction's: metrics of mismatched pairs
    x, y = blobs(40)
    prediction = bdl.predict(nn.Linear(2, 3), x, num_samples=1)
    with pytest.raises(ValueError, match="DataLoader with a RandomSampler, but a ready Prediction is in the data set's order"):
        evaluate(prediction, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    in_order = evaluate(prediction, DataLoader(TensorDataset(x, y), batch_size=8))
    assert in_order.metrics == evaluate(prediction, (x, y)).metrics
    with pytest.raises(ValueError, match="`test_data` has 20 inputs but the Prediction is for 40"):
        evaluate(prediction, (x[:20], y[:20]))


def test_a_task_that_contradicts_the_prediction_or_targets_is_named():
    # a classification Prediction with task="regression" was reported as a classification without a word, and a
    # regressor's float targets were refused as "must hold integer class labels" with no hint of task=
    prediction = Prediction.from_logits(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="task='regression' was given, but the prediction is a classification one"):
        evaluate(prediction, torch.arange(6) % 3, task="regression")
    assert evaluate(prediction, torch.arange(6) % 3, task="classification").task == "classification"
    x, y = torch.randn(6, 4), torch.randn(6)
    with pytest.raises(TypeError, match="`test targets` must hold integer class labels, got dtype torch.float32 with fractional values: for a regression model pass task='regression'"):
        evaluate(nn.Linear(4, 1), (x, y))
    assert evaluate(nn.Linear(4, 1), (x, y), task="regression").task == "regression"
    nan_label = (torch.arange(6) % 3).float()
    nan_label[2] = math.nan  # a NaN label is not a regression's target: not that hint
    with pytest.raises(ValueError, match=r"`test targets` must be class labels, got NaN or inf in 1 of 6 rows, the first at row 2"):
        evaluate(prediction, nan_label)
    with pytest.raises(ValueError, match=r"got NaN or inf in 1 of 1 rows"):  # a 0-d one: torch's "len() of a 0-d tensor"
        evaluate(Prediction.from_logits(torch.randn(2, 1, 3)), torch.tensor(math.nan))
    with pytest.raises(TypeError, match="got tuple: convert numpy arrays with torch.from_numpy"):
        evaluate(nn.Linear(4, 3), (x.numpy(), (torch.arange(6) % 3).numpy()))


def test_a_shuffling_loader_keeps_targets_aligned_with_predictions():
    model = nn.Sequential(nn.Linear(2, 3))
    x, y = blobs(300)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    assert evaluate(model, loader, num_samples=1).metrics == pytest.approx(evaluate(model, (x, y), num_samples=1).metrics)


def test_predictions_without_logits_leave_out_the_logit_scores():
    probs = torch.softmax(torch.randn(4, 50, 3), dim=-1)
    ood = torch.softmax(0.1 * torch.randn(4, 30, 3), dim=-1)
    report = evaluate(Prediction.from_probs(probs), torch.randint(0, 3, (50,)), ood_data=Prediction.from_probs(ood))
    assert report.settings["ood_scores"] == ("max_probability", "predictive_entropy", "mutual_information")
    assert not any(key.startswith(("ood/energy", "ood/max_logit")) for key in report.metrics)
    assert any("energy, max_logit left out: they need logits" in note for note in report.notes)


def test_report_of_a_heteroscedastic_regression_model(tmp_path):
    model = nn.Sequential(BayesLinear(1, 32), nn.Tanh(), GaussianHead(32, 1))
    x = torch.linspace(-2, 2, 120)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(120)
    report = evaluate(model, (x, y), ood_data=x + 6, task="regression", num_samples=8)
    mean, variance = report.prediction.mean, report.prediction.total_variance
    assert report.metrics["crps"] == pytest.approx(M.crps_gaussian(mean, variance, y).item())
    assert report.metrics["interval_coverage_90"] == pytest.approx(M.interval_coverage(mean, variance, y, level=0.9).item())
    assert {"ood/total_variance/auroc", "ood/epistemic_variance/auroc"} <= set(report.metrics)
    directory = report.save(tmp_path)
    check_report_directory(report, directory, ["quantile_calibration", "regression_1d", "ood_histograms", "ood_roc"])
    assert torch.equal(report.ood_inputs.reshape(-1), x[:, 0] + 6)  # drawn in the 1-D figure, marked along its x axis
    assert any(line.get_label() == "OOD inputs" for line in report.figures()["regression_1d"].axes[0].lines)
    from_loader = evaluate(model, (x, y), ood_data=DataLoader(TensorDataset(x + 6), batch_size=50), task="regression", num_samples=2)
    assert torch.equal(from_loader.ood_inputs, x[:, 0] + 6)
    assert "| CRPS |" in report.to_markdown() and "interval coverage (90%)" in report.to_markdown()
    # two outputs: one figure each (only output 0 was drawn, and nothing said which)
    two = evaluate(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), GaussianHead(8, 2)), (x, torch.cat([y[:, None], -y[:, None]], 1)),
                   task="regression", num_samples=1)  # fmt: skip
    figures = two.figures()
    assert {"regression_1d_output0", "regression_1d_output1"} <= set(figures) and "regression_1d" not in figures
    assert figures["regression_1d_output1"].axes[0].get_title() == "Predictive distribution of output 1"
    # saved over the first: its one-output and OOD plots went stale beside metrics.json's "num_ood_examples": null
    (directory / "notes.png").write_bytes(b"")  # a file of the user's: kept
    two.save(directory)
    kept = {path.name for path in directory.iterdir()}
    assert kept == {"metrics.json", "report.md", "notes.png"} | {f"{stem}.png" for stem in figures}


def test_a_variance_that_underflowed_or_a_nll_that_overflowed_is_said_as_such():
    # some zero variances were blamed on "a model that predicts only a mean"; an infinite NLL showed as n/a unsaid
    y = torch.randn(40, 1)
    mean, variance = torch.zeros(1, 40, 1), torch.ones(1, 40, 1)
    variance[0, :3] = 0
    report = evaluate(bdl.Prediction.from_regression(mean, variance), y)
    assert "the predictive variance is 0 for 3 of 40 outputs (a predicted variance that underflowed" in " ".join(report.notes)
    assert "nll" not in report.metrics
    agreeing = evaluate(bdl.Prediction.from_regression(torch.cat([torch.zeros(2, 3, 1), torch.randn(2, 37, 1)], 1)), y)
    # no variance predicted and the samples equal there: a mean-only model, or a head that underflowed everywhere
    assert "the predictive variance is zero for 3 of 40 outputs: the model predicts no variance and its samples agree there" in " ".join(agreeing.notes)
    variance[0, :3] = 1e-45  # float32's smallest, 1.4e-45
    report = evaluate(bdl.Prediction.from_regression(mean, variance), y.abs() + 1)
    assert any(re.fullmatch(r"the Gaussian NLL is infinite: output 0 \(flattened\) has a predicted variance of 1.4e-45 for a squared error of [\d.e+]+", note) for note in report.notes)
    mean, variance = torch.zeros(1, 3, 1), torch.tensor([1e-45, 1e-30, 1.0]).reshape(1, 3, 1)  # the smallest variance, no error
    report = evaluate(bdl.Prediction.from_regression(mean, variance), torch.tensor([[0.0], [1e5], [0.5]]))
    assert "the Gaussian NLL is infinite: output 1 (flattened) has a predicted variance of 1e-30 for a squared error of 1e+10" in report.notes


def test_a_point_regression_model_reports_errors_and_says_why_the_rest_is_missing(tmp_path):
    x, y = torch.randn(50, 3), torch.randn(50)
    report = evaluate(nn.Linear(3, 1), (x, y), task="regression", num_samples=2)
    assert set(report.metrics) == {"rmse", "mae", "mean_aleatoric_variance", "mean_epistemic_variance"}
    # a score equal for every input (the total variance of a mean-only network) reported chance, AUROC 0.5
    with_ood = evaluate(nn.Linear(3, 1), (x, y), ood_data=x + 5, task="regression", num_samples=2)
    assert not any(key.startswith("ood/") for key in with_ood.metrics)
    assert "variance is zero" in report.to_markdown()
    directory = report.save(tmp_path)
    assert {path.name for path in directory.iterdir()} == {"metrics.json", "report.md"}
    assert json.loads((directory / "metrics.json").read_text())["notes"] == report.notes


def test_options_reach_the_metrics():
    x, y = blobs(150)
    report = evaluate(nn.Linear(2, 3), (x, y), num_samples=1, n_bins=7, coverage=0.8, risk=0.1)
    probs = report.prediction.probs
    assert report.metrics["ece"] == pytest.approx(M.ece(probs, y, n_bins=7).item())
    errors = (probs.argmax(1) != y).double()
    assert report.metrics["risk_at_80_coverage"] == pytest.approx(
        M.risk_at_coverage(probs.max(1).values, errors, coverage=0.8).item()
    )
    assert "coverage_at_10_risk" in report.metrics
    assert isinstance(report, Report) and str(report) == report.to_markdown()


def test_nll_of_a_confidently_wrong_model_is_its_cross_entropy():
    # logits scaled up 30x make mistakes with probabilities down to 1e-25, far below float32's eps (1.2e-7);
    # clipping there (as sklearn's log_loss does) reported 4.7 where the cross-entropy is 6.1
    torch.manual_seed(1)
    x, y = blobs(300)
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.mul_(30.0)
        logits = model(x)
    assert (logits.softmax(-1).gather(1, y[:, None]) < 1e-7).sum() >= 10
    report = evaluate(model, (x, y), num_samples=1)
    assert report.metrics["nll"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-4)


def test_one_sample_reports_no_epistemic_ood_scores():
    x, y = blobs(150)
    for samples in (1, 8):  # one sample, or eight equal ones of a deterministic network
        one = evaluate(nn.Linear(2, 3), (x, y), num_samples=samples, ood_data=x + 5)
        assert not any(key.startswith("ood/mutual_information") for key in one.metrics) and "ood/predictive_entropy/auroc" in one.metrics
        assert any(note.startswith("OOD score mutual_information left out: the model has no epistemic part") for note in one.notes)
    several = evaluate(BayesLinear(2, 3), (x, y), num_samples=4, ood_data=x + 5)
    assert "ood/mutual_information/auroc" in several.metrics and not several.notes


@pytest.mark.parametrize("batch_size", [1024, 16])
def test_the_ood_set_is_drawn_with_the_test_sets_random_numbers(batch_size):
    # a batch shares its weight samples: two sets each drawn afresh differed by their draws (a test set against itself
    # as the OOD set gave AUROCs far from 0.5); under the same draws, batch k of either set sees the same networks
    torch.manual_seed(0)
    model = nn.Sequential(BayesLinear(2, 16, posterior_std_init=0.3), nn.ReLU(), BayesLinear(16, 3, posterior_std_init=0.3))
    x, y = blobs(64)
    for method in ("loop", "batched"):
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        report = evaluate(model, loader, ood_data=x.clone(), num_samples=8, method=method, batch_size=batch_size)
        assert torch.equal(report.ood_prediction.mutual_information, report.prediction.mutual_information), method
        assert all(value == 0.5 for key, value in report.metrics.items() if key.endswith("/auroc")), method
    torch.manual_seed(1)
    before = evaluate(model, (x, y), num_samples=8, method="loop").prediction.probs
    torch.manual_seed(1)
    assert torch.equal(evaluate(model, (x, y), ood_data=x + 5, num_samples=8, method="loop").prediction.probs, before)


def test_a_mean_only_model_with_sampled_spread_gets_a_note_on_its_intervals():
    # MC dropout around a network that predicts means: coverage and NLL from the samples' spread alone, no note
    torch.manual_seed(0)
    x = torch.randn(200, 1)
    y = x[:, 0] + 0.5 * torch.randn(200)
    net = bdl.MCDropout(nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1)))
    report = evaluate(net, (x, y), task="regression", num_samples=8)
    assert "interval_coverage_95" in report.metrics
    assert any(note.startswith("the aleatoric variance is 0 for every input (the model predicts means only)") for note in report.notes)
    head = bdl.MCDropout(nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Dropout(0.1), GaussianHead(32, 1)))
    assert not evaluate(head, (x, y), task="regression", num_samples=8).notes


def test_every_ood_score_left_out_is_named_in_the_notes():
    # a mean-only regressor sampled once: every score constant, no OOD table, and not a word of why
    x, y = torch.randn(50, 1), torch.randn(50)
    report = evaluate(nn.Linear(1, 1), (x, y), ood_data=5 * torch.randn(20, 1), task="regression", num_samples=1)
    assert report.settings["ood_scores"] == () and not any(key.startswith("ood/") for key in report.metrics)
    assert any("epistemic_variance left out" in note for note in report.notes)
    assert any("total_variance left out: the same for every test and OOD input" in note for note in report.notes)
    assert "total_variance left out" in report.to_markdown()


def test_tuples_with_more_than_inputs_and_targets_are_read_as_predict_reads_them():
    x, y = blobs(60)
    extra = torch.zeros(60)
    model = nn.Linear(2, 3)
    report = evaluate(model, (x, y, extra), num_samples=1, ood_data=(x + 5, y, extra))
    assert report.metrics["accuracy"] == evaluate(model, (x, y), num_samples=1).metrics["accuracy"]
    assert torch.equal(report.targets, y) and "ood/predictive_entropy/auroc" in report.metrics


def test_fractional_percentages_are_labelled_as_given():
    x, y = blobs(150)
    model = nn.Linear(2, 3)
    report = evaluate(model, (x, y), num_samples=1, ood_data=x + 5, coverage=0.925, risk=0.005, tpr=0.925)
    text = report.to_markdown()
    assert "risk at 92.5% coverage" in text and "coverage at 0.5% risk" in text and "FPR at 92.5% TPR" in text
    assert "| AURC (max probability) |" in text  # the confidence the selective rows use, on each of them
    assert "risk_at_92_5_coverage" in report.metrics and "ood/energy/fpr_at_92_5_tpr" in report.metrics
    assert {key.split("/")[1] for key in evaluate(model, (x, y), num_samples=1, ood_data=x + 5, ood_scores="energy").metrics if key.startswith("ood/")} == {"energy"}
    sample_means, sample_variances = torch.randn(4, 150, 1), torch.rand(4, 150, 1)
    prediction = Prediction.from_regression(sample_means, sample_variances)
    regression = evaluate(prediction, y.float(), levels=(0.5, 0.925))
    text = regression.to_markdown()
    assert "interval coverage (92.5%)" in text and "interval width (50%)" in text and "## Other" not in text
    # %g wrote 1e-05 for 1e-7: the report's key reader failed (to_markdown raised TypeError), or filed it under Other
    tiny = evaluate(model, (x, y), num_samples=1, ood_data=x + 5, tpr=1e-7, coverage=1e-7)
    text = tiny.to_markdown()
    assert "FPR at 0.00001% TPR" in text and "risk at 0.00001% coverage" in text and "## Other" not in text
    assert "FPR at 0.0000000000000001% TPR" in evaluate(model, (x, y), num_samples=1, ood_data=x + 5, tpr=1e-18).to_markdown()  # "0_"
    assert "interval coverage (99.99999%)" in evaluate(prediction, y.float(), levels=(0.5, 0.9999999)).to_markdown()  # "(100%)"
    with pytest.raises(ValueError, match=r"`levels` 0.9 and 0.9000001 both name interval_coverage_90"):  # one was dropped
        evaluate(prediction, y.float(), levels=(0.5, 0.9, 0.9000001))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: evaluate(nn.Linear(2, 3), torch.randn(10, 2)), ValueError, "no test targets"),
        (lambda: evaluate(nn.Linear(2, 3), None), ValueError, "`test_data` is required"),
        (lambda: evaluate(nn.Linear(2, 3), "data.csv"), TypeError, "`test_data` must be a DataLoader"),
        (lambda: evaluate(nn.Linear(2, 3), (torch.randn(10, 2), torch.full((10,), 3))), ValueError, "labels in"),
        (lambda: evaluate(Prediction.from_logits(torch.randn(1, 10, 3)), torch.zeros(10, dtype=torch.long),
                          ood_data=torch.randn(5, 2)), TypeError, "must be a Prediction too"),
        (lambda: evaluate(Prediction.from_logits(torch.randn(1, 10, 3)), torch.zeros(10, dtype=torch.long),
                          ood_data=Prediction.from_regression(torch.randn(2, 5, 1))), ValueError, "differs"),
        (lambda: evaluate(Prediction.from_logits(torch.randn(1, 10, 3)), torch.zeros(10, dtype=torch.long),
                          ood_data=Prediction.from_logits(torch.randn(1, 5, 3)), ood_scores=["confidence"]),
         ValueError, "unknown OOD score"),
        (lambda: evaluate(Prediction.from_logits(torch.randn(1, 10, 3)), torch.zeros(10, dtype=torch.long),
                          ood_data=Prediction.from_logits(torch.randn(1, 5, 7))), ValueError, r"OOD prediction has outputs of shape \(7,\)"),
        # a ready Prediction ignored a misspelt keyword (15 bins for n_bin=5); a model's predict blamed itself
        (lambda: evaluate(Prediction.from_logits(torch.randn(1, 10, 3)), torch.zeros(10, dtype=torch.long), n_bin=5),
         TypeError, r"evaluate\(\) got unexpected keyword argument\(s\) 'n_bin': neither its own nor bdl.predict's \(batch_size"),
        (lambda: evaluate(nn.Linear(2, 3), (torch.randn(10, 2), torch.zeros(10, dtype=torch.long)), ood_score="energy"),
         TypeError, "'ood_score'"),
        # it named `mean` and `target`, neither of them an argument
        (lambda: evaluate(Prediction.from_regression(torch.randn(3, 10, 1)), torch.randn(5)), ValueError,
         r"`test targets` must have the shape of the predicted means \(10, 1\), got shape \(5,\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_metrics_json_is_strict_json():
    report = evaluate(nn.Linear(2, 3), blobs(60), num_samples=1)
    text = json.dumps(report.to_dict(), allow_nan=False)  # no NaN or Inf sneaks into the file
    assert all(math.isfinite(value) for value in json.loads(text)["metrics"].values())


def test_numpy_and_torch_scalar_settings_are_saved_as_numbers(tmp_path):
    # evaluate took them as numbers, then json.dumps refused np.float32 and no file was written
    x, y = blobs(60)
    report = evaluate(nn.Linear(2, 3), (x, y), ood_data=x + 5, num_samples=1, coverage=np.float32(0.9), risk=np.float32(0.1),
                      tpr=np.float64(0.95), n_bins=10)  # fmt: skip
    report.save(tmp_path)
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert settings["coverage"] == pytest.approx(0.9) and settings["risk"] == pytest.approx(0.1) and settings["n_bins"] == 10
    regression = evaluate(nn.Linear(2, 1), (x, x[:, 0]), task="regression", num_samples=1, levels=[np.float32(0.5), 0.9])
    assert regression.to_dict()["settings"]["levels"] == pytest.approx([0.5, 0.9])


@pytest.mark.cuda
def test_metrics_and_report_on_cuda_match_the_cpu(tmp_path):
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = blobs(200)
    ood_x = 0.3 * torch.randn(80, 2)
    on_cpu = evaluate(model, (x, y), ood_data=ood_x, num_samples=1)
    on_cuda = evaluate(model.cuda(), (x.cuda(), y), ood_data=ood_x.cuda(), num_samples=1)  # targets stay on the CPU
    assert on_cuda.prediction.probs.is_cuda
    assert on_cuda.metrics == pytest.approx(on_cpu.metrics, abs=1e-5)
    check_report_directory(on_cuda, on_cuda.save(tmp_path), ["reliability_diagram", "risk_coverage", "ood_histograms", "ood_roc"])


def test_the_report_docstring_lists_every_metric_key_of_both_tasks():
    # a user had to guess the keys ("Brier" in the table is brier_score)
    doc = Report.__doc__
    classification = evaluate(Prediction.from_logits(torch.randn(4, 60, 3)), torch.arange(60) % 3,
                              ood_data=Prediction.from_logits(torch.randn(4, 20, 3)))
    regression = evaluate(Prediction.from_regression(torch.randn(4, 60, 1), torch.rand(4, 60, 1)), torch.randn(60, 1),
                          ood_data=Prediction.from_regression(torch.randn(4, 20, 1), torch.rand(4, 20, 1)))
    for report in (classification, regression):
        for key in report.metrics:
            name = key.split("/")[-1]
            for generic, pattern in (("risk_at_<coverage %>_coverage", r"risk_at_\d+_coverage"),
                                     ("coverage_at_<risk %>_risk", r"coverage_at_\d+_risk"),
                                     ("interval_coverage_<level %>", r"interval_coverage_\d+"),
                                     ("interval_width_<level %>", r"interval_width_\d+"),
                                     ("fpr_at_<tpr %>_tpr", r"fpr_at_\d+_tpr")):
                if re.fullmatch(pattern, name):
                    name = generic
            assert f"``{name}``" in doc, key
