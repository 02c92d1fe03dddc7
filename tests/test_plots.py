"""bdl/plots.py: every figure draws the numbers of the metrics, composes through `ax`, and saves headless."""

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from bdl import Prediction, plots
from bdl.metrics import functional as M


def overconfident(num_examples=1000, num_classes=4):
    logits = torch.randn(num_examples, num_classes)
    target = torch.distributions.Categorical(logits=logits).sample()
    return torch.softmax(3 * logits, dim=1), target


def saved_image(figure, path):
    figure.savefig(path, dpi=60)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # not a blank canvas
    return image


def test_backend_is_headless():
    assert matplotlib.get_backend().lower() == "agg"


def test_reliability_diagram_draws_the_bins_and_the_ece(tmp_path):
    probs, target = overconfident()
    figure = plots.plot_reliability_diagram(probs, target, n_bins=10)
    reliability, histogram = figure.axes
    bins = M.calibration_bins(probs, target, n_bins=10)
    accuracy_bars = [patch.get_height() for patch in reliability.containers[0]]
    expected = bins.accuracy[bins.count > 0].tolist()
    assert accuracy_bars == pytest.approx(expected, abs=1e-6)
    assert f"ECE = {M.ece(probs, target, n_bins=10).item():.3f}" in reliability.texts[0].get_text()
    fractions = [patch.get_height() for patch in histogram.patches]
    assert fractions == pytest.approx((bins.count[bins.count > 0] / len(target)).tolist())  # no bar per empty bin
    saved_image(figure, tmp_path / "reliability.png")


def test_reliability_diagram_into_a_given_axes_draws_no_histogram_unless_asked():
    probs, target = overconfident(200)
    figure = Figure()
    ax = figure.add_subplot(1, 2, 1)
    assert plots.plot_reliability_diagram(probs, target, ax=ax) is figure
    assert len(figure.axes) == 1
    histogram_ax = figure.add_subplot(1, 2, 2)
    plots.plot_reliability_diagram(probs, target, ax=ax, histogram_ax=histogram_ax)
    assert len(histogram_ax.patches) == int((M.calibration_bins(probs, target, n_bins=15).count > 0).sum()) > 0


def test_reliability_diagram_takes_lists_and_large_half_precision_inputs():
    figure = plots.plot_reliability_diagram([[0.7, 0.3], [0.4, 0.6]], [0, 1], n_bins=4)
    assert "N = 2" in " ".join(text.get_text() for text in figure.axes[0].texts)
    probs = torch.softmax(0.01 * torch.randn(70_000, 2), dim=1).half()  # 70,000 in one bin: inf as float16
    figure = plots.plot_reliability_diagram(probs, torch.randint(0, 2, (70_000,)), n_bins=5)
    assert "N = 70000" in " ".join(text.get_text() for text in figure.axes[0].texts)


def test_plots_take_what_evaluate_takes():
    # whole-number float labels (evaluate's and a Bernoulli model's) were refused by the reliability diagram, and a
    # numpy int number of bins by the histogram ("bins must be a positive int, got np.int64(10)")
    probs = torch.softmax(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)), 1)
    labels = torch.arange(40) % 3
    drawn = [patch.get_height() for patch in plots.plot_reliability_diagram(probs, labels.float(), n_bins=5).axes[0].patches]
    assert drawn == [patch.get_height() for patch in plots.plot_reliability_diagram(probs, labels, n_bins=5).axes[0].patches]
    with pytest.raises(TypeError, match="must hold integer class labels"):
        plots.plot_reliability_diagram(probs, labels.float() + 0.5)
    def outline(bins):
        return [len(patch.get_path().vertices) for patch in plots.plot_ood_histogram(torch.randn(30), torch.randn(30), bins=bins).axes[0].patches]

    assert outline(np.int64(10)) == outline(10) != outline(5)


def test_ood_histogram_and_roc_show_the_auroc_and_compose(tmp_path):
    scores_in, scores_out = torch.randn(300), torch.randn(200) + 1.5
    area = M.auroc(scores_in, scores_out).item()
    figure = plots.plot_ood_histogram(scores_in, scores_out, score_name="entropy")
    assert f"AUROC = {area:.3f}" in figure.axes[0].get_title()
    saved_image(figure, tmp_path / "histogram.png")
    roc = plots.plot_ood_roc(scores_in, scores_out, label="entropy")
    assert plots.plot_ood_roc(scores_in, scores_out + 1, label="energy", ax=roc.axes[0]) is roc
    labels = [line.get_label() for line in roc.axes[0].lines]
    assert labels[0] == f"entropy (AUROC = {area:.3f})" and labels.count("chance") == 1 and len(labels) == 3
    fpr, tpr = M.ood_roc_curve(scores_in, scores_out)
    np.testing.assert_allclose(roc.axes[0].lines[0].get_xdata(), fpr.numpy())
    close = plots.plot_ood_histogram(1000 + 1e-4 * torch.rand(50, dtype=torch.float64), 1000 + 1e-4 * torch.rand(50, dtype=torch.float64))
    assert len(close.axes[0].patches) == 2 and all(p.get_path().vertices[:, 1].max() > 0 for p in close.axes[0].patches)
    np.testing.assert_allclose(roc.axes[0].lines[0].get_ydata(), tpr.numpy())
    saved_image(roc, tmp_path / "roc.png")
    for value in (1.0, 1e17):  # one value only: at 1e17 the bin [v, v + 1] was empty in float64 (a NaN density, no plot)
        same = plots.plot_ood_histogram(torch.full((20,), value, dtype=torch.float64), torch.full((10,), value, dtype=torch.float64))
        assert all(np.isfinite(p.get_path().vertices).all() and p.get_path().vertices[:, 1].max() > 0 for p in same.axes[0].patches)
    # finite scores whose spread overflows: linspace's edges were NaN (matplotlib: "bins must increase monotonically")
    # and within a factor 10 of float64's largest number: a figure whose axis ticks overflowed when saved
    for low, high in ((-1e308, 1e308), (-8e307, 8e307), (0.0, 1.5e308)):
        with pytest.raises(ValueError, match=r"scores_in and scores_out span \[.*\], too close to float64's largest number"):
            plots.plot_ood_histogram(torch.tensor([low, 0.0], dtype=torch.float64), torch.tensor([high], dtype=torch.float64))
    saved_image(plots.plot_ood_histogram(torch.tensor([-1.7e307, 0.0], dtype=torch.float64), torch.tensor([1.7e307], dtype=torch.float64)), tmp_path / "wide.png")


def test_risk_coverage_plot_draws_the_curve_and_the_oracle(tmp_path):
    confidence = torch.rand(500)
    loss = (torch.rand(500) > confidence).float()
    figure = plots.plot_risk_coverage(confidence, loss, label="max probability")
    model_line, oracle_line = figure.axes[0].lines
    _, risk = M.risk_coverage_curve(confidence, loss)
    np.testing.assert_allclose(model_line.get_ydata(), risk.numpy())
    assert oracle_line.get_ydata()[:100].max() == 0  # the oracle accepts the correct predictions first
    assert f"AURC = {M.aurc(confidence, loss).item():.4f}" in model_line.get_label()
    saved_image(figure, tmp_path / "risk.png")


def test_regression_plot_draws_mean_and_nested_bands(tmp_path):
    x = torch.linspace(-3, 3, 60)
    spread = torch.linspace(-1, 1, 5)[:, None, None]
    sample_means = torch.sin(x)[None, :, None] + spread * (0.1 + x.abs()[None, :, None] / 3)
    prediction = Prediction.from_regression(sample_means, torch.full_like(sample_means, 0.04))
    figure = plots.plot_regression_1d(x[:, None], prediction, target=torch.sin(x) + 0.2 * torch.randn(60))
    ax = figure.axes[0]
    total_band, aleatoric_band = ax.collections[:2]
    total_height = np.ptp(total_band.get_paths()[0].vertices[:, 1])
    aleatoric_height = np.ptp(aleatoric_band.get_paths()[0].vertices[:, 1])
    assert total_height > aleatoric_height  # total variance includes the epistemic part
    np.testing.assert_allclose(ax.lines[0].get_ydata(), prediction.mean[:, 0].numpy(), atol=1e-6)
    saved_image(figure, tmp_path / "regression.png")
    with pytest.raises(ValueError, match="regression Prediction"):
        plots.plot_regression_1d(x, Prediction.from_logits(torch.randn(2, 60, 3)))
    with pytest.raises(ValueError, match="1-D inputs"):
        plots.plot_regression_1d(torch.randn(60, 2), prediction)


def test_regression_plot_draws_the_ood_inputs_in_the_gap():
    # test inputs on both sides of a gap, OOD inputs inside it: the bands ran straight across the gap, which the
    # figure of the gap toy exists to show
    x = torch.cat([torch.linspace(-3, -1, 30), torch.linspace(1, 3, 30)])
    gap = torch.linspace(-0.9, 0.9, 10)
    prediction = Prediction.from_regression(torch.randn(4, 60, 1) * 0.01, torch.full((4, 60, 1), 0.01))
    inside = Prediction.from_regression(torch.randn(4, 10, 1) * 3, torch.full((4, 10, 1), 0.01))  # wide there
    ax = plots.plot_regression_1d(x, prediction, ood_x=gap[:, None], ood_prediction=inside).axes[0]
    total_band = ax.collections[0].get_paths()[0].vertices
    in_gap = (total_band[:, 0] > -1) & (total_band[:, 0] < 1)
    assert in_gap.any() and np.abs(total_band[in_gap, 1]).max() > 1  # the gap's epistemic spread is drawn
    np.testing.assert_allclose(ax.lines[0].get_xdata(), torch.cat([x, gap]).sort().values.numpy())
    rug = [line for line in ax.lines if line.get_label() == "OOD inputs"]
    assert len(rug) == 1 and np.allclose(rug[0].get_xdata(), gap.numpy())
    with pytest.raises(ValueError, match="`ood_x` and `ood_prediction` go together"):
        plots.plot_regression_1d(x, prediction, ood_x=gap)
    with pytest.raises(ValueError, match="`ood_x` has 9 inputs but `ood_prediction` is for 10"):
        plots.plot_regression_1d(x, prediction, ood_x=gap[:9], ood_prediction=inside)


def test_quantile_calibration_plot(tmp_path):
    figure = plots.plot_quantile_calibration(torch.zeros(400), torch.ones(400), 2 * torch.randn(400))
    nominal, observed = M.quantile_calibration_curve(torch.zeros(400), torch.ones(400), 2 * torch.randn(400))
    assert len(figure.axes[0].lines[1].get_xdata()) == len(nominal) == len(observed)
    saved_image(figure, tmp_path / "quantiles.png")


def test_plots_reject_bad_axes_and_bad_data():
    with pytest.raises(TypeError, match="Axes"):
        plots.plot_ood_roc(torch.randn(5), torch.randn(5), ax="left")
    with pytest.raises(ValueError, match="sum to 1"):
        plots.plot_reliability_diagram(torch.ones(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="0 OOD scores"):
        plots.plot_ood_histogram(torch.randn(5), torch.zeros(0))
    # the caller's histogram axes stayed empty, the bars went into a new figure
    with pytest.raises(ValueError, match="`histogram_ax` needs `ax` too"):
        plots.plot_reliability_diagram(torch.full((3, 2), 0.5), torch.zeros(3, dtype=torch.long), histogram_ax=Figure().add_subplot())
    # 40 predictions for 20 inputs reshaped to [20, 2]: every x drawn with another input's prediction
    x = torch.linspace(0, 1, 40)
    prediction = Prediction.from_regression(10 * x.reshape(1, 40, 1).expand(2, 40, 1).clone())
    with pytest.raises(ValueError, match="`x` has 20 inputs but `prediction` is for 40"):
        plots.plot_regression_1d(x[:20], prediction)
    with pytest.raises(ValueError, match=r"`target` must have one row per input of `x` \(20\), got shape \(40,\)"):
        plots.plot_regression_1d(x[:20], prediction[:20], target=x)
    for target in (torch.tensor(1.0), 1.0):  # an IndexError
        with pytest.raises(ValueError, match=r"`target` must have one row per input of `x` \(20\), got shape \(\)"):
            plots.plot_regression_1d(x[:20], prediction[:20], target=target)


@pytest.mark.parametrize("points, location", [(60, 0), (5000, 2)])  # matplotlib's codes: 0 "best", 2 "upper left"
def test_large_figures_place_their_legend_without_searching(points, location):
    # "best" took 6 of the 7 s a 200,000-input regression figure took to save
    x = torch.linspace(-3, 3, points)
    prediction = Prediction.from_regression(torch.sin(x)[None, :, None].expand(3, -1, -1) + 0.01 * torch.randn(3, points, 1), torch.full((3, points, 1), 0.04))
    figures = [plots.plot_regression_1d(x[:, None], prediction, target=torch.sin(x)),
               plots.plot_risk_coverage(-prediction.total_variance.reshape(-1), (torch.sin(x) - prediction.mean.reshape(-1)).square())]
    for figure in figures:
        assert figure.axes[0].get_legend()._loc == location
