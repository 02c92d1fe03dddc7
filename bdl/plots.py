"""Figures of uncertainty: reliability diagrams, OOD histograms and ROC curves, risk-coverage, 1-D regression.

Every function takes an optional ``ax`` (a matplotlib ``Axes`` to draw into, so figures compose) and
returns the ``Figure``. Without ``ax`` the figure is a bare ``matplotlib.figure.Figure``, not a pyplot
one: it needs no display, is never shown by accident, and is freed when dropped. Save it with
``fig.savefig("plot.png")``; in a notebook it displays like any figure.

The numbers drawn are those of :mod:`bdl.metrics.functional`, so a plot and a report always agree.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from .metrics import functional as M
from .metrics.functional._checks import as_class_labels, as_tensor, check_float, check_positive_int, check_vector

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn: it took half of `import bdl`'s own time
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_ood_histogram",
    "plot_ood_roc",
    "plot_quantile_calibration",
    "plot_regression_1d",
    "plot_reliability_diagram",
    "plot_risk_coverage",
]

_BLUE, _RED, _ORANGE, _GREY = "#1f77b4", "#d62728", "#ff7f0e", "#7f7f7f"


def _figure(**kwargs: Any) -> Figure:  # noqa: ANN401
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _legend(ax: Axes, points: int, fallback: str) -> None:
    # matplotlib's "best" tests every drawn point against each candidate place: 6 s of a 7 s savefig of the
    # 1-D regression figure at 200,000 inputs
    ax.legend(fontsize="small", loc="best" if points <= 2000 else fallback)


def _axes(ax: Optional[Axes], figsize: tuple[float, float] = (5.0, 4.0)) -> tuple[Figure, Axes]:
    from matplotlib.axes import Axes

    if ax is None:
        figure = _figure(figsize=figsize)
        return figure, figure.add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}")
    try:
        return ax.get_figure(root=True), ax
    except TypeError:  # matplotlib < 3.10 has no `root`; there `ax.figure` is the figure
        return ax.figure, ax


def _numpy(tensor: Tensor) -> Any:  # noqa: ANN401 - a numpy array
    return tensor.detach().double().cpu().numpy()


def plot_reliability_diagram(
    probs: Tensor,
    target: Tensor,
    *,
    n_bins: int = 15,
    ax: Optional[Axes] = None,
    histogram_ax: Optional[Axes] = None,
    title: Optional[str] = "Reliability diagram",
) -> Figure:
    """Accuracy against confidence per equal-width bin, with the gap to the diagonal and a confidence histogram.

    Bars show the accuracy of each bin of top-label confidence; red hatched bars show the gap to the
    bin's mean confidence (hanging above the accuracy bar where the model is overconfident). The ECE
    (:func:`bdl.metrics.functional.ece`) is printed in the corner. Below, a histogram of confidences
    with the mean confidence and the accuracy marked (Guo et al. 2017, Fig. 1).

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].
        n_bins: number of equal-width bins.
        ax: axes for the reliability bars; without it a two-panel figure is made.
        histogram_ax: axes for the confidence histogram; when ``ax`` is given and this is not, no
            histogram is drawn.
        title: title of the reliability panel (None for none).

    Returns:
        The figure.

    Example:
        >>> probs = torch.softmax(3 * torch.randn(500, 4), dim=1)
        >>> target = torch.distributions.Categorical(probs=probs).sample()
        >>> figure = plot_reliability_diagram(probs, target, n_bins=10)
        >>> len(figure.axes)
        2
    """
    target = as_class_labels(as_tensor(target, "target"))  # whole-number floats, as evaluate takes them
    bins = M.calibration_bins(probs, target, n_bins=n_bins)
    probs = torch.as_tensor(probs)  # checked above; an array or nested list as the metrics take it
    error = M.ece(probs, target, n_bins=n_bins).item()
    if ax is None:
        if histogram_ax is not None:  # it was left empty, the bars drawn into a new figure
            raise ValueError("`histogram_ax` needs `ax` too (the reliability bars' axes); pass both, or neither for a new figure")
        figure = _figure(figsize=(5.0, 5.5))
        ax, histogram_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        figure, ax = _axes(ax)
    edges = _numpy(bins.edges)
    width = edges[1] - edges[0]
    centres = edges[:-1] + width / 2
    filled = _numpy(bins.count) > 0
    accuracy = _numpy(bins.accuracy.nan_to_num(0.0))
    confidence = _numpy(bins.confidence.nan_to_num(0.0))
    ax.bar(centres[filled], accuracy[filled], width=width, color=_BLUE, edgecolor="black", linewidth=0.6,
           label="accuracy")
    gap = confidence - accuracy
    ax.bar(centres[filled], gap[filled], bottom=accuracy[filled], width=width, color=_RED, alpha=0.3,
           edgecolor=_RED, hatch="//", linewidth=0.6, label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color=_GREY, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.legend(loc="upper left", fontsize="small")
    ax.text(0.97, 0.04, f"ECE = {error:.3f}\n{n_bins} bins, N = {int(bins.count.sum())}", transform=ax.transAxes,
            ha="right", va="bottom", fontsize="small", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": _GREY})
    if title:
        ax.set_title(title)
    if histogram_ax is None:
        ax.set_xlabel("confidence (max probability)")
        return figure
    counts = _numpy(bins.count) / bins.count.sum().item()
    # the filled bins only, as the accuracy bars: one bar per empty bin made 20,000 bins draw for 19 s
    histogram_ax.bar(centres[filled], counts[filled], width=width, color=_GREY, edgecolor="black", linewidth=0.6)
    mean_confidence = probs.max(dim=1).values.double().mean().item()
    correct = M.accuracy(probs, target).item()
    histogram_ax.axvline(correct, color=_BLUE, linestyle="-", label=f"accuracy {correct:.3f}")
    histogram_ax.axvline(mean_confidence, color=_RED, linestyle="--", label=f"mean confidence {mean_confidence:.3f}")
    histogram_ax.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="fraction")
    histogram_ax.legend(loc="upper left", fontsize="x-small")
    return figure


def plot_ood_histogram(
    scores_in: Tensor,
    scores_out: Tensor,
    *,
    score_name: str = "OOD score",
    bins: int = 40,
    ax: Optional[Axes] = None,
) -> Figure:
    """Overlaid density histograms of an OOD score on in-distribution and OOD inputs, with the AUROC.

    Args:
        scores_in: scores of in-distribution inputs, shape [N_in] (higher = more OOD).
        scores_out: scores of OOD inputs, shape [N_out].
        score_name: label of the x axis.
        bins: number of histogram bins, shared by both sides.
        ax: axes to draw into (a new figure if None).

    Returns:
        The figure.

    Example:
        >>> figure = plot_ood_histogram(torch.randn(300), torch.randn(300) + 2, score_name="entropy")
        >>> figure.axes[0].get_xlabel()
        'entropy'
    """
    bins = check_positive_int(bins, "bins")  # 0 drew empty histograms, 2.5 a torch signature dump (numpy ints are ints)
    area = M.auroc(scores_in, scores_out).item()
    figure, ax = _axes(ax)
    inside, outside = _numpy(torch.as_tensor(scores_in)), _numpy(torch.as_tensor(scores_out))
    low, high = min(inside.min(), outside.min()), max(inside.max(), outside.max())
    # in float64: float32 edges collapse for scores whose spread is below float32's resolution at their size
    # one value only: a bin of width 1, or wider where 1 is below float64's resolution at that value (2^53 and up)
    top = float(high) if high > low else float(low) + max(1.0, abs(float(low)) * 1e-9)
    # a spread that overflows gave NaN edges, and scores near float64's largest number a figure whose axis ticks
    # overflow when it is drawn (8e307 did, 1.7e307 does not): a conservative factor of 10 keeps clear of both
    if not math.isfinite(10 * max(abs(float(low)), abs(top))):
        raise ValueError(
            f"scores_in and scores_out span [{float(low):g}, {top:g}], too close to float64's largest number (1.8e308) "
            "to draw: rescale them"
        )
    edges = torch.linspace(float(low), top, bins + 1, dtype=torch.float64).numpy()
    ax.hist(inside, bins=edges, density=True, histtype="stepfilled", alpha=0.55, color=_BLUE, label=f"in-distribution (N={len(inside)})")
    ax.hist(outside, bins=edges, density=True, histtype="stepfilled", alpha=0.55, color=_ORANGE, label=f"OOD (N={len(outside)})")
    ax.set(xlabel=score_name, ylabel="density", title=f"{score_name}: AUROC = {area:.3f}")
    ax.legend(fontsize="small")
    return figure


def plot_ood_roc(
    scores_in: Tensor,
    scores_out: Tensor,
    *,
    label: Optional[str] = None,
    ax: Optional[Axes] = None,
) -> Figure:
    """ROC curve of OOD detection (OOD positive, higher score = more OOD); reuse ``ax`` to compare scores.

    Args:
        scores_in: scores of in-distribution inputs, shape [N_in].
        scores_out: scores of OOD inputs, shape [N_out].
        label: legend label; the AUROC is appended.
        ax: axes to draw into (a new figure if None).

    Returns:
        The figure.

    Example:
        >>> figure = plot_ood_roc(torch.randn(200), torch.randn(200) + 1, label="entropy")
        >>> plot_ood_roc(torch.randn(200), torch.randn(200) + 2, label="energy", ax=figure.axes[0]) is figure
        True
    """
    fpr, tpr = M.ood_roc_curve(scores_in, scores_out)
    area = torch.trapezoid(tpr, fpr).item()
    figure, ax = _axes(ax, figsize=(4.5, 4.5))
    text = f"AUROC = {area:.3f}" if label is None else f"{label} (AUROC = {area:.3f})"
    ax.plot(_numpy(fpr), _numpy(tpr), label=text)
    if not getattr(ax, "_bdl_roc_diagonal", False):
        ax.plot([0, 1], [0, 1], linestyle=":", color=_GREY, label="chance")
        ax._bdl_roc_diagonal = True  # draw the chance line once per axes
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (in-distribution flagged)",
           ylabel="true positive rate (OOD flagged)", title="OOD detection ROC")
    ax.legend(loc="lower right", fontsize="small")
    return figure


def plot_risk_coverage(
    confidence: Tensor,
    loss: Tensor,
    *,
    label: Optional[str] = None,
    show_oracle: bool = True,
    ax: Optional[Axes] = None,
) -> Figure:
    """Selective risk against coverage (most confident first), with the AURC and the oracle's curve.

    Args:
        confidence: confidence per example, shape [N] (higher = more confident).
        loss: non-negative loss per example, shape [N] (0/1 error for classification).
        label: legend label; the AURC is appended.
        show_oracle: also draw the curve of a confidence that ranks the losses perfectly.
        ax: axes to draw into (a new figure if None).

    Returns:
        The figure.

    Example:
        >>> confidence = torch.rand(400)
        >>> errors = (torch.rand(400) > confidence).float()  # less confident, more often wrong
        >>> figure = plot_risk_coverage(confidence, errors, label="max probability")
        >>> figure.axes[0].get_xlabel()
        'coverage'
    """
    coverage, risk = M.risk_coverage_curve(confidence, loss)
    area = risk.mean().item()
    figure, ax = _axes(ax)
    text = f"AURC = {area:.4f}" if label is None else f"{label} (AURC = {area:.4f})"
    ax.plot(_numpy(coverage), _numpy(risk), label=text)
    if show_oracle:
        losses = check_vector(loss, "loss")
        oracle_coverage, oracle_risk = M.risk_coverage_curve(-losses, losses)
        ax.plot(_numpy(oracle_coverage), _numpy(oracle_risk), linestyle="--", color=_GREY,
                label=f"oracle (AURC = {oracle_risk.mean().item():.4f})")
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage", ylabel="selective risk", title="Risk-coverage curve")
    _legend(ax, len(coverage), "upper left")  # risk grows with coverage: the upper left stays empty
    return figure


def plot_regression_1d(
    x: Tensor,
    prediction: Any,  # noqa: ANN401 - a regression bdl.Prediction
    *,
    target: Optional[Tensor] = None,
    ood_x: Optional[Tensor] = None,
    ood_prediction: Any = None,  # noqa: ANN401 - a regression bdl.Prediction
    level: float = 0.95,
    output: int = 0,
    ax: Optional[Axes] = None,
) -> Figure:
    """Predictive mean of a 1-D regression with central ``level`` bands of the aleatoric and the total variance.

    The inner band uses the aleatoric variance only (noise the model expects in the data), the outer
    band the total variance (aleatoric + epistemic); the difference is the model's own uncertainty,
    which should grow away from the training data. OOD inputs (``ood_x`` with their ``ood_prediction``,
    e.g. inside a gap in the training inputs) join the bands and are marked along the x axis: there the
    test inputs alone drew a straight line across.

    Args:
        x: inputs, shape [N] or [N, 1].
        prediction: a regression :class:`bdl.Prediction` for ``x``.
        target: observed targets, shape [N] or [N, D], drawn as points (optional).
        ood_x: OOD inputs, shape [M] or [M, 1] (optional, with ``ood_prediction``).
        ood_prediction: the regression :class:`bdl.Prediction` for ``ood_x``.
        level: coverage of the bands, in (0, 1).
        output: which output dimension to draw when D > 1.
        ax: axes to draw into (a new figure if None).

    Returns:
        The figure.

    Example:
        >>> from bdl import Prediction
        >>> x = torch.linspace(-3, 3, 50)
        >>> sample_means = torch.stack([torch.sin(x) + 0.1 * s * x for s in range(-2, 3)])[..., None]
        >>> prediction = Prediction.from_regression(sample_means, torch.full_like(sample_means, 0.01))
        >>> figure = plot_regression_1d(x, prediction, target=torch.sin(x))
    """
    x = _inputs_1d(x, prediction, "x", "prediction")
    if (ood_x is None) != (ood_prediction is None):
        raise ValueError("`ood_x` and `ood_prediction` go together: pass both or neither")
    if ood_x is not None:
        ood_x = _inputs_1d(ood_x, ood_prediction, "ood_x", "ood_prediction")
        if ood_prediction.mean.shape[1:] != prediction.mean.shape[1:]:
            raise ValueError(f"`ood_prediction` has outputs {tuple(ood_prediction.mean.shape[1:])}, `prediction` {tuple(prediction.mean.shape[1:])}")
    if target is not None:
        target = check_float(target, "target")
        if target.dim() == 0 or target.shape[0] != len(x):  # (a 0-d target: an IndexError)
            raise ValueError(f"`target` must have one row per input of `x` ({len(x)}), got shape {tuple(target.shape)}")
    outputs = prediction.mean.reshape(len(x), -1).shape[1]
    if isinstance(output, bool) or not isinstance(output, numbers.Integral) or not 0 <= output < outputs:
        raise ValueError(f"`output` must be an int in [0, {outputs - 1}] (the prediction has {outputs} outputs), got {output!r}")
    if target is not None and target.reshape(len(x), -1).shape[1] != outputs:
        raise ValueError(f"`target` must have one value per output ({outputs}) for each input, got shape {tuple(target.shape)}")
    parts = [(x, prediction)] + ([] if ood_x is None else [(ood_x, ood_prediction)])

    def joined(field: str) -> Tensor:  # the test and OOD inputs' values of one output, in the order of `every`
        return torch.cat([getattr(p, field).reshape(len(inputs), -1)[:, output].cpu() for inputs, p in parts])

    every = torch.cat([inputs.cpu() for inputs, _ in parts])
    mean, aleatoric, total = joined("mean"), joined("aleatoric_variance"), joined("total_variance")
    z = M.regression._half_width_factor(level, mean).item()
    order = every.argsort()
    xs = _numpy(every[order])
    figure, ax = _axes(ax, figsize=(6.0, 4.0))
    centre = mean[order]
    # opaque shades of one hue: the dark inner band is the aleatoric part, the light rim the epistemic excess
    bands = ((total, "#c6dbef", "total (aleatoric + epistemic)"), (aleatoric, "#6baed6", "aleatoric"))
    for variance, colour, name in bands:
        half = z * variance[order].clamp_min(0).sqrt()
        ax.fill_between(xs, _numpy(centre - half), _numpy(centre + half), color=colour, linewidth=0,
                        label=f"{100 * level:g}% interval, {name}")
    ax.plot(xs, _numpy(centre), color="black", label="predictive mean")
    if target is not None:
        values = target.reshape(len(x), -1)[:, output]
        ax.scatter(_numpy(x), _numpy(values), s=8, color=_RED, alpha=0.6, label="targets", zorder=3)
    if ood_x is not None:  # a rug at the bottom: where the OOD inputs are, whatever the y range
        ax.plot(_numpy(ood_x), [0.02] * len(ood_x), "|", color="grey", markersize=8, transform=ax.get_xaxis_transform(), label="OOD inputs")
    ax.set(xlabel="x", ylabel="y" if outputs == 1 else f"y[{output}]", title="Predictive distribution" + (f" of output {output}" if outputs > 1 else ""))
    _legend(ax, len(x), "upper left")
    return figure


def _inputs_1d(x: Tensor, prediction: Any, name: str, prediction_name: str) -> Tensor:  # noqa: ANN401
    """``x`` as ``[N]`` after checking it against ``prediction``, a regression Prediction for it."""
    if getattr(prediction, "task", None) != "regression":
        task = getattr(prediction, "task", None)
        raise ValueError(f"`{prediction_name}` must be a regression Prediction, got task={task!r}")
    x = check_float(x, name)
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D inputs of shape [N] or [N, 1], got shape {tuple(x.shape)}")
    # a multiple of N reshaped too, pairing each x with another input's prediction
    if prediction.mean.shape[0] != len(x):
        raise ValueError(f"`{name}` has {len(x)} inputs but `{prediction_name}` is for {prediction.mean.shape[0]}")
    return x


def plot_quantile_calibration(
    mean: Tensor,
    variance: Tensor,
    target: Tensor,
    *,
    levels: Optional[Any] = None,  # noqa: ANN401 - sequence or tensor of levels
    ax: Optional[Axes] = None,
) -> Figure:
    """Observed against nominal quantile level of a Gaussian predictive (regression reliability diagram).

    Args:
        mean: predicted means, shape [N] or [N, D].
        variance: predicted variances (> 0), same shape.
        target: targets, same shape.
        levels: nominal levels in (0, 1); default ``0.05, 0.10, ..., 0.95``.
        ax: axes to draw into (a new figure if None).

    Returns:
        The figure.

    Example:
        >>> figure = plot_quantile_calibration(torch.zeros(500), torch.ones(500), 2 * torch.randn(500))
    """
    nominal, observed = M.quantile_calibration_curve(mean, variance, target, levels=levels)
    error = (observed - nominal).abs().mean().item()
    figure, ax = _axes(ax, figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color=_GREY, label="perfect calibration")
    ax.plot(_numpy(nominal), _numpy(observed), marker="o", color=_BLUE, label=f"model (error = {error:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal quantile level", ylabel="observed frequency",
           title="Quantile calibration")
    ax.legend(loc="upper left", fontsize="small")
    return figure
