"""One call from a trained model (or a ready ``Prediction``) and a test set to every metric and plot that applies.

``evaluate`` runs :func:`bdl.predict` on the test set (and on an out-of-distribution set if given),
computes the metrics of :mod:`bdl.metrics.functional` for the task, and returns a :class:`Report`:
``report.metrics`` is a flat ``{name: float}`` dict, ``report.to_markdown()`` a table, and
``report.save(directory)`` writes ``metrics.json``, ``report.md`` and PNG figures.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from torch.utils.data.dataloader import _InfiniteConstantSampler

from .metrics import functional as M
from .predict import (
    DEFAULT_BATCH_SIZE,
    Prediction,
    _NonFiniteOutput,
    as_loader,
    common_random_numbers,
    numpy_hint,
    outputs_shape,
    predict,
    prediction_device,
)

__all__ = ["Report", "evaluate"]

Data = Union[DataLoader, Dataset, Tensor, Sequence[Tensor], None]

# Display names and sections of the report, in order; a key missing from a report is skipped.
_SECTIONS: dict[str, dict[str, str]] = {
    "Accuracy and proper scores": {
        "accuracy": "accuracy", "nll": "NLL", "brier_score": "Brier score (sum over classes)",
        "rmse": "RMSE", "mae": "MAE", "crps": "CRPS",
    },
    "Calibration": {
        "ece": "ECE", "adaptive_ece": "ECE, equal-mass bins", "mce": "MCE", "classwise_ece": "classwise ECE",
        "overconfidence": "overconfidence (part of ECE)", "underconfidence": "underconfidence (part of ECE)",
        "quantile_calibration_error": "quantile calibration error",
    },
    "Uncertainty": {
        "mean_confidence": "mean confidence", "mean_predictive_entropy": "mean predictive entropy",
        "mean_expected_entropy": "mean expected entropy (aleatoric)",
        "mean_mutual_information": "mean mutual information (epistemic)",
        "mean_aleatoric_variance": "mean aleatoric variance", "mean_epistemic_variance": "mean epistemic variance",
    },
    "Selective prediction": {"aurc": "AURC (max probability)", "excess_aurc": "excess AURC (max probability)"},
}


_OOD_COLUMNS = {"auroc": "AUROC", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out"}

# How each OOD score is computed, for axis labels (every score is oriented so that higher = more OOD).
_SCORE_LABELS = {
    "max_probability": "1 - max probability",
    "predictive_entropy": "predictive entropy",
    "mutual_information": "mutual information",
    "energy": "energy, -logsumexp(logits)",
    "max_logit": "-max logit",
    "total_variance": "total variance",
    "epistemic_variance": "epistemic variance",
}


def _is_prediction(value: Any) -> bool:  # noqa: ANN401
    return isinstance(value, Prediction)


def _split_tensors(data: Any, name: str) -> tuple[Optional[Tensor], Optional[Tensor]]:  # noqa: ANN401
    """``(inputs, targets)`` from a tensor ``x`` or a tuple ``(x,)``, ``(x, y)`` or ``(x, y, ...)`` (as
    :func:`bdl.predict` reads it: the rest ignored); either may be None."""
    if data is None:
        return None, None
    if isinstance(data, Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        return data[0], (data[1] if len(data) >= 2 else None)
    raise TypeError(
        f"`{name}` must be a DataLoader, a Dataset, a tensor of inputs or a tuple (inputs, targets, ...) of tensors, "
        f"got {type(data).__name__}{numpy_hint(data)}"
    )


def _plain(value: Any) -> Any:  # noqa: ANN401 - a setting as evaluate got it
    """A setting as JSON holds it: numpy and torch scalars (``np.float32(0.9)``, which evaluate accepts as a
    number) become Python numbers, tuples and arrays lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _one_dimensional(x: Tensor) -> bool:
    return x.dim() >= 1 and x.reshape(x.shape[0], -1).shape[1] == 1


class _Recorder:
    """Iterates a loader once for :func:`bdl.predict`, keeping the targets and any 1-D inputs on the way.

    One pass keeps inputs, targets and predictions in the same order even for a shuffling loader; inputs
    are kept only when they are 1-D (for the regression figure), so image data is not copied.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.inputs: Optional[list[Tensor]] = []
        self.targets: list[Tensor] = []

    def __iter__(self):  # noqa: ANN204 - yields batches as the loader gives them
        for batch in self.loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
                self.targets.append(batch[1])
            if self.inputs is not None and isinstance(x, Tensor) and _one_dimensional(x):
                self.inputs.append(x.reshape(-1))
            else:
                self.inputs = None
            yield batch

    def tensors(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        inputs = torch.cat(self.inputs) if self.inputs else None
        return inputs, (torch.cat(self.targets) if self.targets else None)


def _loader(data: Any, predict_options: dict[str, Any]) -> Any:  # noqa: ANN401 - a Dataset, or data as it is
    return as_loader(data, predict_options.get("batch_size", DEFAULT_BATCH_SIZE))


@contextlib.contextmanager
def _naming(name: str) -> Iterator[None]:
    """Which data set's inputs gave a non-finite output (the OOD set's alone, say)."""
    try:
        yield
    except _NonFiniteOutput as error:
        raise ValueError(f"{name}: {error}") from None


def _predict(
    model: Any, data: Data, name: str, predict_options: dict[str, Any]  # noqa: ANN401
) -> tuple[Prediction, Optional[Tensor], Optional[Tensor]]:
    """``(prediction, inputs, targets)`` for a model or a ready Prediction and one data set."""
    data = _loader(data, predict_options)
    if _is_prediction(model):
        if isinstance(data, DataLoader):
            sampler = getattr(data, "sampler", None)
            if not isinstance(sampler, (SequentialSampler, _InfiniteConstantSampler)):
                # the prediction is in the data set's order: a shuffled loader's targets belong to other inputs
                raise ValueError(
                    f"`{name}` is a DataLoader with a {type(sampler).__name__}, but a ready Prediction is in the data set's "
                    "order: pass a loader without shuffle (or its data set, or (x, y) tensors)"
                )
            recorder = _Recorder(data)
            for _ in recorder:
                pass
            inputs, targets = recorder.tensors()
        elif isinstance(data, Tensor):
            inputs, targets = None, data  # next to a ready Prediction a bare tensor is its targets
        else:
            inputs, targets = _split_tensors(data, name)
        if targets is None:
            targets = model.targets
        if inputs is not None and len(inputs) != len(model):
            raise ValueError(f"`{name}` has {len(inputs)} inputs but the Prediction is for {len(model)}")
        return model, inputs, targets
    if data is None:
        raise ValueError(f"`{name}` is required when evaluating a model (only a ready Prediction carries its own)")
    if isinstance(data, DataLoader):
        recorder = _Recorder(data)
        prediction = predict(model, recorder, **predict_options)
        inputs, targets = recorder.tensors()
        return prediction, inputs, targets
    inputs, targets = _split_tensors(data, name)
    prediction = predict(model, inputs, **predict_options)
    prediction.targets = targets  # as a loader's batches give it (triage on the report's prediction needs them)
    return prediction, inputs, targets


def _num_examples(prediction: Prediction) -> int:
    return len(prediction)


def _float(value: Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


_percent = M._checks.percent_key  # read back by _key_parts


_PERCENT_KEY = re.compile(r"^(risk_at|coverage_at|interval_coverage|interval_width|fpr_at)_(\d+(?:_\d+)?)(?:_(\w+))?$")


def _key_parts(key: str) -> Optional[tuple[str, str, Optional[str]]]:
    """``(name, percentage, rest)`` of a key that :func:`_percent` wrote: ``"risk_at_92_5_coverage"`` ->
    ``("risk at", "92.5", "coverage")``; None for other keys."""
    match = _PERCENT_KEY.match(key)
    if match is None:
        return None
    name, percent, rest = match.groups()
    return name.replace("_", " "), percent.replace("_", "."), rest


@dataclass(eq=False)  # compared by identity, as Prediction: == of its tensor fields raised "ambiguous"
class Report:
    """The result of :func:`evaluate`: metrics, the predictions they came from, and the figures.

    Attributes:
        task: ``"classification"`` or ``"regression"``.
        metrics: flat ``{name: value}``. Classification: ``accuracy``, ``nll``, ``brier_score``, ``ece``,
            ``adaptive_ece``, ``mce``, ``classwise_ece``, ``overconfidence``, ``underconfidence``,
            ``mean_confidence``, ``mean_predictive_entropy``, ``mean_expected_entropy``,
            ``mean_mutual_information``, ``aurc``, ``excess_aurc``, ``risk_at_<coverage %>_coverage`` and
            ``coverage_at_<risk %>_risk`` (``risk_at_90_coverage``, ``coverage_at_5_risk`` by default; a
            fraction such as 85.5% writes ``85_5``). Regression: ``rmse``, ``mae``, ``mean_aleatoric_variance``,
            ``mean_epistemic_variance``, ``nll``, ``crps``, ``quantile_calibration_error``, and
            ``interval_coverage_<level %>`` and ``interval_width_<level %>`` per level (50, 90, 95 by default).
            OOD metrics are ``"ood/<score>/<metric>"`` with ``<metric>`` one of ``auroc``, ``aupr_in``,
            ``aupr_out``, ``fpr_at_<tpr %>_tpr`` (``fpr_at_95_tpr``; higher score = more OOD, see
            :mod:`bdl.metrics.functional.ood`).
        prediction: the test-set :class:`~bdl.Prediction`.
        targets: the test targets.
        ood_prediction: the OOD-set Prediction, or None.
        inputs: the test inputs when known (used for the 1-D regression figure), else None.
        settings: the options the metrics were computed with (``n_bins``, ``coverage``, ...).
        notes: remarks on metrics that were left out and why.
        ood_inputs: the OOD inputs when known and 1-D (drawn in the 1-D regression figure), else None.

    Example:
        >>> prediction = Prediction.from_logits(torch.randn(4, 100, 3))  # S=4 samples, N=100, C=3
        >>> report = evaluate(prediction, torch.randint(0, 3, (100,)))
        >>> print(report.to_markdown().splitlines()[2])
        Task: classification; test examples: 100; Monte Carlo samples: 4
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     sorted(path.name for path in report.save(directory).iterdir())
        ['metrics.json', 'reliability_diagram.png', 'report.md', 'risk_coverage.png']
    """

    task: str
    metrics: dict[str, float]
    prediction: Prediction
    targets: Tensor
    ood_prediction: Optional[Prediction] = None
    inputs: Optional[Tensor] = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ood_inputs: Optional[Tensor] = None

    @property
    def ood_scores(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{score name: (scores_in, scores_out)}`` for every OOD score in the report."""
        if self.ood_prediction is None:
            return {}
        return {
            name: (M.ood_score(self.prediction, name), M.ood_score(self.ood_prediction, name))
            for name in self.settings.get("ood_scores", ())
        }

    def to_dict(self) -> dict[str, Any]:
        """What ``metrics.json`` holds: the task, sizes, settings and metrics."""
        return {
            "task": self.task,
            "num_examples": int(self.targets.shape[0]),
            "num_ood_examples": None if self.ood_prediction is None else _num_examples(self.ood_prediction),
            "num_samples": getattr(self.prediction, "num_samples", None),
            "settings": {key: _plain(value) for key, value in self.settings.items()},
            # JSON has no NaN/Inf: an undefined metric is null here (and "n/a" in report.md), never a number.
            "metrics": {key: value if math.isfinite(value) else None for key, value in self.metrics.items()},
            "undefined_metrics": [key for key, value in self.metrics.items() if not math.isfinite(value)],
            "notes": self.notes,
        }

    def to_markdown(self) -> str:
        """The metrics as markdown tables: one per section, OOD detection as scores × metrics."""
        info = self.to_dict()
        lines = [
            "# Evaluation report",
            "",
            f"Task: {self.task}; test examples: {info['num_examples']}; Monte Carlo samples: {info['num_samples']}"
            + ("" if info["num_ood_examples"] is None else f"; OOD examples: {info['num_ood_examples']}"),
        ]
        shown = set()
        sections = {title: dict(names) for title, names in _SECTIONS.items()}
        for key in self.metrics:
            parts = _key_parts(key)
            if parts is None:
                continue
            name, percent, rest = parts
            if key.startswith(("risk_at_", "coverage_at_")):
                sections["Selective prediction"][key] = f"{name} {percent}% {rest} (max probability)"
            elif key.startswith(("interval_coverage_", "interval_width_")):
                sections["Calibration"][key] = f"{name} ({percent}%)"
        for title, names in sections.items():
            rows = [(label, self.metrics[key]) for key, label in names.items() if key in self.metrics]
            shown.update(key for key in names if key in self.metrics)
            if rows:
                lines += ["", f"## {title}", "", "| metric | value |", "|---|---:|"]
                lines += [f"| {label} | {_format(value)} |" for label, value in rows]
        ood_keys = [key for key in self.metrics if key.startswith("ood/")]
        if ood_keys:
            scores = list(dict.fromkeys(key.split("/")[1] for key in ood_keys))
            columns = list(dict.fromkeys(key.split("/")[2] for key in ood_keys))
            lines += [
                "",
                "## OOD detection (higher score = more OOD)",
                "",
                "AUROC and AUPR-out take OOD inputs as the positive class, AUPR-in the in-distribution ones; "
                "FPR at x% TPR is the fraction of OOD inputs accepted when x% of in-distribution inputs are.",
                "",
            ]
            headers = [_OOD_COLUMNS.get(column, column) for column in columns]
            if any(column.startswith("fpr_at_") for column in columns):
                tpr = _key_parts(next(column for column in columns if column.startswith("fpr_at_")))[1]
                headers = [f"FPR at {tpr}% TPR" if header.startswith("fpr_at_") else header for header in headers]
            lines += ["| score | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(columns)]
            for score in scores:
                values = [_format(self.metrics.get(f"ood/{score}/{column}", math.nan)) for column in columns]
                lines.append(f"| {score} | " + " | ".join(values) + " |")
            shown.update(ood_keys)
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {note}" for note in self.notes]
        rest = [key for key in self.metrics if key not in shown]
        if rest:
            lines += ["", "## Other", "", "| metric | value |", "|---|---:|"]
            lines += [f"| {key} | {_format(self.metrics[key])} |" for key in rest]
        return "\n".join(lines) + "\n"

    def figures(self) -> dict[str, Any]:
        """``{file stem: matplotlib Figure}`` of every plot that applies to this report."""
        from . import plots

        figures: dict[str, Any] = {}
        n_bins = self.settings.get("n_bins", 15)
        if self.task == "classification":
            figures["reliability_diagram"] = plots.plot_reliability_diagram(
                self.prediction.probs, self.targets, n_bins=n_bins
            )
            errors = (self.prediction.predicted_class != self.targets).double()
            figures["risk_coverage"] = plots.plot_risk_coverage(
                self.prediction.max_probability, errors, label="max probability"
            )
        elif "quantile_calibration_error" in self.metrics:
            figures["quantile_calibration"] = plots.plot_quantile_calibration(
                self.prediction.mean, self.prediction.total_variance, self.targets
            )
        if self.task == "regression" and self.inputs is not None and _one_dimensional(self.inputs):
            outputs = self.prediction.mean.reshape(len(self.prediction), -1).shape[1]
            ood = self.ood_prediction is not None and self.ood_inputs is not None and _one_dimensional(self.ood_inputs)
            for output in range(outputs):  # one figure per output (only the first was drawn, unlabelled)
                figures["regression_1d" if outputs == 1 else f"regression_1d_output{output}"] = plots.plot_regression_1d(
                    self.inputs.reshape(-1), self.prediction, target=self.targets, output=output,
                    ood_x=self.ood_inputs.reshape(-1) if ood else None, ood_prediction=self.ood_prediction if ood else None,
                )  # fmt: skip
        scores = self.ood_scores
        if scores:
            from matplotlib.figure import Figure

            columns = min(3, len(scores))
            rows = math.ceil(len(scores) / columns)
            grid = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
            axes = grid.subplots(rows, columns, squeeze=False).reshape(-1)
            for ax, (name, (inside, outside)) in zip(axes, scores.items()):
                plots.plot_ood_histogram(inside, outside, score_name=_SCORE_LABELS.get(name, name), ax=ax)
            for ax in axes[len(scores):]:
                ax.set_visible(False)
            figures["ood_histograms"] = grid
            roc = None
            for name, (inside, outside) in scores.items():
                roc = plots.plot_ood_roc(inside, outside, label=name, ax=None if roc is None else roc.axes[0])
            figures["ood_roc"] = roc
        return figures

    def save(self, directory: Union[str, Path]) -> Path:
        """Write ``metrics.json``, ``report.md`` (tables and links to the figures) and one PNG per figure.

        Args:
            directory: created if missing; existing files of the same names are overwritten, and the plots of an
                earlier report that this one has not (an OOD set's, say) are removed.

        Returns:
            The directory, as a ``Path``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "metrics.json").write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        markdown = self.to_markdown()
        figures = self.figures()
        for stale in directory.glob("*.png"):  # an earlier report's plots this one has none of (its OOD plots, say)
            if _FIGURE_STEM.fullmatch(stale.stem) and stale.stem not in figures:
                stale.unlink()
        if figures:
            markdown += "\n## Figures\n\n"
        for stem, figure in figures.items():
            figure.savefig(directory / f"{stem}.png", dpi=110)
            markdown += f"![{stem.replace('_', ' ')}]({stem}.png)\n\n"
        (directory / "report.md").write_text(markdown)
        return directory

    def __str__(self) -> str:
        return self.to_markdown()


# the file stems Report.figures gives its plots (save removes the ones of an earlier report that this one lacks)
_FIGURE_STEM = re.compile(r"reliability_diagram|risk_coverage|quantile_calibration|regression_1d(_output\d+)?|ood_histograms|ood_roc")


def _format(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


def _classification_metrics(
    prediction: Prediction, targets: Tensor, *, n_bins: int, coverage: float, risk: float
) -> dict[str, float]:
    probs = prediction.probs
    errors = (probs.argmax(dim=1) != targets.to(probs.device)).double()
    confidence = probs.max(dim=1).values
    metrics = {
        "accuracy": M.accuracy(probs, targets),
        "nll": M.nll(probs, targets),
        "brier_score": M.brier_score(probs, targets),
        "ece": M.ece(probs, targets, n_bins=n_bins),
        "adaptive_ece": M.adaptive_ece(probs, targets, n_bins=n_bins),
        "mce": M.mce(probs, targets, n_bins=n_bins),
        "classwise_ece": M.classwise_ece(probs, targets, n_bins=n_bins),
        "overconfidence": M.overconfidence(probs, targets, n_bins=n_bins),
        "underconfidence": M.underconfidence(probs, targets, n_bins=n_bins),
        "mean_confidence": confidence.mean(),
        "mean_predictive_entropy": prediction.predictive_entropy.mean(),
        "mean_expected_entropy": prediction.expected_entropy.mean(),
        "mean_mutual_information": prediction.mutual_information.mean(),
        "aurc": M.aurc(confidence, errors),
        "excess_aurc": M.excess_aurc(confidence, errors),
        f"risk_at_{_percent(coverage)}_coverage": M.risk_at_coverage(confidence, errors, coverage=coverage),
        f"coverage_at_{_percent(risk)}_risk": M.coverage_at_risk(confidence, errors, risk=risk),
    }
    return {key: _float(value) for key, value in metrics.items()}


def _regression_metrics(
    prediction: Prediction, targets: Tensor, *, levels: Sequence[float], notes: list[str]
) -> dict[str, float]:
    mean, variance = prediction.mean, prediction.total_variance
    metrics = {
        "rmse": M.rmse(mean, targets),
        "mae": M.mae(mean, targets),
        "mean_aleatoric_variance": prediction.aleatoric_variance.mean(),
        "mean_epistemic_variance": prediction.epistemic_variance.mean(),
    }
    positive = variance > 0
    if not positive.all():
        # some zeros with a variance head (its aleatoric part not 0 everywhere): one that reached 0 (underflow); else a
        # mean-only model, whose samples agree for those inputs
        if positive.any() and bool((prediction.aleatoric_variance != 0).any()):
            notes.append(
                f"the predictive variance is 0 for {int((~positive).sum())} of {variance.numel()} outputs (a predicted "
                "variance that underflowed: a variance head needs a floor, e.g. GaussianHead(min_variance=1e-6)), so "
                "the Gaussian NLL, CRPS, interval and quantile metrics are left out"
            )
        else:
            notes.append(
                f"the predictive variance is zero for {'every input' if not positive.any() else f'{int((~positive).sum())} of {variance.numel()} outputs'}: "
                "the model predicts no variance and its samples agree there (a model that predicts only a mean, or a "
                "variance head that underflowed to 0: give it a floor, e.g. GaussianHead(min_variance=1e-6)), so the "
                "Gaussian NLL, CRPS, interval and quantile metrics are left out"
            )
        return {key: _float(value) for key, value in metrics.items()}
    if not bool((prediction.aleatoric_variance != 0).any()):  # a mean-only MC dropout net: 32% of its 95% intervals held
        notes.append(
            "the aleatoric variance is 0 for every input (the model predicts means only), so the Gaussian NLL, CRPS, "
            "interval and quantile metrics rest on the spread of its samples alone, which leaves out the noise of the "
            "data unless it was scaled to it (bdl.VarianceScaler fitted on validation data); else give the network a "
            "variance head (bdl.GaussianHead, trained with bdl.GaussianNLLLoss), or in bdl.lightning set noise_variance (or noise_variance='learn')"
        )
    nll = M.gaussian_nll(mean, variance, targets)
    if not bool(torch.isfinite(nll)):  # positive variances too small for their errors (1e-45): inf, shown as n/a
        error = (targets.reshape(mean.shape) - mean).square()
        worst = int(torch.argmax(torch.where(error > 0, error / variance, torch.zeros_like(error)).flatten()))
        notes.append(
            f"the Gaussian NLL is infinite: output {worst} (flattened) has a predicted variance of "
            f"{float(variance.flatten()[worst]):.3g} for a squared error of {float(error.flatten()[worst]):.3g}"
        )
    metrics.update(
        nll=nll,
        crps=M.crps_gaussian(mean, variance, targets),
        quantile_calibration_error=M.quantile_calibration_error(mean, variance, targets),
    )
    for level in levels:
        metrics[f"interval_coverage_{_percent(level)}"] = M.interval_coverage(mean, variance, targets, level=level)
        metrics[f"interval_width_{_percent(level)}"] = M.interval_width(variance, level=level)
    return {key: _float(value) for key, value in metrics.items()}


_EPISTEMIC_SCORES = ("mutual_information", "epistemic_variance")


def _default_scores(prediction: Prediction, ood_prediction: Prediction, notes: list[str]) -> list[str]:
    """The OOD scores the predictions allow; a note in ``notes`` for each left out (a report without an OOD table
    and without a word of why read as if OOD detection had not been asked for)."""
    names = M.scores_for_task(prediction.task)
    if prediction.logits is None or ood_prediction.logits is None:
        left = [name for name in names if name in M.LOGIT_SCORES]
        names = [name for name in names if name not in M.LOGIT_SCORES]
        if left:
            notes.append(f"OOD scores {', '.join(left)} left out: they need logits, and the predictions hold only probabilities")
    # one sample, or samples all equal (a deterministic model), has no epistemic part: a score that is 0 for
    # every input would report chance (AUROC 0.5) as if it had been measured; so would any score that is the same
    # for every input (the total variance of a mean-only network with a fixed noise variance)
    kept = [name for name in names if name not in _EPISTEMIC_SCORES or _varies(name, prediction, ood_prediction)]
    for name in names:
        if name not in kept:
            notes.append(f"OOD score {name} left out: the model has no epistemic part here (one sample, or every sample equal)")
    constant = [name for name in kept if _constant(name, prediction, ood_prediction)]
    if constant:
        notes.append(
            f"OOD scores {', '.join(constant)} left out: the same for every test and OOD input, so they cannot tell them apart"
        )
    return [name for name in kept if name not in constant]


def _constant(score: str, prediction: Prediction, ood_prediction: Prediction) -> bool:
    values = torch.cat([M.ood_score(prediction, score).reshape(-1), M.ood_score(ood_prediction, score).reshape(-1).to(prediction_device(prediction))])
    return bool((values == values[0]).all())


def _varies(score: str, prediction: Prediction, ood_prediction: Prediction) -> bool:
    if prediction.num_samples == 1 and ood_prediction.num_samples == 1:
        return False
    return any(bool((M.ood_score(p, score) != 0).any()) for p in (prediction, ood_prediction))


def _ood_prediction(
    model: Any, ood_data: Any, predict_options: dict[str, Any]  # noqa: ANN401
) -> tuple[Prediction, Optional[Tensor]]:
    """The OOD set's prediction, and its inputs where they are 1-D (for the regression figure)."""
    if _is_prediction(ood_data):
        return ood_data, None
    if _is_prediction(model):
        raise TypeError(
            "with a ready Prediction for the test set, `ood_data` must be a Prediction too, "
            f"got {type(ood_data).__name__}"
        )
    prediction, inputs, _ = _predict(model, ood_data, "ood_data", predict_options)
    return prediction, inputs if inputs is not None and _one_dimensional(inputs) else None


# the keyword arguments evaluate passes on to bdl.predict
_PREDICT_OPTIONS = frozenset(inspect.signature(predict).parameters) - {"model", "inputs", "num_samples", "task"}


def evaluate(
    model: Any,  # noqa: ANN401 - anything bdl.predict accepts, or a Prediction
    test_data: Data = None,
    ood_data: Any = None,  # noqa: ANN401 - data, or a Prediction
    *,
    num_samples: Optional[int] = None,
    task: Optional[str] = None,
    n_bins: int = 15,
    ood_scores: Optional[Sequence[str]] = None,
    coverage: float = 0.9,
    risk: float = 0.05,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
    tpr: float = 0.95,
    **predict_options: Any,
) -> Report:
    """Every metric that applies to ``model`` on ``test_data`` (and OOD detection against ``ood_data``), in one report.

    Classification: accuracy, NLL, Brier score, ECE (equal-width and equal-mass bins), MCE, classwise ECE,
    over/underconfidence, mean uncertainties, AURC, excess AURC, risk at ``coverage`` and coverage at
    ``risk`` (confidence = max probability, loss = 0/1 error). Regression: RMSE, MAE, and with a positive
    predictive variance Gaussian NLL, CRPS, interval coverage (PICP) and width at ``levels``, and the
    quantile calibration error, all from the total (aleatoric + epistemic) variance: of the Gaussian
    ``N(mean, total_variance)`` matched to the samples' moments, not of the mixture of the samples' Gaussians
    (where the samples disagree, a bimodal predictive, the two NLLs can differ by far). With ``ood_data``:
    AUROC, AUPR-in, AUPR-out and FPR at ``tpr`` for every score in ``ood_scores``, named
    ``"ood/<score>/<metric>"`` (scores from :data:`bdl.metrics.OOD_SCORES`, higher = more OOD).

    Args:
        model: a model that :func:`bdl.predict` accepts, or a ready :class:`~bdl.Prediction` for the test
            set (e.g. from a Pyro engine).
        test_data: a DataLoader of ``(x, y)`` batches, a Dataset of ``(x, y)`` examples (read in order,
            ``batch_size`` at a time) or a pair ``(x, y)`` of tensors. With a ready Prediction: the
            targets alone, a pair ``(x, y)`` (``x`` is used only for the 1-D regression figure), a
            DataLoader or Dataset, or None when ``Prediction.targets`` is set.
        ood_data: out-of-distribution inputs (a tensor, a DataLoader, a Dataset, or ``(x, ...)``), or a ready
            Prediction for them (required when ``model`` is a Prediction). Labels, if any, are ignored. Their
            Monte Carlo draws start from the random state the test set's started from
            (:func:`bdl.common_random_numbers`): where a batch's inputs share their draws (the weight samples of
            Bayesian layers in :func:`bdl.predict`'s loop), the two sets compare under the same draws, not two
            sets of them (a Bayesian CNN trained 2 epochs on digits, S=32, its test set against itself as the
            OOD set: mutual-information AUROC 0.45-0.57 over 6 seeds with fresh draws, 0.5 with these).
        num_samples: Monte Carlo samples S per input; None leaves the choice to :func:`bdl.predict` (one
            per member for a deep ensemble, else 32). Not used for ready Predictions.
        task: ``"classification"`` or ``"regression"`` (taken from ready Predictions); None: classification, or
            a ``bdl.lightning`` module's task.
        n_bins: bins of the calibration metrics and the reliability diagram.
        ood_scores: OOD score names; default every score the task allows (energy and max logit only when
            both predictions have logits; mutual information and epistemic variance only when they are not 0
            for every input, as for one sample or a deterministic model).
        coverage: the coverage of "risk at coverage".
        risk: the risk of "coverage at risk".
        levels: central-interval levels for regression coverage and width.
        tpr: fraction of in-distribution inputs accepted for the FPR metric.
        **predict_options: passed on to :func:`bdl.predict` (e.g. ``batch_size``).

    Returns:
        A :class:`Report`.

    Example:
        >>> model = nn.Sequential(BayesLinear(4, 16), nn.ReLU(), BayesLinear(16, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> report = evaluate(model, (x, y), ood_data=4 * torch.randn(32, 4), num_samples=4)
        >>> report.metrics["accuracy"] == bdl.metrics.functional.accuracy(report.prediction.probs, y).item()
        True
        >>> sorted(key for key in report.metrics if key.startswith("ood/energy/"))
        ['ood/energy/aupr_in', 'ood/energy/aupr_out', 'ood/energy/auroc', 'ood/energy/fpr_at_95_tpr']
    """
    unknown = sorted(set(predict_options) - _PREDICT_OPTIONS)
    if unknown:  # a ready Prediction ignored them (n_bin=5 left 15 bins); a model's predict blamed itself
        raise TypeError(
            f"evaluate() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: neither its own nor "
            f"bdl.predict's ({', '.join(sorted(_PREDICT_OPTIONS))})"
        )
    predict_options = {"num_samples": num_samples, "task": task, **predict_options}
    ood_prediction = ood_inputs = None
    with common_random_numbers():  # the OOD set's draws: the test set's
        with _naming("test_data"):
            prediction, inputs, targets = _predict(model, test_data, "test_data", predict_options)
        if targets is None:
            raise ValueError(
                "no test targets: pass `test_data` as (x, y) or as a DataLoader of (x, y) batches "
                "(or a ready Prediction with `targets` set)"
            )
        if task is not None and task != prediction.task:  # a ready Prediction's task was kept, the argument ignored
            raise ValueError(f"task={task!r} was given, but the prediction is a {prediction.task} one")
        task = prediction.task
        device = (prediction.probs if task == "classification" else prediction.mean).device
        targets = M._checks.as_tensor(targets, "test targets").to(device)
        if task == "classification" and targets.is_floating_point() and not bool(targets.isfinite().all()):
            bad = (~targets.isfinite()).reshape(targets.shape[0] if targets.dim() else 1, -1).any(1).nonzero()[:, 0]
            raise ValueError(
                f"`test targets` must be class labels, got NaN or inf in {len(bad)} of {targets.shape[0] if targets.dim() else 1} rows, the first "
                f"at row {int(bad[0])}: drop those examples"
            )
        if task == "classification" and targets.is_floating_point() and bool((targets != targets.round()).any()):
            # "must hold integer class labels" did not say why a regression was taken for a classification
            raise TypeError(
                f"`test targets` must hold integer class labels, got dtype {targets.dtype} with fractional values: for a "
                "regression model pass task='regression'"
            )
        settings: dict[str, Any] = {"n_bins": n_bins}
        notes: list[str] = []
        if task == "classification":
            targets = M._checks.as_class_labels(M._checks.as_tensor(targets, "test targets"))  # a binary classifier's 0./1.
            targets = M._checks.check_labels(targets, prediction.probs.shape[1], len(prediction), "test targets")
            settings.update(coverage=coverage, risk=risk)
            metrics = _classification_metrics(prediction, targets, n_bins=n_bins, coverage=coverage, risk=risk)
        else:
            targets = M._checks.targets_like(targets, prediction.mean, "test targets")  # a shape error named `mean`, `target`
            levels = tuple(M.regression._levels(levels, torch.zeros((), dtype=torch.float64)).tolist())  # a number too
            named = {}
            for level in levels:  # keys name a level to 6 digits: a second level of the same name was dropped silently
                if named.setdefault(_percent(level), level) != level:
                    raise ValueError(f"`levels` {named[_percent(level)]} and {level} both name interval_coverage_{_percent(level)}: pass levels apart")
            settings.update(levels=levels)
            metrics = _regression_metrics(prediction, targets, levels=levels, notes=notes)
        if ood_data is not None:
            with _naming("ood_data"):
                ood_prediction, ood_inputs = _ood_prediction(model, ood_data, predict_options)
    if ood_prediction is not None:
        if ood_prediction.task != task:
            raise ValueError(f"the OOD prediction's task {ood_prediction.task!r} differs from the test task {task!r}")
        ours, theirs = outputs_shape(prediction), outputs_shape(ood_prediction)
        if ours != theirs:  # another model's: its scores (entropies over 7 classes against 3) of another scale
            raise ValueError(
                f"the OOD prediction has outputs of shape {theirs} per input, the test prediction {ours}: "
                "predict both with the same model"
            )
        if isinstance(ood_scores, str):
            ood_scores = [ood_scores]  # one score by name, not one per character
        names = list(ood_scores) if ood_scores is not None else _default_scores(prediction, ood_prediction, notes)
        settings.update(ood_scores=tuple(names), tpr=tpr)
        for name in names:
            values = M.ood_metrics(M.ood_score(prediction, name), M.ood_score(ood_prediction, name), tpr=tpr)
            metrics.update({f"ood/{name}/{key}": value for key, value in values.items()})
    return Report(task, metrics, prediction, targets, ood_prediction, inputs, settings, notes, ood_inputs)
