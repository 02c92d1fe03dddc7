"""The meeting point of every method: Monte Carlo predictions summarised with their uncertainty.

``predict(model, inputs, num_samples=S)`` draws ``S`` stochastic forward passes (Bayesian layers, MC
dropout masks, ensemble members) and returns a :class:`Prediction`; the Pyro engines build the same
object with its ``from_*`` constructors.

Classification (outputs are logits), with ``p_s`` the class probabilities of sample ``s`` and
``p = 1/S sum_s p_s`` (Gal 2016, sec. 3.3; Depeweg et al. 2018):

- ``predictive_entropy = H[p]`` (total uncertainty),
- ``expected_entropy = 1/S sum_s H[p_s]`` (aleatoric),
- ``mutual_information = H[p] - 1/S sum_s H[p_s]`` (epistemic; >= 0 by Jensen, 0 for a deterministic model).

Regression, with sample means ``m_s`` and predicted variances ``v_s`` (zero when the model predicts only a
mean; Kendall & Gal 2017): ``mean = 1/S sum_s m_s``, ``aleatoric_variance = 1/S sum_s v_s``,
``epistemic_variance = 1/S sum_s (m_s - mean)^2`` (the population variance, ``1/S`` not ``1/(S-1)``), so
``total_variance`` is exactly the variance of the equally weighted mixture of the ``S`` Gaussians (law of
total variance).

Samples are summarised chunk by chunk and batch by batch (Chan et al.'s parallel update of means and sums
of squares), so ``[S, N, C]`` is never held unless ``keep_samples=True``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_internals
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from ._messages import first_few, index_list
from ._tensors import random_state, set_random_state, version_or_none
from ._warn import user_stacklevel
from ._outputs import draw_stacked, output_parts
from .metrics.functional._checks import all_finite, are_probabilities, check_probability_rows
from .nn.convert import deterministic, use_estimator
from .nn.functional import _two_class, gaussian_draw, pre_activation_variance, randn_like
from .nn.layers import BayesianModule, BayesLinear, _sample_once_blocks, _sample_once_draws
from .nn.loss import non_finite_parameters, non_finite_posteriors

TASKS = ("classification", "regression")

SAMPLING_METHODS = ("auto", "loop", "batched")
"""How :func:`predict` draws the ``S`` samples of a model without its own ``sample_outputs``:

- ``"loop"``: ``S`` forward passes in a Python loop (any model; a Bayesian layer draws one weight sample
  per pass, shared by the batch).
- ``"batched"``: one forward pass over the batch repeated ``chunk_size`` times, with every Bayesian layer
  switched to local reparameterisation so each row gets independent noise (for ``BayesLinear`` under
  mean-field this is the exact per-input predictive, Kingma et al. 2015). In an ``nn.Sequential`` the
  deterministic layers before the first stochastic one run once, and a leading ``BayesLinear``
  computes its pre-activation mean and variance once for all samples. Needs a model that treats batch
  rows independently in eval mode (every standard layer does but ``BatchNorm`` without running statistics,
  which is refused) and no Bayesian layer other than ``BayesLinear`` (local reparameterisation of a
  convolution treats output positions as independent, a different distribution). Probe forwards of a few
  rows, once per network, input shape and set of noise-drawing layers, also refuse a network whose output
  for a row depends on the other rows (its noise off: a batch mean subtracted), a ``BayesLinear`` on inputs
  ``[B, T, F]`` (one weight sample serves all ``T`` positions), dropout on a tensor without the batch
  rows (a weight, even one computed from parameters), and noise drawn by layers bdl does not know of (a
  Bayesian layer of another library, ``F.dropout(x, training=True)``: seen as outputs that differ between two
  forwards with bdl's sources off, MC dropout blocks inside the model too), which the samples could share.
  Forward hooks of yours run in these probes too (up to nine
  forwards of 1 to 7 rows built from the input's first rows, some with the layers at their means, on the first
  call for a network and input shape, and again on later calls until a batch of two distinct rows lets the
  row-mixing probe tell): a hook that collects features should skip them, or use ``method="loop"``.
- ``"auto"``: ``"batched"`` where it is exact and was measured faster (see :func:`resolve_method`; the
  probe's refusals fall back to the loop), else ``"loop"``.

Every path gives the same per-input predictive distribution (tests compare them with the posterior's
definition); they differ in the correlations *between* inputs, which a :class:`Prediction` does not use.
"""

# Rows of one batched forward that the default chunk size allows: about 150 MB of activations for a
# 1200-unit MLP in float32 (mean, variance, noise and output of a layer), whatever the batch size.
ROWS_PER_CHUNK = 8192

# On the CPU the default chunk also keeps the largest activation of a batched forward (a module's output)
# within this many bytes, so that a chunk's few live activations stay within glibc's heap (bdl/_malloc.py:
# blocks under 32 MiB, 64 MiB trimmed) and a convolutional network does not hold S copies of its feature
# maps. Measured on the 2-core development VM, MC dropout, S=32 (fresh processes): ResNet-18 on 32x32 inputs
# at batch 128, 8192 rows per chunk took 67.5 s and 5.2 GB more memory, the loop 49.5 s and 0.2 GB; LeNet-5 at
# batch 1024, 3198 against 1685 ms for the loop; 784-1200-1200-10 at batch 1024, chunks of 2 samples (9.4 MB
# activations) 1326 / 1405 ms against 1508 / 1615 ms for 8 (38 MB, 146,000-170,000 page faults per call).
CHUNK_ACTIVATION_BYTES = 12 << 20


# ============================================================================ Prediction
def _entropy(probs: Tensor) -> Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)  # a numpy integer too


_SUMMARY_CHUNK_ELEMENTS = 1 << 26


def _summary_chunks(samples: Tensor, elements: Optional[int] = None) -> tuple[Tensor, ...]:
    """``[S, N, C]`` in chunks of whole samples of about ``elements`` (None: ``_SUMMARY_CHUNK_ELEMENTS``, 64M), as
    :func:`predict` feeds its summaries: summarising every sample at once held ~3x the samples in temporaries
    (+3.7 GB for 1.2 GB of logits; +1.1 GB in chunks, at the same speed; chunks of 16M elements took twice as long)."""
    per_sample = max(1, samples[0].numel()) if len(samples) else 1
    return samples.split(max(1, (_SUMMARY_CHUNK_ELEMENTS if elements is None else elements) // per_sample))


def _row_blocks(samples: Tensor) -> tuple[Tensor, ...]:
    """``[S, N, C]`` as blocks of rows of ``_ROW_BLOCK_ELEMENTS`` per sample, summarised alone (rows are independent):
    the running summary and its merges hold ~10 ``[N, C]`` tensors, so a few samples of many rows peaked at 7x the
    logits (+2.7 GB for 381 MB at S = 1, the QA helper's measurement). :func:`predict` summarises batch by batch."""
    if not len(samples) or samples[0].numel() <= _ROW_BLOCK_ELEMENTS:
        return (samples,)
    return samples.split(max(1, _ROW_BLOCK_ELEMENTS // max(1, samples[0, :1].numel())), dim=1)


_ROW_BLOCK_ELEMENTS = 1 << 22  # 16 MB of float32 per sample and block


def _summarised(samples: Tensor, keep_samples: bool, add: Callable[[Any, Tensor], None]) -> "Prediction":
    """The classification :class:`Prediction` of ``[S, N, C]`` ``samples``, added to a summary by ``add`` (its
    ``add_logits`` or ``add_probs``) block of rows by block, chunk of samples by chunk."""
    blocks = _row_blocks(samples)
    merged: dict[str, Tensor] = {}  # every row's fields, written block by block: Prediction.cat of the blocks' results
    start = num_samples = 0  # held the result twice (5.4x the logits at its peak for one sample of 100,000 x 1000)
    for block in blocks:
        summary = _ClassificationSummary(keep_samples)
        for chunk in _summary_chunks(block):
            add(summary, chunk)
        part = summary.result()
        if len(blocks) == 1:
            return part
        num_samples = part.num_samples
        for item in fields(Prediction):
            value = getattr(part, item.name)
            if isinstance(value, Tensor):
                dim = _row_dim(item.name)
                if item.name not in merged:
                    merged[item.name] = value.new_empty((*value.shape[:dim], samples.shape[1], *value.shape[dim + 1 :]))
                merged[item.name].narrow(dim, start, block.shape[1]).copy_(value)
        start += block.shape[1]
    return Prediction(task="classification", num_samples=num_samples, **merged)


def _row_dim(field_name: str) -> int:
    """The dimension of a :class:`Prediction` field that counts inputs: 1 for kept samples ``[S, N, ...]``, else 0."""
    return 1 if field_name.startswith("sample_") else 0


def _summary_dtype(t: Tensor) -> Tensor:
    # half-precision outputs (autocast) are summarised in float32: entropies of 16-bit probabilities lose digits
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass(repr=False, eq=False)  # == compared tensors field by field and raised; identity, as nn.Module
class Prediction:
    """Monte Carlo predictive distribution for ``N`` inputs, summarised per input.

    Build one with :func:`predict` or the ``from_logits`` / ``from_probs`` / ``from_regression``
    constructors. Fields that do not apply to the task are None. All tensors are on the device they were
    produced on (the model's).

    Classification: ``probs`` [N, C] mean predictive probabilities; ``expected_entropy`` [N] (aleatoric);
    ``predicted_class_variance`` [N], the population variance over samples of the probability of the
    predicted class; ``logits`` [N, C], the mean over samples of the logits (when the model gave logits,
    for energy / max-logit scores); ``sample_probs`` [S, N, C] only if kept. Properties:
    ``predicted_class``, ``max_probability``, ``predictive_entropy`` (total) and ``mutual_information``
    (epistemic), all [N], entropies in nats.

    Regression: ``mean``, ``aleatoric_variance``, ``epistemic_variance`` [N, D]; property
    ``total_variance``; ``sample_means`` (and ``sample_variances`` when the model predicted them)
    [S, N, D] only if kept; :meth:`interval`.

    ``targets`` holds the labels when the inputs came with them (else None). ``torch.save(pred, path)`` saves
    one and ``torch.load(path)`` reads it back.

    Example:
        >>> sample_logits = torch.randn(8, 5, 3)  # S=8 samples, N=5 inputs, C=3 classes
        >>> pred = Prediction.from_logits(sample_logits)
        >>> pred.probs.shape, pred.mutual_information.shape
        (torch.Size([5, 3]), torch.Size([5]))
        >>> bool(torch.allclose(pred.predictive_entropy, pred.expected_entropy + pred.mutual_information))
        True
    """

    task: str
    num_samples: int
    probs: Optional[Tensor] = None
    expected_entropy: Optional[Tensor] = None
    predicted_class_variance: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    sample_probs: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    aleatoric_variance: Optional[Tensor] = None
    epistemic_variance: Optional[Tensor] = None
    sample_means: Optional[Tensor] = None
    sample_variances: Optional[Tensor] = None
    targets: Optional[Tensor] = field(default=None)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_logits(cls, sample_logits: Tensor, keep_samples: bool = False) -> "Prediction":
        """Summarise per-sample logits ``[S, N, C]`` (probabilities by softmax; ``logits`` keeps their mean; ``C = 1``:
        binary log-odds, read as the two-class logits ``(-l/2, l/2)``).

        Example:
            >>> pred = Prediction.from_logits(torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]]))  # S=2 disagree
            >>> pred.probs
            tensor([[0.5000, 0.5000]])
            >>> round(pred.mutual_information.item(), 4)  # ln 2 - H[softmax(2, 0)]
            0.3278
        """
        sample_logits = _check_samples("sample_logits", sample_logits, "[S, N, C] of logits")
        if are_probabilities(sample_logits):  # softmaxed again: flattened towards uniform, a fraction of the MI
            raise ValueError(
                "sample_logits look like probabilities (every row non-negative, summing to 1): pass them to "
                "Prediction.from_probs, or pass the logits"
            )
        return _summarised(_two_class(sample_logits), keep_samples, _ClassificationSummary.add_logits)

    @classmethod
    def from_probs(cls, sample_probs: Tensor, keep_samples: bool = False) -> "Prediction":
        """Summarise per-sample class probabilities ``[S, N, C]`` (each row in [0, 1], summing to 1).

        Example:
            >>> pred = Prediction.from_probs(torch.tensor([[[0.9, 0.1]], [[0.7, 0.3]]]))
            >>> pred.probs, pred.predicted_class_variance
            (tensor([[0.8000, 0.2000]]), tensor([0.0100]))
        """
        sample_probs = _check_samples("sample_probs", sample_probs, "[S, N, C] of probabilities")
        if sample_probs.shape[-1] == 1:  # a sigmoid's p(class 1) failed "rows must sum to 1", and all ones made 1 class
            raise ValueError(
                "sample_probs has one column: for a binary model's p(class 1) pass torch.cat([1 - p, p], -1), or its "
                "logits to Prediction.from_logits, which reads one column as log-odds"
            )
        if sample_probs.numel():
            check_probability_rows(sample_probs, "sample_probs", hint="did you pass logits? use Prediction.from_logits")
        return _summarised(sample_probs, keep_samples, _ClassificationSummary.add_probs)

    @classmethod
    def from_regression(
        cls, sample_means: Tensor, sample_variances: Optional[Tensor] = None, keep_samples: bool = False
    ) -> "Prediction":
        """Summarise per-sample means ``[S, N, D]`` and, for a Gaussian head, predicted variances ``[S, N, D]``.

        ``[S, N]`` is read as ``D = 1``. Without variances the aleatoric part is 0.

        Example:
            >>> means = torch.tensor([[[1.0]], [[3.0]]])  # S=2, N=1, D=1
            >>> pred = Prediction.from_regression(means, torch.full_like(means, 0.5))
            >>> pred.mean, pred.aleatoric_variance, pred.epistemic_variance, pred.total_variance
            (tensor([[2.]]), tensor([[0.5000]]), tensor([[1.]]), tensor([[1.5000]]))
        """
        if isinstance(sample_means, Tensor) and sample_means.dim() == 2:
            sample_means = sample_means.unsqueeze(-1)
        sample_means = _check_samples("sample_means", sample_means, "[S, N, D] or [S, N]")
        if sample_variances is not None:
            if not isinstance(sample_variances, Tensor):
                raise TypeError(f"sample_variances must be a Tensor or None, got {type(sample_variances).__name__}")
            if sample_variances.dim() == 2 and sample_means.shape[-1] == 1:
                sample_variances = sample_variances.unsqueeze(-1)  # [S, N], as the means may be
            # the same shape, not only as many elements: a transposed [S, D, N] would pair values with wrong inputs
            if sample_variances.shape != sample_means.shape:
                raise ValueError(
                    f"sample_variances must have the shape of sample_means {tuple(sample_means.shape)}, "
                    f"got {tuple(sample_variances.shape)}"
                )
            sample_variances = _check_samples("sample_variances", sample_variances, "[S, N, D] or [S, N]")
            if (sample_variances < 0).any():
                raise ValueError("sample_variances must be >= 0")
        summary = _RegressionSummary(keep_samples)
        summary.add(sample_means, sample_variances)
        return summary.result()

    @classmethod
    def cat(cls, parts: Iterable["Prediction"]) -> "Prediction":
        """Concatenate predictions for consecutive sets of inputs (same task and number of samples).

        The optional fields (the kept samples, the mean logits) are kept where every part has them, else None.

        Example:
            >>> a, b = Prediction.from_logits(torch.randn(4, 2, 3)), Prediction.from_logits(torch.randn(4, 5, 3))
            >>> len(Prediction.cat([a, b]))
            7
        """
        parts = list(parts)  # a generator too
        if not parts:
            raise ValueError("parts is empty: nothing to concatenate")
        first = parts[0]
        for part in parts:
            if not isinstance(part, Prediction):
                raise TypeError(f"parts must be Predictions, got {type(part).__name__}")
            if (part.task, part.num_samples) != (first.task, first.num_samples):
                raise ValueError(
                    f"parts must share task and num_samples: got ({part.task!r}, {part.num_samples}) "
                    f"next to ({first.task!r}, {first.num_samples})"
                )
            if outputs_shape(part) != outputs_shape(first):
                raise ValueError(
                    f"parts must predict outputs of one shape: got {outputs_shape(part)} next to {outputs_shape(first)} per input"
                )
        if len({part.targets is None for part in parts}) > 1:  # the labelled parts' targets were dropped silently
            raise ValueError("parts must all have targets or all have none: some have targets and some do not")
        shapes = {tuple(part.targets.shape[1:]) for part in parts if part.targets is not None}
        if len(shapes) > 1:  # torch's "same number of dimensions" error named no part
            raise ValueError(f"parts' targets must have one shape per input, got {sorted(shapes)} (e.g. [N, 1] beside [N])")
        merged: dict[str, Any] = {"task": first.task, "num_samples": first.num_samples}
        for item in fields(cls):
            if item.name in merged:
                continue
            values = [getattr(part, item.name) for part in parts]
            if any(value is None for value in values):
                merged[item.name] = None
            else:
                merged[item.name] = torch.cat(values, dim=_row_dim(item.name))
        return cls(**merged)

    # ------------------------------------------------------------------ classification
    def _need(self, task: str, name: str) -> None:
        if self.task != task:
            raise AttributeError(f"{name} is defined for {task} predictions; this one is a {self.task} prediction")

    @property
    def predicted_class(self) -> Tensor:
        """Class with the highest mean probability, [N]."""
        self._need("classification", "predicted_class")
        return self.probs.argmax(-1)

    @property
    def max_probability(self) -> Tensor:
        """Confidence: the highest mean probability, [N]."""
        self._need("classification", "max_probability")
        return self.probs.max(-1).values

    @property
    def predictive_entropy(self) -> Tensor:
        """Total uncertainty ``H[p] = -sum_c p_c log p_c`` of the mean probabilities, in nats, [N].

        Kept while ``probs`` is unchanged (by its version counter): edit ``probs`` through torch ops, not through
        ``.numpy()`` or ``.data``, which the counter does not see."""
        self._need("classification", "predictive_entropy")
        # kept while probs is the same, unchanged tensor: evaluate reads it 7 times (MI, OOD scores, the report)
        # and while the entropy handed out is unchanged (`h = pred.predictive_entropy; h /= math.log(C)` edited the
        # next read, and the mutual information). Probabilities without a version counter: computed afresh
        probs, cached = self.probs, self.__dict__.get("_entropy_cache")
        if version_or_none(probs) is None:
            return _entropy(probs)
        if cached is None or cached[0] is not probs or cached[1] != (probs._version, version_or_none(cached[2])):
            entropy = _entropy(probs)
            cached = self.__dict__["_entropy_cache"] = (probs, (probs._version, version_or_none(entropy)), entropy)
        # one computed in a torch.inference_mode block has no version counter to see an edit by: a copy
        return cached[2].clone() if version_or_none(cached[2]) is None else cached[2]

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle, torch.save) leaves the entropy cache behind: its tensors' version counters
        # restart, so a cache taken before an in-place edit of probs looked valid again in the copy
        return {key: value for key, value in self.__dict__.items() if key != "_entropy_cache"}

    @property
    def mutual_information(self) -> Tensor:
        """Epistemic uncertainty ``H[p] - 1/S sum_s H[p_s]`` in nats, [N] (float rounding below 0 clipped).

        Exactly 0 for a single sample and for inputs whose samples are all equal (a deterministic model),
        where the two entropies would differ only by rounding.
        """
        self._need("classification", "mutual_information")
        if self.num_samples == 1:
            return torch.zeros_like(self.expected_entropy)
        return (self.predictive_entropy - self.expected_entropy).clamp_min(0)

    # ------------------------------------------------------------------ regression
    @property
    def total_variance(self) -> Tensor:
        """``aleatoric_variance + epistemic_variance``: the variance of the predictive mixture, [N, D]."""
        self._need("regression", "total_variance")
        return self.aleatoric_variance + self.epistemic_variance

    def interval(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Central interval ``mean -/+ z * sqrt(total_variance)``: ``level`` of the mass of the moment-matched Gaussian.

        The predictive, a mixture of ``S`` Gaussians (or of point masses without a variance head), is
        approximated by the Gaussian with its mean and total variance; ``z = Phi^{-1}((1 + level) / 2)``. Of the
        mixture itself the interval holds about ``level`` where the samples agree, and can hold much more or
        less where they split (two samples at -1 and +1 with std 0.1: under 0.1% of the mass in
        ``interval(0.5)``, all of it in ``interval(0.9)``).

        Args:
            level: coverage in (0, 1).

        Returns:
            ``(lower, upper)``, each [N, D].

        Example:
            >>> pred = Prediction.from_regression(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
            >>> pred.interval(0.95)
            (tensor([[-1.9600]]), tensor([[1.9600]]))
        """
        self._need("regression", "interval")
        if not (isinstance(level, numbers.Real) and 0 < level < 1):
            raise ValueError(f"level must be a number in (0, 1), got {level!r}")
        z = math.sqrt(2) * torch.erfinv(torch.tensor(float(level), dtype=torch.float64)).item()
        half = z * self.total_variance.sqrt()
        return self.mean - half, self.mean + half

    # ------------------------------------------------------------------ containers
    def __len__(self) -> int:
        return (self.probs if self.task == "classification" else self.mean).shape[0]

    def __getitem__(self, index: Any) -> "Prediction":  # noqa: ANN401 - any tensor index
        """The prediction for a subset of the inputs (a slice, indices or a boolean mask over ``N``).

        An integer ``i`` selects input ``i`` as a prediction for one input (``N = 1``), like ``[i]``.

        Example:
            >>> pred = Prediction.from_logits(torch.randn(4, 6, 3))
            >>> len(pred[pred.max_probability > 0.0]), len(pred[:2]), len(pred[-1])
            (6, 2, 1)
        """
        if isinstance(index, tuple):  # x[a, b] or x[(a,)]: pred[([0, 1],)] made probs [2, C] beside samples [S, 1, 2, C]
            raise TypeError(f"a Prediction is indexed over its inputs by one index, got a tuple {index!r}")
        if getattr(index, "ndim", None) == 0 and not isinstance(index, numbers.Integral):  # a 0-d tensor or array
            if isinstance(index, Tensor):
                integral = not (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool)
            else:
                integral = getattr(getattr(index, "dtype", None), "kind", "") in ("i", "u")
            if not integral:  # pred[torch.tensor(True)] made probs [1, N, C]
                raise TypeError(f"a Prediction is indexed over its inputs by an int, a slice, indices or a boolean mask, got {index!r}")
            index = int(index)
        if isinstance(index, list):  # indices or a mask as a list: nested lists are a 2-D index
            try:
                index = torch.as_tensor(index) if index else torch.empty(0, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"a Prediction is indexed over its inputs by an int, a slice, indices or a boolean mask, got {index!r}") from None
        if isinstance(index, numbers.Integral) and not isinstance(index, bool):  # numpy's integers too (np.argmax)
            index = int(index)
            if not -len(self) <= index < len(self):
                raise IndexError(f"index {index} is out of range for a prediction of {len(self)} inputs")
            index = [index % len(self)]  # keep the inputs' dimension: every field stays [N, ...]
        elif isinstance(index, (str, bytes, float, bool)) or index is None:  # torch's messages named none of it
            raise TypeError(f"a Prediction is indexed over its inputs by an int, a slice, indices or a boolean mask, got {index!r}")
        elif getattr(index, "ndim", 1) > 1:  # a tensor or an array [1, 2] made probs [1, 2, C]
            raise IndexError(f"a Prediction is indexed over its inputs by one-dimensional indices or a mask, got shape {tuple(index.shape)}")
        elif isinstance(index, slice) and index.step is not None and index.step < 0:  # torch's "step must be greater than zero"
            index = torch.as_tensor(range(len(self))[index], dtype=torch.long)
        values: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Tensor):
                value = value[:, index] if item.name.startswith("sample_") else value[index]
            values[item.name] = value
        return Prediction(**values)

    def to(
        self, device: Union[str, torch.device, torch.dtype, None] = None, dtype: Optional[torch.dtype] = None
    ) -> "Prediction":
        """The prediction with every tensor moved to ``device`` and, given a floating ``dtype``, the floating tensors
        cast to it (class labels stay as they are), as ``Tensor.to`` takes them: ``to("cuda")``,
        ``to(torch.float64)``, ``to(dtype=torch.float64)``, ``to("cpu", torch.float64)``. Tensors already there
        are shared, as ``Tensor.to`` shares them."""
        if isinstance(device, Tensor) or isinstance(dtype, Tensor):  # Tensor.to(other) casts labels too
            raise TypeError("Prediction.to takes a device and/or a dtype, not a tensor")
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(f"Prediction.to takes one dtype, got {device} and dtype={dtype}")
            device, dtype = None, device
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):  # integer probabilities are all 0
            raise TypeError(f"Prediction.to: a dtype must be floating (its values are probabilities, means, variances), got {dtype}")

        def moved(name: str, value: Any) -> Any:  # noqa: ANN401
            if not isinstance(value, Tensor):
                return value
            if device is not None:
                value = value.to(device)
            # float class labels too stay as they are (bfloat16 read 291 as 292)
            label = name == "targets" and self.task == "classification"
            return value.to(dtype) if dtype is not None and value.is_floating_point() and not label else value

        result = Prediction(**{item.name: moved(item.name, getattr(self, item.name)) for item in fields(self)})
        if self.task == "classification" and self.probs is not None and self.expected_entropy is not None:
            # the entropy of the moved probabilities rounds its own way: where the two entropies were equal (a
            # deterministic model's inputs: the summary sets them so), rounding noise came back as mutual information
            # (2e-7 in float64, 8e-3 in bfloat16) and evaluate ranked OOD inputs by it; there they stay equal
            equal = (self.expected_entropy == self.predictive_entropy).to(result.probs.device)
            result.expected_entropy = torch.where(equal, result.predictive_entropy, result.expected_entropy)
        return result

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{item.name}={list(getattr(self, item.name).shape)}"
            for item in fields(self)
            if isinstance(getattr(self, item.name), Tensor)
        )
        return f"Prediction(task={self.task!r}, num_samples={self.num_samples}, {shapes})"


# torch.load's default (weights_only, torch >= 2.6) refused a saved Prediction ("Unsupported global"): its fields are
# tensors, numbers and strings, which that unpickler rebuilds
if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    torch.serialization.add_safe_globals([Prediction])


def _check_samples(name: str, value: Any, expected: str) -> Tensor:  # noqa: ANN401
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor {expected}, got {type(value).__name__}")
    if value.dim() != 3:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    if value.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample (S >= 1), got shape {tuple(value.shape)}")
    if value.shape[2] == 0:  # no classes (argmax failed) or no outputs (every metric NaN)
        raise ValueError(f"{name} must have at least one entry in its last dimension, got shape {tuple(value.shape)}")
    if value.is_meta:
        raise ValueError(f"{name} is on the 'meta' device (a shape without values), got shape {tuple(value.shape)}")
    if not all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN/Inf entries out of {value.numel()}")
    return value


# ============================================================================ streaming summaries
def _merge_moments(
    count: int, mean: Optional[Tensor], m2: Optional[Tensor], samples: Tensor
) -> tuple[int, Tensor, Tensor]:
    """Chan et al. (1979): merge ``(count, mean, sum of squared deviations)`` with a chunk ``[s, ...]``."""
    chunk_count = samples.shape[0]
    chunk_mean = samples.mean(0)
    chunk_m2 = torch.sub(samples, chunk_mean).square_().sum(0)
    if mean is None:
        return chunk_count, chunk_mean, chunk_m2
    total = count + chunk_count
    delta = chunk_mean - mean
    mean = mean + delta * (chunk_count / total)
    m2 = m2 + chunk_m2 + delta.square() * (count * chunk_count / total)
    return total, mean, m2


class _Constancy:
    """Which outputs were the same in every sample so far (``[N, ...]``, reduced over ``dims``), and that sample.

    A deterministic model's S samples are identical, but their averages are not exactly the sample, and the
    entropy of the mean not exactly the mean entropy: left alone, the epistemic parts come out as rounding
    noise (variances ~1e-13, mutual information ~1e-7) that grows with the outputs and so ranks OOD inputs
    (OOD AUROC 0.65 from epistemic variance for an ``nn.Linear``, seen). The summaries use these to make
    them exactly 0.
    """

    def __init__(self, dims: tuple[int, ...]) -> None:
        self.dims = dims
        self.first: Optional[Tensor] = None
        self.constant: Optional[Tensor] = None

    def update(self, samples: Tensor) -> None:
        if self.first is None:
            self.first = samples[0]
        same = (samples == self.first).all(0)
        for dim in self.dims:
            same = same.all(dim)
        self.constant = same if self.constant is None else self.constant & same

    def any(self) -> bool:
        return self.constant is not None and bool(self.constant.any())


_VECTOR_BYTES = {"AVX512": 64, "AVX2": 32, "SVE256": 32}  # by torch.backends.cpu.get_cpu_capability(); else 16


def _classes_first(samples: Tensor) -> bool:
    """Whether to summarise ``[S, N, C]`` as ``[S, C, N]``: on the CPU, for fewer classes than one SIMD register
    holds numbers of the dtype.

    ATen's CPU softmax and its reductions along the last dimension vectorise over that dimension, and fall back
    to scalar loops where it is shorter than a register: the summary of 32 samples of 1024 inputs and 10
    classes took 3.8 ms on an AVX-512 CPU (16 floats a register; 1.3 ms as ``[S, C, N]``, where they vectorise
    over the inputs), 1.1 ms with AVX2 (8 floats; with 2 classes 0.8 against 0.4 ms). From a register's
    length up, the copy into the other layout costs more than it saves (32 classes: 2.7 against 4.4 ms).
    """
    if samples.device.type != "cpu":
        return False
    register = _VECTOR_BYTES.get(torch.backends.cpu.get_cpu_capability(), 16)
    return samples.shape[-1] < register // samples.element_size()


class _ClassificationSummary:
    """Running per-input summaries of class probabilities over chunks of Monte Carlo samples.

    The chunks are summarised in one layout, ``[S, N, C]`` or, for few classes on the CPU, ``[S, C, N]`` (see
    :func:`_classes_first`); :attr:`dim` is the classes' dimension in it, and the running sums are ``[N, C]`` or
    ``[C, N]`` until :meth:`result`.
    """

    def __init__(self, keep_samples: bool) -> None:
        self.keep_samples = keep_samples
        self.dim: Optional[int] = None
        self.constancy = _Constancy(dims=())
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None
        self.entropy_sum: Optional[Tensor] = None
        self.logits_sum: Optional[Tensor] = None
        self.from_logits = True
        self.kept: list[Tensor] = []

    def _in_layout(self, samples: Tensor) -> Tensor:
        samples = _summary_dtype(samples)
        if self.dim is None:  # the first chunk decides
            self.dim = 1 if _classes_first(samples) else 2
            self.constancy.dims = (self.dim - 1,)  # the classes' dimension once the samples' is reduced
        return samples.transpose(1, 2).contiguous() if self.dim == 1 else samples

    def add_logits(self, sample_logits: Tensor) -> None:
        sample_logits = self._in_layout(sample_logits)
        log_probs = sample_logits.log_softmax(self.dim)
        probs = log_probs.exp()
        entropy_sum = torch.mul(probs, log_probs).sum(self.dim).sum(0).neg_()
        chunk_sum = sample_logits.sum(0)
        total = chunk_sum if self.logits_sum is None else self.logits_sum + chunk_sum
        # logits near or past the dtype's range (one check of both: on a GPU each costs a sync)
        if not bool(torch.isfinite(entropy_sum.sum() + total.sum())):
            if not all_finite(entropy_sum):  # log p = -inf where p = 0: 0 * -inf is NaN
                entropy_sum = torch.where(probs > 0, probs * log_probs, 0).sum(self.dim).sum(0).neg_()
            if not all_finite(total) and sample_logits.device.type != "mps":  # the sum overflowed (the mean cannot):
                chunk_sum = sample_logits.double().sum(0)  # in float64 from here on
                total = chunk_sum if self.logits_sum is None else self.logits_sum.double() + chunk_sum
        self._add(probs, entropy_sum)
        self.logits_sum = total

    def add_probs(self, sample_probs: Tensor) -> None:
        half = sample_probs.dtype in (torch.float16, torch.bfloat16)
        sample_probs = self._in_layout(sample_probs)  # a copy in float32 where half
        if half:  # rows that sum to 1 to a bfloat16's rounding (0.2% off), which evaluate's float32 check refused
            sample_probs.div_(sample_probs.sum(self.dim, keepdim=True))
        self.from_logits = False
        self._add(sample_probs, torch.special.xlogy(sample_probs, sample_probs).sum(self.dim).sum(0).neg_())

    def _add(self, probs: Tensor, entropy_sum: Tensor) -> None:
        self.constancy.update(probs)
        self.count, self.mean, self.m2 = _merge_moments(self.count, self.mean, self.m2, probs)
        self.entropy_sum = entropy_sum if self.entropy_sum is None else self.entropy_sum + entropy_sum
        if self.keep_samples:
            self.kept.append(probs)

    def _per_input(self, t: Tensor) -> Tensor:
        """A running ``[C, N]`` or ``[N, C]`` tensor as ``[N, C]``, contiguous."""
        return t.t().contiguous() if self.dim == 1 else t

    def result(self) -> Prediction:
        expected_entropy = self.entropy_sum / self.count
        mean, m2 = self._per_input(self.mean), self._per_input(self.m2)
        if self.constancy.any():  # the same probabilities in every sample: that mean, MI and variance exactly 0
            constant = self.constancy.constant.unsqueeze(-1)
            mean = torch.where(constant, self._per_input(self.constancy.first), mean)
            m2 = m2.masked_fill(constant, 0)
            expected_entropy = torch.where(self.constancy.constant, _entropy(mean), expected_entropy)
        predicted = mean.argmax(-1, keepdim=True)
        samples = torch.cat(self.kept) if self.keep_samples else None
        return Prediction(
            task="classification",
            num_samples=self.count,
            probs=mean,
            expected_entropy=expected_entropy,
            predicted_class_variance=m2.gather(-1, predicted).squeeze(-1) / self.count,
            logits=(self._per_input(self.logits_sum) / self.count).to(mean.dtype) if self.from_logits and self.logits_sum is not None else None,
            sample_probs=samples.transpose(1, 2).contiguous() if samples is not None and self.dim == 1 else samples,
        )


class _RegressionSummary:
    """Running per-input mean, mean predicted variance and variance of the means over sample chunks."""

    def __init__(self, keep_samples: bool) -> None:
        self.keep_samples = keep_samples
        self.constancy = _Constancy(dims=())
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None
        self.variance_sum: Optional[Tensor] = None
        self.kept_means: list[Tensor] = []
        self.kept_variances: list[Tensor] = []

    def add(self, sample_means: Tensor, sample_variances: Optional[Tensor]) -> None:
        sample_means = _summary_dtype(sample_means)
        self.dtype = sample_means.dtype
        # moments in float64 (of the outputs, [s, N, D]: cheap beside the forwards): in float32 the mean and the
        # epistemic variance of outputs far from 0 drifted with the number of chunks (1e4 + N(0, 1), 10,000
        # samples one at a time: 1.5e-3 off)
        wide = torch.float32 if sample_means.device.type == "mps" else torch.float64  # MPS has no float64
        self.constancy.update(sample_means)
        # in pieces of 8M elements: a whole [S, N, D] at once (from_regression's) took 4x its size in float64 copies
        for piece in _summary_chunks(sample_means, 1 << 23):
            self.count, self.mean, self.m2 = _merge_moments(self.count, self.mean, self.m2, piece.to(wide))
        if sample_variances is not None:
            # positive terms: summed in their own dtype (sum(0, dtype=float64) took 30x as long on the CPU), widened
            # where that overflowed (variances near float32's limit, whose mean fits)
            sample_variances = _summary_dtype(sample_variances)
            chunk_sum = sample_variances.sum(0)
            chunk_sum = chunk_sum.to(wide) if all_finite(chunk_sum) else sample_variances.sum(0, dtype=wide)
            self.variance_sum = chunk_sum if self.variance_sum is None else self.variance_sum + chunk_sum
        if self.keep_samples:
            self.kept_means.append(sample_means)
            if sample_variances is not None:
                self.kept_variances.append(sample_variances)

    def result(self) -> Prediction:
        mean, m2 = self.mean.to(self.dtype), (self.m2 / self.count).to(self.dtype)
        if self.constancy.any():  # outputs the same in every sample: that mean, epistemic variance exactly 0
            constant = self.constancy.constant
            mean = torch.where(constant, self.constancy.first, mean)
            m2 = m2.masked_fill(constant, 0)
        aleatoric = torch.zeros_like(mean) if self.variance_sum is None else (self.variance_sum / self.count).to(self.dtype)
        for name, value in (("epistemic variance", m2), ("aleatoric variance", aleatoric), ("total variance", aleatoric + m2)):
            # summed in float64 from finite outputs, it can pass the outputs' dtype's range (float32 means of +-2e19
            # have a variance of 4e38): an infinite variance and interval came back without a word
            if not bool(torch.isfinite(value).all()):
                over = ~torch.isfinite(value)
                raise ValueError(
                    f"the {name} of the model's outputs overflows {self.dtype} (above {torch.finfo(self.dtype).max:.3g}) "
                    f"for {int(over.sum())} of {value.numel()} outputs: use float64 (model.double() and float64 inputs for "
                    "predict; float64 means and variances for Prediction.from_regression)"
                )
        keep_variances = self.keep_samples and len(self.kept_variances) == len(self.kept_means)
        return Prediction(
            task="regression",
            num_samples=self.count,
            mean=mean,
            aleatoric_variance=aleatoric,
            epistemic_variance=m2,
            sample_means=torch.cat(self.kept_means) if self.keep_samples else None,
            sample_variances=torch.cat(self.kept_variances) if keep_variances and self.kept_variances else None,
        )


# ============================================================================ drawing samples
def _stochastic_sources(model: nn.Module) -> tuple[nn.Module, set[nn.Module], contextlib.AbstractContextManager]:
    """``(core model, modules that draw noise, context that switches MC dropout on)``."""
    from .wrappers.mc_dropout import MCDropout

    if isinstance(model, MCDropout):
        sources = set(model.noise_modules)
        core, context = model.model, model.dropout_enabled()
    else:
        sources, core, context = set(), model, contextlib.nullcontext()
    for module in core.modules():
        if isinstance(module, BayesianModule) and not getattr(module, "deterministic", False):
            sources.add(module)
        elif isinstance(module, MCDropout):  # an MC dropout block inside the model: it and its dropout draw noise
            sources.update([module, *module.noise_modules])
    return core, sources, context


def _hooked(module: nn.Module) -> bool:
    """Whether ``module``'s forward hooks (its own, or global ones from ``register_module_forward_hook``) run."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or getattr(_module_internals, "_global_forward_hooks", None)
        or getattr(_module_internals, "_global_forward_pre_hooks", None)
    )


def _plain_sequential(core: nn.Module) -> bool:
    """Whether calling the children of ``core`` in turn is calling ``core``: an ``nn.Sequential`` without a
    ``forward`` of its own and without forward hooks (the batched path then runs its children one by one)."""
    return isinstance(core, nn.Sequential) and type(core).forward is nn.Sequential.forward and not _hooked(core)


def _batched_blocker(model: nn.Module) -> Optional[str]:
    """Why the batched path would not give the per-input predictive of ``model`` (None: it would)."""
    from .wrappers.mc_dropout import MCDropout

    if isinstance(model, MCDropout) and (_hooked(model) or type(model).forward is not MCDropout.forward):
        # the batched path calls the wrapped model itself, inside the wrapper's dropout context
        return f"its {type(model).__name__} wrapper has forward hooks or its own forward, which the batched path would skip"
    _, sources, _ = _stochastic_sources(model)
    for module in sources:
        if isinstance(module, BayesianModule) and not isinstance(module, BayesLinear):
            return (
                f"it has a {type(module).__name__}, whose local reparameterisation treats output positions as "
                "independent (only BayesLinear layers and dropout give each row exact independent noise)"
            )
    if any(hasattr(module, "sample_outputs") for module in model.modules()):
        return "it contains a module with its own sample_outputs (e.g. a DeepEnsemble)"
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            # normalised with the statistics of its batch even in eval mode: of S x B rows, not of B
            return f"it has a {type(module).__name__} without running statistics, which mixes the rows of a batch"
    return None


def _rowwise_blocker(model: nn.Module, x: Tensor) -> Optional[str]:
    """Why the batched path would not draw each row's noise on its own for inputs like ``x`` (None: it would).

    Seen only in a forward: a ``BayesLinear`` on inputs ``[B, T, F]`` (a transformer's tokens), which draws one
    weight sample per call, for every row (one sample must serve all positions of an input), and dropout
    applied to a tensor without the batch rows (on a weight: DropConnect), whose mask the samples would share;
    and a network that mixes the rows of a batch (:func:`_mixes_rows`), whose batched rows would mix the samples.
    A probe draw of one row and ``_PROBE_SAMPLES`` samples under forward pre-hooks, the random state restored,
    once per network, input shape and set of noise-drawing layers (compiled modules run eagerly for it); where
    dropout ran, a second probe with ``_SECOND_PROBE_SAMPLES`` samples: a tensor that holds the rows grows with
    them, a weight (even one computed from parameters, as weight_norm's) does not. None where it cannot tell (a probe that fails: the
    draw itself then raises)."""
    from .wrappers.mc_dropout import DROPOUT_TYPES as DROPOUT_LAYERS

    if not x.shape[0]:  # no rows: probes of nothing (cached, "no unknown noise" took the batched path beside a
        return None  # noise of the user's, and a BayesLinear's "0 rows per input row" refused it for good)
    core, sources, _ = _stochastic_sources(model)
    found = _rowwise_checks.setdefault(core, {})
    # the layers that draw noise are part of the question: the same network inside MCDropout, or with a layer held
    # at its means (bdl.deterministic), drew through other layers than the verdict cached for it alone
    key = _verdict_key(core, sources, x)
    # two verdicts: the row-mixing one (kept once told: a single row, or rows all alike, cannot tell, and the next
    # batch may) and the probe draws' (kept at once)
    mixing_key, noise_key = ("mixes rows", *key), ("unknown noise", *key)
    if mixing_key not in found and not found.get(noise_key):
        noise, mixes = _mixes_rows(core, x, check_noise=noise_key not in found)
        if noise is not None:
            found[noise_key] = noise
        if mixes is not None:
            found[mixing_key] = mixes
    if found.get(noise_key):
        return _UNKNOWN_NOISE
    if found.get(mixing_key):
        return (
            "its output for an input depends on the other rows of the batch (e.g. batch statistics), and the batched "
            "path's rows would mix the samples"
        )
    if key in found:
        return found[key]
    reasons: list[str] = []
    dropout_inputs: list[tuple[nn.Module, int]] = []  # (dropout layer, elements of its input), in call order
    weight_reason = "a dropout layer is applied to a tensor without the batch rows (e.g. a weight), whose mask the samples would share"

    def check(module: nn.Module, args: Any) -> None:  # noqa: ANN401
        first = args[0] if args and isinstance(args[0], Tensor) else None
        if first is None:
            return
        if isinstance(module, BayesLinear) and _sample_once_draws(module) is not None:
            reasons.append(
                "a BayesLinear draws its weights once per forward (bdl.sample_once), for every row of the batch: the "
                "batched path's samples would share that draw"
            )
        elif isinstance(module, BayesLinear) and first.dim() > 2:
            reasons.append(_positions_reason(first))
        elif isinstance(module, BayesLinear) and first.shape[0] != _PROBE_SAMPLES:
            # an input's tokens flattened into rows (x.reshape(-1, H)): each would get its own weight sample
            reasons.append(
                f"a BayesLinear gets {first.shape[0] // _PROBE_SAMPLES or first.shape[0]} rows per input row (e.g. tokens "
                "flattened into rows), and local reparameterisation would give each its own noise where one weight "
                "sample serves them all"
            )
        elif isinstance(module, DROPOUT_LAYERS) and (isinstance(first, nn.Parameter) or isinstance(first._base, nn.Parameter)):
            reasons.append(weight_reason)
        elif isinstance(module, DROPOUT_LAYERS):
            dropout_inputs.append((module, first.numel()))

    hooks = [(m, True, check) for m in sources if isinstance(m, (BayesLinear, DROPOUT_LAYERS))]
    if not _probe_draw(model, x, _PROBE_SAMPLES, hooks):
        return None
    if not reasons and dropout_inputs:
        first_inputs, dropout_inputs = dropout_inputs, []
        hooks = [(m, True, check) for m in sources if isinstance(m, DROPOUT_LAYERS)]
        if not _probe_draw(model, x, _SECOND_PROBE_SAMPLES, hooks):
            return None
        if not _grow_with_rows(first_inputs, dropout_inputs):
            reasons.append(weight_reason)
    found[key] = reasons[0] if reasons else None
    return found[key]


_BATCHED_FAILED = "the model failed on the batched path's rows (the S samples' rows at once)"


@contextlib.contextmanager
def _mc_dropout_off() -> Iterator[None]:
    """MC dropout blocks inside a network left off (as eval mode leaves dropout) in this thread, for a probe."""
    from .wrappers.mc_dropout import DROPOUT_OFF

    token = DROPOUT_OFF.set(True)
    try:
        yield
    finally:
        DROPOUT_OFF.reset(token)


def _verdict_key(core: nn.Module, sources: set[nn.Module], x: Tensor) -> tuple:
    """What a cached verdict for ``core`` holds for: the input row's shape and dtype, the modules drawing noise and
    every module of the network, by weak references (ids are reused: a layer that took the place of a freed one got
    its verdict, and a replaced layer's batch statistics mixed the samples' rows, silently)."""
    return (tuple(x.shape[1:]), x.dtype, frozenset(map(weakref.ref, sources)), tuple(map(weakref.ref, core.modules())))


def _remember_batched_failure(model: nn.Module, x: Tensor) -> None:
    """Note, as :func:`_rowwise_blocker`'s verdict for inputs like ``x``, that the batched path's forward failed."""
    core, sources, _ = _stochastic_sources(model)
    key = _verdict_key(core, sources, x)
    _rowwise_checks.setdefault(core, {})[key] = _BATCHED_FAILED


def _grow_with_rows(first: list[tuple[nn.Module, int]], second: list[tuple[nn.Module, int]]) -> bool:
    """Whether every dropout input of the two probes (``(layer, elements)`` in call order, of ``_PROBE_SAMPLES``
    and ``_SECOND_PROBE_SAMPLES`` rows) holds the rows: its size in proportion to the rows, as an activation's in
    any layout (``[B, E]``, ``[T, B, E]``, tokens flattened into rows), where a weight keeps its size."""
    return len(first) == len(second) and all(
        a is b and size_a * _SECOND_PROBE_SAMPLES == size_b * _PROBE_SAMPLES
        for (a, size_a), (b, size_b) in zip(first, second)
    )


def _eager(model: nn.Module) -> Optional[contextlib.AbstractContextManager]:
    """A context that runs ``model``'s compiled modules eagerly (compiled code would not run a probe's hooks, and
    a probe compiles nothing); None for compiled modules before torch 2.6, where a probe tells nothing. Skipped,
    it let a compiled model's BayesLinear on tokens take the batched path: a third of the variance, no error."""
    from .wrappers.mc_dropout import _holds_compiled_module

    if not _holds_compiled_module(model):
        return contextlib.nullcontext()
    set_stance = getattr(torch.compiler, "set_stance", None)
    return None if set_stance is None else set_stance("force_eager")


def _mixes_rows(core: nn.Module, x: Tensor, *, check_noise: bool = True) -> tuple[Optional[bool], Optional[bool]]:
    """``(draws unknown noise, mixes rows)`` of ``core``, its Bayesian layers at their means and its dropout off (eval
    mode); None where these inputs cannot tell.

    Mixing rows: whether it gives an input's row another output next to another row: a layer that mixes the rows
    of a batch (batch statistics, a batch mean subtracted), whose batched draw would mix the ``S`` samples' rows (a
    loop mixes only the inputs').

    Row 0 of ``x0`` repeated against row 0 of ``x0`` beside copies of ``xk`` (the first row of ``x`` unlike
    ``x0``), and the last row against ``x0`` after copies of ``xk`` (a layer that mixes each row with the rows
    before it, a running mean: row 0 alone showed nothing), each batch a fresh copy (a model may write into its
    input), of ``_PROBE_SAMPLES`` rows (outputs with as many in their first dimension hold the
    rows there; an RNN's ``h_n`` ``[layers, B, H]`` does not, and a batch of 2 beside 2 layers read it as rows).
    The same shapes run the same kernels, so a row-wise network gives the same numbers (a 1-row forward against a
    2-row one rounds differently on GPUs: a bfloat16 network differed by a rounding step), element by element to
    4 rounding steps of the output's precision (or autocast's) times the element's size, at least 1: packed
    sequences and nested-tensor attention size their kernels by the other rows' lengths, and moved an output of
    1e-3 by up to 8e-8. Non-finite entries (a logit masked with -inf) are compared as they are. A mixing smaller
    than that is not seen (in bfloat16, 3% of an output). None where these inputs cannot tell: a single row, or rows
    all alike (no row that is known to be valid to put beside it: ``x0 + 1`` gave a category code past its
    embedding, and a shift a normalising first layer removes), or a forward that fails (the draw itself then
    raises); the batched path is taken and the question waits for a batch that can tell.

    Unknown noise: two forwards of the input's first ``_PROBE_SAMPLES`` rows that differ (NaN beside NaN alike;
    several rows: a first row of zeros hid a bias-free layer's weight noise), with every source bdl knows
    off (MC dropout blocks inside it too, in this thread), or two seeded forwards that differ: a layer of the
    user's that draws its own (a Bayesian layer of another library, ``F.dropout(x, training=True)``), which the
    batched path may share across the samples (one weight draw per forward for all of them; in an
    ``nn.Sequential``, the layers before the first known source run once): the epistemic variance came out 6-20
    times too small. Not checked again (no forwards) where ``check_noise`` is False. MC dropout blocks inside the
    network are off in this thread (:data:`bdl.wrappers.mc_dropout.DROPOUT_OFF`; a block run in another thread, as
    DataParallel's, draws on: taken for noise of the user's, the loop), and the row-mixing forwards start from one
    seed each (in a forked random state), so noise that stays on draws the same for both."""
    x0 = x[:1]
    unlike = next((x[i : i + 1] for i in range(1, x.shape[0]) if not torch.equal(x[i : i + 1], x0)), None)
    if unlike is None and not check_noise:
        return None, None
    eager = _eager(core)
    if eager is None:
        return False, False
    rows = _PROBE_SAMPLES
    ones = (1,) * (x0.dim() - 1)  # repeated, not expanded: a model may write into its input

    def same() -> Tensor:
        return x0.repeat(rows, *ones)

    def other() -> Tensor:
        return torch.cat([x0, unlike.repeat(rows - 1, *ones)])

    def other_first() -> Tensor:  # row x0 last: a layer that mixes each row with the rows before it (a running mean)
        return torch.cat([unlike.repeat(rows - 1, *ones), x0])

    def first_rows() -> Tensor:  # the noise check on several rows: a first row of zeros hid a bias-free layer's noise
        return x[:rows].clone()

    def seeded(batch: Callable[[], Tensor]) -> list[Tensor]:
        # the same draws for batches of one shape: row 0 alone and beside others compare under one mask and one weight
        # draw, whatever noise stays on (an MC dropout block inside the model, a layer of the user's)
        torch.default_generator.manual_seed(0)
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                torch.cuda.manual_seed(0)
        return list(_tensors(core(batch())))

    def attempt(forwards: Callable[[], list[list[Tensor]]]) -> Optional[list[list[Tensor]]]:
        try:
            return forwards()
        except Exception:  # noqa: BLE001 - only a probe
            return None

    with _mc_dropout_off(), eager, deterministic(core), torch.no_grad(), _forked_random_state(x):
        # apart: the input's own rows may run where 7 do not (a model made for its batch size), and that verdict holds
        twice = attempt(lambda: [list(_tensors(core(first_rows()))) for _ in range(2)]) if check_noise else None
        outputs = attempt(lambda: [seeded(same), seeded(same), seeded(other), seeded(other_first)]) if unlike is not None else None
    noise = None if twice is None else any(not _alike(a, b) for a, b in zip(*twice))
    if outputs is None:
        return noise, None
    if noise or any(not _alike(a, b) for a, b in zip(outputs[0], outputs[1])):
        # noise the seed does not reach either (a generator of the model's own, numpy's): the user's, which the
        # batched path may share across samples (cached as "no mixing", it took that path: 7-100x too little variance)
        return True, None
    autocast_eps = torch.finfo(torch.get_autocast_dtype(x.device.type)).eps if torch.is_autocast_enabled(x.device.type) else 0.0
    pairs = [(a, b, 0) for a, b in zip(outputs[0], outputs[2])] + [(a, b, rows - 1) for a, b in zip(outputs[0], outputs[3])]
    for alone, beside, row in pairs:
        if not (alone.dim() and alone.shape[0] == rows and alone.shape == beside.shape) or not alone.numel():
            continue
        a, b = alone[row : row + 1], beside[row : row + 1]
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return noise, True
            continue
        finite = torch.isfinite(a) & torch.isfinite(b)
        odd_a, odd_b = a[~finite], b[~finite]  # -inf beside -inf (a masked logit), NaN beside NaN: alike
        if bool(((odd_a != odd_b) & ~(odd_a.isnan() & odd_b.isnan())).any()):
            return noise, True
        a, b = a[finite].double(), b[finite].double()
        step = 4 * max(torch.finfo(alone.dtype).eps, autocast_eps)
        if bool(((a - b).abs() > step * torch.maximum(a.abs(), b.abs()).clamp_min(1)).any()):
            return noise, True
    return noise, False


def _probe_draw(model: nn.Module, x: Tensor, num_samples: int, hooks: list[tuple[nn.Module, bool, Callable[..., Any]]]) -> bool:
    """A batched draw of ``x[:1]`` with ``num_samples`` samples under ``hooks`` (``(module, pre-hook?, hook)``,
    removed afterwards), the random state restored, compiled modules run eagerly; False where it tells nothing:
    a draw that fails (the real draw then raises the error), or compiled modules before torch 2.6."""
    eager = _eager(model)
    if eager is None:
        return False
    handles = [m.register_forward_pre_hook(_positional(hook), with_kwargs=True) if pre else m.register_forward_hook(hook) for m, pre, hook in hooks]
    try:
        with eager, _forked_random_state(x):
            _batched_samples(model, x[:1], num_samples)
    except Exception:  # noqa: BLE001 - only a probe
        return False
    finally:
        for handle in handles:
            handle.remove()
    return True


@contextlib.contextmanager
def _forked_random_state(x: Tensor) -> Iterator[None]:
    """torch's generators (the CPU's and ``x``'s CUDA device's), numpy's global one and Python's ``random`` put back
    afterwards: a probe's draws of a model's numpy noise moved the first call's stream (with np.random.seed set, the
    first call gave other numbers than the second and third). A generator of the model's own is not reached."""
    import random

    import numpy as np

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _positional(hook: Callable[[nn.Module, tuple[Any, ...]], None]) -> Callable[..., None]:
    """A forward pre-hook (with kwargs) that gives ``hook`` the call's positional inputs, or its first keyword tensor
    where there are none: ``layer(input=h)`` escaped the probes (a BayesLinear on tokens took the batched path)."""

    def call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hook(module, args if args else tuple(value for value in kwargs.values() if isinstance(value, Tensor))[:1])

    return call


def _alike(a: Tensor, b: Tensor) -> bool:
    """Equal tensors, NaN beside NaN too (a NaN input's row: the same output twice, not noise)."""
    if torch.equal(a, b):
        return True
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


_UNKNOWN_NOISE = (
    "it draws noise that bdl does not know of with its Bayesian layers and dropout off (a layer of yours that samples "
    "its own weights, or F.dropout(x, training=True)), which the batched path may share across the samples"
)
_PROBE_SAMPLES = 7  # rows of the probe draw: a weight's first dimension is rarely 7
_SECOND_PROBE_SAMPLES = 3  # rows of the second probe, where dropout ran: what holds the rows shrinks with them

# network -> {(input row shape, dtype): why not row-wise, or None}, as _activation_sizes
_rowwise_checks: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Optional[str]]]" = weakref.WeakKeyDictionary()


def _leading_bayes_linear(core: nn.Module, sources: set[nn.Module]) -> tuple[int, Optional[BayesLinear]]:
    """Index of the first child of a Sequential ``core`` that draws noise, and that child when the batched path
    can share its pre-activation moments across samples (an un-hooked ``BayesLinear``)."""
    children = list(core)
    first = next((i for i, child in enumerate(children) if any(m in sources for m in child.modules())), len(children))
    leading = children[first] if first < len(children) else None
    # a hooked layer (e.g. MC dropout inserted before it) must run through its __call__
    if isinstance(leading, BayesLinear) and not _hooked(leading):
        return first, leading
    return first, None


def resolve_method(model: Callable[..., Any], batch_size: int, method: str = "auto") -> str:
    """The sampling path :func:`predict` takes for ``model`` on batches of ``batch_size`` rows.

    ``"auto"`` picks ``"loop"`` for models without a source of noise (nothing to batch) or where the
    batched path is not exact (see :data:`SAMPLING_METHODS`). Otherwise, from
    ``experiments/benchmark_predict.py`` on a shared 2-core CPU:

    - MC dropout: ``"batched"`` (1.6-4.4x faster than the loop at batch 64, 1.15-1.2x at 1024, for
      784-1200-1200-10 and 64-128-128-10 MLPs).
    - ``BayesLinear`` layers: local reparameterisation costs a second matmul per layer for every row,
      while the loop samples every weight once per forward, which costs about as much as 300 rows of
      matmul per weight. So ``"batched"`` when ``batch_size * V <= 300 * W``, with ``W`` the sampled
      weights and ``V`` those whose variance matmul is not shared across samples (all but a leading
      ``BayesLinear`` of an ``nn.Sequential``), i.e. up to a few hundred rows per batch: 2.8-3.3x faster
      than the loop at batch 64, 1.4-1.7x slower at 1024.
    - On accelerators ``"batched"``: one large launch instead of ``S`` small ones. Measured at S=32 for MLPs at
      batch 64 and 1024, faster than the loop by 2-13x (H200) and 1.1-7.5x (H100) for ``BayesLinear``,
      1.6-5.7x (H200) and 1.6-8.5x (H100) for MC dropout.

    Args:
        model: the model.
        batch_size: rows per input batch.
        method: ``"auto"``, ``"loop"`` or ``"batched"``.

    Returns:
        ``"loop"`` or ``"batched"``.

    Example:
        >>> bnn = nn.Sequential(BayesLinear(4, 8), nn.ReLU(), BayesLinear(8, 2))
        >>> resolve_method(bnn, batch_size=64), resolve_method(bnn, batch_size=4096)
        ('batched', 'loop')
        >>> resolve_method(nn.Linear(4, 2), batch_size=64)  # deterministic: nothing to batch
        'loop'
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method must be one of {list(SAMPLING_METHODS)}, got {method!r}")
    if not isinstance(model, nn.Module):
        if method == "batched":
            raise ValueError("method='batched' needs an nn.Module model")
        return "loop"
    if method == "loop":
        return method
    blocker = _batched_blocker(model)
    if method == "batched":
        if blocker is not None:
            raise ValueError(f"method='batched' would not sample this model exactly: {blocker}; use method='loop'")
        return method
    core, sources, _ = _stochastic_sources(model)
    if blocker is not None or not sources:
        return "loop"
    device = _model_device(model)
    if device is not None and device.type != "cpu":
        return "batched"
    layers = [m for m in sources if isinstance(m, BayesLinear)]
    if not layers:
        return "batched"
    sampled = sum(layer.weight_mu.numel() for layer in layers)
    unshared = sampled
    if _plain_sequential(core):
        _, leading = _leading_bayes_linear(core, sources)
        if leading is not None:
            unshared -= leading.weight_mu.numel()
    return "batched" if batch_size * unshared <= _ROWS_PER_SAMPLED_WEIGHT * sampled else "loop"


# Measured on CPU (experiments/benchmark_predict.py): sampling one weight costs about as much as this many
# rows of its matmul, the break-even between the loop and local reparameterisation of every row.
_ROWS_PER_SAMPLED_WEIGHT = 300


def _map_output(output: Any, fn: Callable[[Tensor], Tensor]) -> Any:  # noqa: ANN401
    parts, rebuild = output_parts(output)
    return rebuild([fn(part) for part in parts])


def _repeat_rows(x: Tensor, num_samples: int) -> Tensor:
    """``[B, ...] -> [S * B, ...]``: the batch repeated ``S`` times, sample-major."""
    return x.unsqueeze(0).expand(num_samples, *x.shape).reshape(num_samples * x.shape[0], *x.shape[1:])


def _positions_reason(x: Tensor) -> str:
    return (
        f"a BayesLinear gets {x.dim()}-dimensional inputs (positions beside the rows), which it samples with one weight "
        "draw per call (one must serve all positions of an input): the batched path's samples would share it"
    )


def _local_expand(layer: BayesLinear, x: Tensor, num_samples: int) -> Tensor:
    """``S`` independent local-reparameterisation draws of ``layer(x)`` as ``[S * B, out]``.

    The pre-activation mean ``x mu^T + b`` and variance ``x^2 (std^2)^T + std_b^2`` are the same for every
    sample, so they are computed once for the ``B`` rows; only the noise is drawn ``S`` times.
    """
    layer._check_input(x)  # the layer's forward is bypassed here: same errors for a wrong input
    if x.dim() != 2:
        raise ValueError(_positions_reason(x))  # the probe refuses it before a draw where it can (_rowwise_blocker)
    mean = nn.functional.linear(x, layer.weight_mu, layer.bias_mu)
    bias_var = None if layer.bias_rho is None else layer._prediction_scale("bias", layer.bias_rho, variance=True)
    var = pre_activation_variance(nn.functional.linear, x, layer._prediction_scale("weight", layer.weight_rho, variance=True), bias_var)
    noise = randn_like(mean.unsqueeze(0).expand(num_samples, *mean.shape))
    return gaussian_draw(mean, var, noise).reshape(num_samples * x.shape[0], *mean.shape[1:])


def _batched_samples(model: nn.Module, x: Tensor, num_samples: int) -> Any:  # noqa: ANN401
    core, sources, context = _stochastic_sources(model)
    with context, use_estimator(core, "local"):
        h, rest = x, core
        if _plain_sequential(core):
            children = list(core)
            first, leading = _leading_bayes_linear(core, sources)
            for child in children[:first]:
                h = child(h)
            if leading is not None:
                h = _local_expand(leading, h, num_samples)
                first += 1
            else:
                h = _repeat_rows(h, num_samples)
            rest = nn.Sequential(*children[first:])
        else:
            h = _repeat_rows(h, num_samples)
        output = rest(h)
    rows = num_samples * x.shape[0]

    def unflatten(t: Tensor) -> Tensor:
        if t.dim() == 0 or t.shape[0] != rows:
            raise ValueError(
                f"method='batched': the model turned {rows} input rows into an output of shape {tuple(t.shape)}; "
                "it must keep the batch in the first dimension (use method='loop')"
            )
        return t.reshape(num_samples, x.shape[0], *t.shape[1:])

    return _map_output(output, unflatten)


def draw_samples(model: Callable[..., Any], x: Tensor, num_samples: int, *, method: str = "loop") -> Any:  # noqa: ANN401
    """``num_samples`` stochastic outputs of ``model`` on one batch, stacked as ``[S, B, ...]``.

    A model with a ``sample_outputs(x, num_samples)`` method (a :class:`bdl.DeepEnsemble`) draws them
    itself; otherwise ``method`` is ``"loop"`` or ``"batched"`` (see :data:`SAMPLING_METHODS`). Tuple
    outputs such as a :class:`bdl.GaussianHead`'s come back as tuples of stacked tensors.

    Args:
        model: the stochastic model.
        x: one batch of inputs ``[B, ...]`` on the model's device.
        num_samples: ``S`` >= 1.
        method: ``"loop"`` or ``"batched"`` (resolve ``"auto"`` with :func:`resolve_method`).

    Returns:
        The stacked outputs.

    Example:
        >>> bnn = nn.Sequential(BayesLinear(4, 8), nn.ReLU(), BayesLinear(8, 2))
        >>> draw_samples(bnn, torch.randn(5, 4), 3, method="batched").shape
        torch.Size([3, 5, 2])
    """
    sample_outputs = getattr(model, "sample_outputs", None)
    if callable(sample_outputs):
        if not isinstance(model, nn.Module):
            return sample_outputs(x, num_samples)
        from .wrappers.ensemble import DeepEnsemble, ensemble_rounds

        original = getattr(model, "_orig_mod", None)
        if isinstance(original, DeepEnsemble) and type(original).sample_outputs is DeepEnsemble.sample_outputs:
            # a torch.compile wrapper hands out the ensemble's own method, whose calls skipped the compiled graph: its
            # rounds call the wrapper (a subclass's own sample_outputs, which may call super(), runs as it is)
            sample_outputs = functools.partial(ensemble_rounds, model, members=original.num_members)
        with use_estimator(model, "reparam"):  # members' Bayesian convolutions: one weight sample per forward
            return sample_outputs(x, num_samples)
    if method == "batched":
        return _batched_samples(model, x, num_samples)
    if not isinstance(model, nn.Module):
        return draw_stacked(lambda _: model(x), num_samples)
    # One forward is one sample of the weights: "reparam" draws it with one matmul per layer, where "local"
    # and "flipout" (training-time variance reducers) need two; each input's predictive is the same.
    with use_estimator(model, "reparam"):
        return draw_stacked(lambda _: model(x), num_samples)


# ============================================================================ predict
def _model_device(model: Any) -> Optional[torch.device]:  # noqa: ANN401
    if not isinstance(model, nn.Module):
        return None
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


DEFAULT_BATCH_SIZE = 1024  # rows per forward of tensor and Dataset inputs


def as_loader(data: Any, batch_size: int) -> Any:  # noqa: ANN401 - anything; only a Dataset changes
    """A ``Dataset`` (map-style or iterable, e.g. torchvision's ``MNIST``) as a DataLoader of ``batch_size``
    examples in order; any other data as it is. Iterating a Dataset itself gives single examples without
    a batch dimension (for a TensorDataset: until its indexing fails)."""
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        return DataLoader(data, batch_size=batch_size)
    return data


def numpy_hint(value: Any) -> str:  # noqa: ANN401
    """For an error about ``value``: how to pass it, where it is a numpy array or holds one (else ""). numpy's
    default float64 then met a float32 model in torch's "mat1 and mat2 must have the same dtype"."""
    array = type(value).__module__ == "numpy" or (
        isinstance(value, (tuple, list)) and any(type(part).__module__ == "numpy" for part in value)
    )
    return ": convert numpy arrays with torch.from_numpy (and .float() for a float32 model)" if array else ""


def _batches(inputs: Any, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:  # noqa: ANN401
    inputs = as_loader(inputs, batch_size)
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ValueError("inputs must have a batch dimension, got a scalar tensor")
        for start in range(0, inputs.shape[0], batch_size):
            yield inputs[start : start + batch_size], None
        return
    if isinstance(inputs, tuple) and inputs and isinstance(inputs[0], Tensor):
        x, y = inputs[0], (inputs[1] if len(inputs) > 1 else None)
        # read as a pair, not as batches (x was predicted, then the next "batch" refused)
        if y is not None and not isinstance(y, Tensor):
            raise TypeError(f"inputs (x, y): y must be a tensor of targets (or None), got {type(y).__name__}{numpy_hint(y)}")
        if y is not None and y.shape[:1] != x.shape[:1]:
            raise ValueError(f"inputs (x, y): x and y must have the same length, got {tuple(x.shape)} and {tuple(y.shape)}")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], None if y is None else y[start : start + batch_size]
        return
    # an array was read as batches of rows; a pair of arrays (scikit-learn's X, y) as batches of two
    hint = numpy_hint(inputs)
    if not isinstance(inputs, Iterable) or hint:
        raise TypeError(
            f"inputs must be a tensor, a tuple (x, y) of tensors, a DataLoader/iterable of batches, or a Dataset, got "
            f"{type(inputs).__name__}{hint}"
        )
    if isinstance(inputs, list) and inputs and all(isinstance(t, Tensor) for t in inputs):
        # [x, y] would be read as two batches (labels fed to the network); evaluate reads it as a pair
        raise TypeError(
            f"inputs is a list of {len(inputs)} tensors, which is ambiguous: pass a tuple (x, y) for inputs with "
            "targets, or iter(batches) / a DataLoader for batches of inputs"
        )
    for batch in inputs:
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            yield batch[0], batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        else:
            raise TypeError(f"batches of inputs must be a tensor or a tuple (x, y, ...), got {type(batch).__name__}")


class _NonFiniteOutput(ValueError):
    """Raised by :func:`_add_output` with the rows ``[B]`` (bool) whose outputs were not finite, for
    :func:`predict` to say which inputs and why."""

    def __init__(self, message: str, rows: Tensor) -> None:
        super().__init__(message)
        self.rows = rows


def _non_finite_rows(output: Tensor) -> Tensor:
    """``[B]`` bool: the inputs whose outputs ``[s, B, ...]`` hold a NaN or an infinity in some sample."""
    return ~torch.isfinite(output).reshape(output.shape[0], output.shape[1], -1).all(-1).all(0)


def _read_in_order(inputs: Any) -> bool:  # noqa: ANN401
    """Whether ``inputs`` are read in their own order (tensors, a Dataset, a loader without shuffling), so that
    the ``k``-th input read is row ``k``; not a shuffling loader's (``loader``: evaluate's recorder of one)."""
    loader = getattr(inputs, "loader", inputs)
    if isinstance(loader, DataLoader):
        batches = loader.batch_sampler  # a custom one may reorder rows whatever loader.sampler says
        if batches is not None and type(batches) is not BatchSampler:
            return False
        return isinstance(loader.sampler if batches is None else batches.sampler, SequentialSampler)
    return isinstance(inputs, (Tensor, tuple, list, Dataset))


def _non_finite_message(error: _NonFiniteOutput, model: Any, x: Tensor, offset: int, in_order: bool) -> str:  # noqa: ANN401
    """``error``'s message, with which inputs (counted across a loader's batches: rows, or positions in a
    shuffling loader's order) and the likely cause: non-finite inputs there, non-finite parameters (training
    diverged), or neither."""
    bad = error.rows.nonzero().flatten().cpu()
    rows = index_list([offset + int(row) for row in bad])
    which = f"rows {rows} of the inputs" if in_order else f"inputs {rows} in the order the loader gave them"
    where = f"for {len(bad)} of the batch's {len(error.rows)} inputs ({which})"
    inputs_bad = x.is_floating_point() and not bool(torch.isfinite(x[bad.to(x.device)]).all())
    params = non_finite_parameters(model) if isinstance(model, nn.Module) else []
    if inputs_bad:
        cause = "those inputs hold NaN or Inf"
    elif params:
        cause = f"the model's parameters are not finite: {first_few(params)} (training may have diverged)"
    else:
        layers = non_finite_posteriors(model) if isinstance(model, nn.Module) else []
        if layers:  # rho = 50: every parameter finite, the draws not (it said "a half-precision activation")
            cause = f"the inputs and the parameters are finite, but the posterior of {first_few(layers)} is not (its KL is infinite: a posterior std that overflowed)"
        else:
            cause = "the inputs and the parameters are finite: a NaN or an overflow in the forward (e.g. the log of a negative value, or a half-precision activation)"
    return f"{error} {where}; {cause}"



def _check_not_one_input(model: Any, x: Tensor) -> None:  # noqa: ANN401
    """Warn of a floating 1-D ``x`` (read as ``N`` scalar inputs) as long as the features of the model's first layer
    with parameters, where that is a linear one: one input without its batch dimension, whose ``N`` outputs
    (``nn.Linear(24, 24)``) were read as ``N`` predictions. A warning: a model may expand scalars into as many
    features itself (registration order is not call order either)."""
    if not isinstance(model, nn.Module) or not x.is_floating_point():  # category codes for an embedding
        return
    first = next((m for m in model.modules() if not list(m.children()) and next(m.parameters(recurse=False), None) is not None), None)
    in_features = getattr(first, "in_features", None)
    if isinstance(in_features, int) and in_features == x.shape[0] > 1:
        warnings.warn(
            f"inputs of shape {tuple(x.shape)} are read as a batch of {x.shape[0]} scalar inputs, and the model's first "
            f"layer ({type(first).__name__}) takes {in_features} features: if x is one input, pass x[None] ([1, {in_features}])",
            stacklevel=user_stacklevel(),
        )


def _add_output(summary: Any, output: Any, task: str, rows: int) -> None:  # noqa: ANN401
    """Validate one chunk of stacked model outputs ``[s, B, ...]`` for ``rows`` inputs and add it to the running summary."""
    if isinstance(output, Mapping):  # e.g. {"logits": ...}, which the loop stacks as an ensemble's members' outputs
        raise TypeError(
            f"the model returned a dict (keys {list(output)}); predict reads logits, a mean, or a (mean, variance) pair: "
            "wrap it in an nn.Module whose forward returns that, e.g. model(x)['logits']"
        )
    for part in output if isinstance(output, (tuple, list)) else (output,):
        # a forward that drops or transposes the batch gave a prediction for other rows than the inputs'
        if isinstance(part, Tensor) and not part.is_floating_point():
            # an int or bool output failed in a softmax or a mean kernel, far from the model
            raise TypeError(f"the model returned {part.dtype} outputs; it must return floating-point logits, means or variances")
        if isinstance(part, Tensor) and (part.dim() < 2 or part.shape[1] != rows):
            got = f"an output of shape {tuple(part.shape[1:])}" if part.dim() >= 2 else "an output without a batch dimension"
            stacked = (
                " (the batch second, as a DeepEnsemble inside another module stacks its members' outputs: predict the ensemble "
                "itself, or scale it with TemperatureScaler.wrap(ensemble))" if part.dim() >= 3 and part.shape[2] == rows else ""
            )
            raise ValueError(
                f"the model returned {got} for a batch of {rows} inputs{stacked}; it must keep the batch in the first "
                "dimension (and the inputs must be a batch [N, ...]: one input x as x[None])"
            )
    if task == "classification":
        if not isinstance(output, Tensor) or output.dim() != 3:
            shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else type(output).__name__
            regression = "; a model that returns (mean, variance), e.g. with a GaussianHead, needs task='regression'" if _pair(output) else ""
            raise ValueError(f"a classification model must return logits [B, C], got {shape}{regression}")
        if not all_finite(output):
            raise _NonFiniteOutput("the model returned non-finite logits (NaN or Inf)", _non_finite_rows(output))
        if summary.count == 0 and are_probabilities(output):
            # read as logits, softmaxed again: probabilities flattened towards uniform, a tenth of the mutual information
            raise ValueError(
                "the model returns probabilities (every row non-negative, summing to 1), and predict reads logits: "
                "drop the final nn.Softmax, or end with nn.LogSoftmax (log-probabilities are logits)"
            )
        summary.add_logits(_two_class(output))
        return
    if isinstance(output, (tuple, list)):
        if len(output) != 2:
            raise ValueError(f"a regression model must return a mean or a (mean, variance) pair, got a {type(output).__name__} of {len(output)}")
        if not _pair(output):  # (mean, None), (mean, (variance,)): stacked as they are, but no pair of tensors
            raise TypeError(
                "a regression model must return a mean or a (mean, variance) pair of tensors, got a pair of "
                f"{type(output[0]).__name__} and {type(output[1]).__name__}"
            )
        means, variances = output
        if means.shape != variances.shape:
            raise ValueError(f"the model's mean and variance differ in shape: {tuple(means.shape[1:])} and {tuple(variances.shape[1:])}")
    else:
        means, variances = output, None
    if means.dim() == 2:  # [s, B]: one target per input
        means = means.unsqueeze(-1)
        variances = None if variances is None else variances.unsqueeze(-1)
    if means.dim() != 3:
        raise ValueError(f"a regression model must return means [B, D] or [B], got {tuple(means.shape[1:])}")
    if not all_finite(means) or (variances is not None and not all_finite(variances)):
        bad = _non_finite_rows(means) if variances is None else _non_finite_rows(means) | _non_finite_rows(variances)
        raise _NonFiniteOutput("the model returned non-finite means or variances (NaN or Inf)", bad)
    if variances is not None and (variances < 0).any():
        raise ValueError("the model returned negative variances")
    summary.add(means, variances)


def _pair(output: Any) -> bool:  # noqa: ANN401
    """Whether ``output`` is a (mean, variance) pair of tensors, as a :class:`GaussianHead` gives."""
    return isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(part, Tensor) for part in output)


def _tensors(output: Any) -> Iterator[Tensor]:  # noqa: ANN401
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for part in output:
            yield from _tensors(part)
    elif isinstance(output, dict):
        for part in output.values():
            yield from _tensors(part)


def _activation_bytes_per_row(model: nn.Module, x: Tensor) -> Optional[int]:
    """The largest output of any submodule of ``model`` for one input row and one sample of the batched path,
    in bytes: a probe forward of ``x[:1]`` under forward hooks, the random state restored afterwards. None
    where it cannot tell: a compiled module (hooks would change its graph) or a probe that fails (the draw
    itself then raises the error)."""
    largest = 0

    def record(module: nn.Module, inputs: Any, output: Any) -> None:  # noqa: ANN401
        nonlocal largest
        for t in _tensors(output):
            largest = max(largest, t.numel() * t.element_size())

    # not on scripted modules, which take no hooks ("register_forward_hook is not supported on ScriptModules")
    hooked = [(m, False, record) for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)]
    return largest if _probe_draw(model, x, 1, hooked) else None


# network -> {(input row shape, dtype): bytes per row or None}: the probe costs a one-row draw (0.4-2.1 ms for
# a 64-128-128-10 MLP on the development VM, up to a fifth of a 32-sample prediction at batch 64), so it runs
# once per network and input shape; keyed by the network inside an MCDropout, which users often wrap anew
# for each call (a network changed in place keeps its old estimate: only the chunk size depends on it)
_activation_sizes: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Optional[int]]]" = weakref.WeakKeyDictionary()


def _default_chunk(model: Any, x: Tensor, num_samples: int, method: str) -> int:  # noqa: ANN401
    """Samples per draw when the user gave no ``chunk_size``: ``ROWS_PER_CHUNK`` rows, and on the CPU's batched
    path at most ``CHUNK_ACTIVATION_BYTES`` for the largest activation."""
    rows = x.shape[0]
    count = max(1, min(num_samples, ROWS_PER_CHUNK // max(rows, 1)))
    if count == 1 or method != "batched" or x.device.type != "cpu" or not isinstance(model, nn.Module) or not rows:
        return count  # (no rows: a probe of nothing, cached as 0 bytes, left the later batches' chunks uncapped)
    sizes = _activation_sizes.setdefault(_stochastic_sources(model)[0], {})
    key = (tuple(x.shape[1:]), x.dtype)
    if key not in sizes:
        sizes[key] = _activation_bytes_per_row(model, x)
    per_row = sizes[key]
    return max(1, min(count, CHUNK_ACTIVATION_BYTES // (per_row * rows))) if per_row else count


def _note(error: BaseException, text: str) -> None:
    """``text`` shown under ``error``'s message (Python 3.11's exception notes; nothing before)."""
    if hasattr(error, "add_note"):
        error.add_note(text)


def _note_dtypes(error: BaseException, model: Any, x: Tensor) -> None:  # noqa: ANN401
    """Under a failed forward whose floating inputs are not of the model's dtype, how to pass them: torch's "mat1 and
    mat2 must have the same dtype" did not say which was which (``torch.from_numpy`` keeps numpy's float64)."""
    if not isinstance(model, nn.Module) or not x.is_floating_point():
        return
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    told = str(error).lower()  # an error of types ("Input type (double) and bias type (float)"), not of shapes
    if dtype is not None and dtype != x.dtype and any(word in told for word in ("dtype", "scalar type", "type (")):
        _note(error, f"bdl.predict: the inputs are {x.dtype} and the model's parameters {dtype}: pass inputs.to({dtype})")


def _draw_or_none(model: Callable[..., Any], x: Tensor, count: int, method: str, may_shrink: bool) -> Any:  # noqa: ANN401
    """:func:`draw_samples`, or None where it ran out of memory and fewer samples at once may fit."""
    try:
        return draw_samples(model, x, count, method=method)
    except torch.OutOfMemoryError:
        if not may_shrink:
            raise
    return None  # outside the handler: the traceback and the tensors its frames hold are released


_call_locks: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_call_locks_guard = threading.Lock()


def _fresh_call_locks() -> None:
    """In a forked child (a DataLoader worker): the locks as new, since a parent thread that held one at the fork
    does not exist here to release it (the child's own predict on the model waited forever)."""
    global _call_locks, _call_locks_guard
    _call_locks, _call_locks_guard = weakref.WeakKeyDictionary(), threading.Lock()


os.register_at_fork(after_in_child=_fresh_call_locks)


def _one_call_at_a_time(model: Any) -> contextlib.AbstractContextManager:  # noqa: ANN401
    """The model's lock: a call switches the model's modes and its layers' settings (eval mode, the estimator,
    MC dropout's switches, an ensemble's vmapped copy) and restores them afterwards, so two threads' calls on one
    model (a server's requests) changed each other's samples (0 mutual information, BatchNorm statistics moved)
    or failed. Re-entrant: a model may predict inside a call."""
    if not isinstance(model, nn.Module):
        return contextlib.nullcontext()
    with _call_locks_guard:
        lock = _call_locks.get(model)
        if lock is None:
            lock = _call_locks[model] = threading.RLock()
    return lock


_common_draws = threading.local()  # a common_random_numbers block's state, per thread: .active, .start


@contextlib.contextmanager
def common_random_numbers() -> Iterator[None]:
    """Inside the block, every :func:`predict` call draws its Monte Carlo samples from the same random numbers.

    Each call's first batch starts from the random state (torch's CPU generator, and CUDA's where in use) that
    the block's first call started from. Where a batch's inputs share their draws (the weight samples of
    Bayesian layers in the loop path), inputs predicted by separate calls then compare under the same ``S``
    networks, as a deep ensemble's members are the same for every input: thresholds picked on validation data
    (:func:`bdl.triage`) or an OOD score compared between two sets carry no difference of draws.
    :func:`bdl.evaluate` predicts its test and OOD sets in such a block; a block around it (or another block)
    joins it. Only the calls' draws repeat: each call after the first gives the random state back as it found it (a
    shuffled loader's order, and draws of your own between the calls, go on as without the block). The block is per
    thread, the generator per process: other threads drawing meanwhile draw from the block's state.

    Example:
        >>> bnn = nn.Sequential(BayesLinear(4, 8), nn.ReLU(), BayesLinear(8, 3))
        >>> x = torch.randn(5, 4)
        >>> with bdl.common_random_numbers():
        ...     first, second = bdl.predict(bnn, x, num_samples=8), bdl.predict(bnn, x, num_samples=8)
        >>> torch.equal(first.probs, second.probs)
        True
    """
    if getattr(_common_draws, "active", False):  # joins the block it is in
        yield
        return
    _common_draws.active, _common_draws.start = True, None
    try:
        yield
    finally:
        _common_draws.active, _common_draws.start = False, None


@contextlib.contextmanager
def _common_draws_of_call() -> Iterator[Callable[[], None]]:
    """A predict call's share of a :func:`common_random_numbers` block: the function it calls before its first draw
    takes the block's random state (the first call keeps its own as the block's); a later call then gives the
    generator back as it found it, so that only its draws repeat (not a shuffled loader's order, nor the caller's
    draws between calls)."""
    found: list[Any] = []

    def start() -> None:
        if getattr(_common_draws, "active", False):
            if _common_draws.start is None:
                _common_draws.start = random_state()
            else:
                found.append(random_state())
                set_random_state(_common_draws.start)

    try:
        yield start
    finally:
        if found:
            set_random_state(found[0])


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:  # noqa: ANN401
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):  # already in eval mode: nothing to switch or restore
        yield
        return
    # nn.Module.train only sets each module's flag, recursively; where no module overrides it, setting the
    # flags directly is the same switch at a quarter of the cost (a 5-member ensemble's 32 modules, switched
    # and restored: 46 against 186-371 us)
    plain = all(type(module).train is nn.Module.train for module, _ in modes)
    set_flag = object.__setattr__ if plain else setattr
    if plain:
        for module, _ in modes:
            set_flag(module, "training", False)
    else:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            if module.training != training:
                set_flag(module, "training", training)


def _is_svi_fit_of_a_pyro_model(model: object) -> bool:
    svi, pyro_model = sys.modules.get("bdl.infer.svi_trainer"), sys.modules.get("bdl.infer.model")
    return svi is not None and isinstance(model, svi.SVIModule) and isinstance(model.model, pyro_model.PyroModel)


def predict(
    model: Callable[..., Any],
    inputs: Union[Tensor, tuple, Iterable, Dataset],
    num_samples: Optional[int] = None,
    task: Optional[str] = None,
    *,
    keep_samples: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: Optional[int] = None,
    method: str = "auto",
) -> Prediction:
    """Monte Carlo predictive distribution of ``model`` on ``inputs``, with its uncertainty.

    ``p(y | x) ~= 1/S sum_s p(y | x, theta_s)``: each of ``S`` stochastic forward passes is one sample
    ``theta_s`` (a Bayesian layer draws fresh weights, an :class:`~bdl.MCDropout` fresh masks, a
    :class:`~bdl.DeepEnsemble` contributes one sample per member). The model runs in eval mode (each
    module's mode is restored afterwards) and under ``torch.no_grad()``, on its own device; inputs are
    moved there. Classification models return logits ``[B, C]`` (``[B, 1]``: one logit per input, as a binary
    classifier trained with ``BCEWithLogitsLoss`` gives, is the log-odds of class 1, read as the two-class
    logits ``(-l/2, l/2)``, so ``P(y=1) = sigmoid(l)``); regression models return means ``[B, D]`` or ``[B]``, or a
    ``(mean, variance)`` pair such as :class:`~bdl.GaussianHead` gives.
    See the module docstring for the uncertainty decomposition.

    Memory: per-input summaries are accumulated batch by batch and ``chunk_size`` samples at a time;
    ``[S, N, C]`` is kept only with ``keep_samples=True``. Half-precision outputs (autocast, a ``.half()`` model)
    are summarised in float32; float64 ones stay float64.

    Threads: calls on one model (a server's requests) run one at a time, since a call switches the model's
    modes and its layers' settings for its draws. Calling the model itself from several threads at once (or
    wrappers such as several ``MCDropout`` around one network) is not covered: serve through ``predict``.

    Args:
        model: the stochastic model (any callable; ``nn.Module`` for the batched path).
        inputs: a tensor ``[N, ...]``, a tuple ``(x, y, ...)`` of tensors (``(x, None)``: no targets), a
            DataLoader / iterable of batches ``x`` or ``(x, y, ...)``, or a ``Dataset`` of examples ``x`` or
            ``(x, y, ...)``.
            Tensors and Datasets are split into ``batch_size`` rows, in order; targets ``y`` are kept in
            ``Prediction.targets``.
        num_samples: Monte Carlo samples ``S``. None: the number of members for a ``DeepEnsemble``
            (a multiple of it gives stochastic members several rounds), else 32. Use 1 for a
            deterministic network.
        task: ``"classification"`` or ``"regression"``; None: classification, or a ``bdl.lightning`` module's task.
        keep_samples: also keep ``sample_probs`` / ``sample_means`` ``[S, N, ...]``.
        batch_size: rows per forward pass for tensor and Dataset inputs.
        chunk_size: samples drawn at once per batch, bounding memory to ``chunk_size x batch`` rows in
            the batched path. None: as many as fit in 8192 rows and, on the CPU's batched path, keep the
            largest activation within 12 MiB (from a probe forward of one row; see
            ``CHUNK_ACTIVATION_BYTES``), at least 1, halved whenever a draw runs out of memory
            (``torch.OutOfMemoryError``, e.g. a convolutional network's activations on a GPU) and kept that
            small for the rest of the call; a given ``chunk_size`` is used as is.
        method: ``"auto"``, ``"loop"`` or ``"batched"`` (see :data:`SAMPLING_METHODS`); all give the same
            distribution. Ignored for models that draw their own samples (ensembles, SVI modules).

    Returns:
        A :class:`Prediction` for all ``N`` inputs, in order.

    Example:
        >>> model = bdl.MCDropout(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3)))
        >>> pred = bdl.predict(model, torch.randn(10, 4), num_samples=30)
        >>> pred.probs.shape, pred.mutual_information.shape
        (torch.Size([10, 3]), torch.Size([10]))
        >>> to_review = pred.mutual_information > 0.05  # route the uncertain ones to a person
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if not callable(model):
        mcmc = sys.modules.get("bdl.infer.mcmc")
        if mcmc is not None and isinstance(model, mcmc.MCMCResult):  # the README's "every method ends in bdl.predict"
            raise TypeError(
                "model is a bdl.infer.MCMCResult, which predicts from its own draws: result.predict(x) gives the "
                "bdl.Prediction (bdl.evaluate(result.predict(x), y) its report)"
            )
        raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method must be one of {list(SAMPLING_METHODS)}, got {method!r}")
    _check_int("batch_size", batch_size)
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size)
    lightning = sys.modules.get("bdl.lightning.modules")  # loaded if the model can be one of its modules
    unwrapped = getattr(model, "_orig_mod", model)  # torch.compile(module) wraps it
    pyro_model = sys.modules.get("bdl.infer.model")
    if pyro_model is not None and isinstance(unwrapped, pyro_model.PyroModel):
        # its forward draws weights from the prior and returns sampled observations: a prior predictive whose noise
        # was read as epistemic variance (RMSE 2.05 against the posterior's 0.107), silently
        raise TypeError(
            "model is a bdl.infer.PyroModel, whose forward draws its weights from the prior: predict from a posterior, "
            "with the fit (bdl.infer.svi(...) or an SVIModule: bdl.predict(fit, x) or fit.predict(x)) or an MCMC "
            "result (result.predict(x); bdl.evaluate(result.predict(x), y))"
        )
    trained = unwrapped if lightning is not None and isinstance(unwrapped, lightning.UncertaintyModule) else None
    if lightning is not None and isinstance(unwrapped, lightning.SVIModule):  # samples itself: its task and count
        if task is not None and task != unwrapped.task:
            raise ValueError(f"task={task!r}, but the model is a {unwrapped.task} module ({type(unwrapped).__name__})")
        task, model = unwrapped.task, unwrapped
        num_samples = unwrapped.num_eval_samples if num_samples is None else num_samples
    elif _is_svi_fit_of_a_pyro_model(unwrapped):
        # bdl.infer.svi's fit of a PyroModel: its likelihood's task (a regression's (mean, variance) was read as logits)
        if task is not None and task != unwrapped.model.task:  # a classifier's logits were read as regression means
            raise ValueError(f"task={task!r}, but the model is a {unwrapped.model.task} fit ({type(unwrapped.model.likelihood).__name__})")
        task = unwrapped.model.task
    if trained is not None:
        # a bdl.lightning module: sample what its own evaluation samples (an EnsembleModule's forward gives the
        # members' stacked outputs [M, B, C], which were read as one output of the wrong batch size), for its
        # task, as many times as it evaluates, with the likelihood it was trained on (a mean-only regressor's
        # noise_variance, below)
        if task is not None and task != trained.task:
            raise ValueError(f"task={task!r}, but the model is a {trained.task} module ({type(trained).__name__})")
        task = trained.task
        num_samples = trained.num_eval_samples if num_samples is None else num_samples
        model = trained.predictive_model
    task_given = task is not None
    task = "classification" if task is None else task
    draws_itself = callable(getattr(model, "sample_outputs", None))
    members = getattr(model, "num_members", None) if draws_itself else None
    if draws_itself:
        method = "loop"  # not one of ours to choose: an SVI module's method='batched' was refused as inexact
    if num_samples is None:
        num_samples = members or 32
    _check_int("num_samples", num_samples)
    if members and num_samples % members:
        raise ValueError(
            f"num_samples must be a multiple of the ensemble's {members} members (each round gives one sample "
            f"per member), got {num_samples}; pass num_samples=None for one per member"
        )
    device = _model_device(model)
    if device is not None and device.type == "meta":
        raise ValueError(
            "model: its parameters are on the 'meta' device (shapes without values), so it cannot predict; "
            "materialise it first, e.g. model.to_empty(device='cpu') and load_state_dict(...)"
        )
    # not for a model that draws its samples itself (SVI, ensembles); then whether the first batch's samples of a model
    # without known noise are one output repeated
    warned = isinstance(model, nn.Module) and num_samples > 1 and not draws_itself and _warn_if_dropout_is_off(model, num_samples)
    repeats = _RepeatCheck(None if warned or draws_itself else model, num_samples)
    if isinstance(model, nn.Module) and _sample_once_blocks[0]:
        inside = [module for module in model.modules() if isinstance(module, BayesianModule) and _sample_once_draws(module) is not None]
        if inside:
            raise ValueError(
                "predict was called inside a bdl.sample_once block that holds the model's Bayesian layers: every sample "
                "would use the block's one draw of the weights; open the block inside the model's forward instead"
            )
    summaries: list[Prediction] = []
    targets: list[Optional[Tensor]] = []
    # per input shape (a loader's batches of other lengths: a chunk fitted to short sequences overran the memory
    # bound 5x on long ones): the path, and the samples per draw (chunk_size, or the default, halved after
    # running out of memory)
    resolved: dict[tuple[int, ...], str] = {}
    fitted: dict[tuple[int, ...], int] = {}
    fits: Optional[int] = None  # input elements x samples that fit at once after running out of memory (all shapes)
    offset = 0  # rows before this batch, for the rows a non-finite output names
    with _one_call_at_a_time(model), torch.no_grad(), _eval_mode(model), _common_draws_of_call() as start_common_draws:
        if isinstance(model, nn.Module):
            # what modules keep from their parameters' values between calls (a layer's stds, an ensemble's stacked
            # weights) is judged current by version counters, which edits through .data (an EMA copy) bypass:
            # every call starts afresh, and its batches share them
            for module in model.modules():
                forget = getattr(module, "_drop_value_caches", None)
                if callable(forget):
                    forget()
        for index, (x, y) in enumerate(_batches(inputs, batch_size)):
            if not isinstance(x, Tensor) or x.dim() == 0:
                raise ValueError("every batch of inputs must be a tensor with a batch dimension")
            if x.is_meta:
                raise ValueError(f"inputs are on the 'meta' device (shape {tuple(x.shape)}, no values): pass tensors with data")
            if device is not None:
                x = x.to(device)
            if index == 0:  # before the first draw (a loader's iterator took its seed from the generator by now)
                start_common_draws()
                if x.dim() == 1:
                    _check_not_one_input(model, x)
            rows, shape = x.shape[0], tuple(x.shape)
            summary: Any = _ClassificationSummary(keep_samples) if task == "classification" else _RegressionSummary(keep_samples)
            try:
                if members:
                    for _ in range(num_samples // members):
                        _add_output(summary, draw_samples(model, x, members), task, rows)
                else:
                    if shape not in resolved:
                        resolved[shape] = resolve_method(model, rows, method)
                        blocker = _rowwise_blocker(model, x) if resolved[shape] == "batched" else None
                        if blocker == _BATCHED_FAILED and method == "batched":
                            blocker = None  # an auto call's finding: asked for, it is tried (and raises its own error)
                        if blocker is not None and method == "batched":
                            raise ValueError(f"method='batched' would not sample this model exactly: {blocker}; use method='loop'")
                        if blocker is not None:
                            resolved[shape] = "loop"
                        fitted[shape] = chunk_size or _default_chunk(model, x, num_samples, resolved[shape])
                        if fits is not None and chunk_size is None:  # what ran out of memory on another shape: not again
                            fitted[shape] = max(1, min(fitted[shape], fits // max(1, x.numel())))
                    drawn, failed = 0, False
                    while drawn < num_samples:
                        count = min(fitted[shape], num_samples - drawn)
                        try:
                            output = _draw_or_none(model, x, count, resolved[shape], may_shrink=chunk_size is None and count > 1)
                        except torch.OutOfMemoryError:
                            raise
                        except Exception as error:
                            if resolved[shape] != "batched" or drawn:
                                raise
                            if method == "batched":
                                _note(error, f"bdl.predict: method='batched' ran the model on {count} x {rows} rows at once; "
                                             "method='loop' runs it on the batch's rows, once per sample")
                                raise
                            # a model that works on batches of its own size only (an RNN state built for B rows):
                            # "auto" takes the loop, and the model's own error where that fails too. Remembered for
                            # the network and inputs like these once the loop has drawn (the failed forward cost
                            # every call 1.6x), but not a failed allocation (a CPU's is a plain RuntimeError) nor
                            # an error of these inputs, which the loop raises too
                            failed = not isinstance(error, MemoryError) and not any(text in str(error) for text in ("out of memory", "allocate"))
                            resolved[shape] = "loop"
                            fitted[shape] = chunk_size or _default_chunk(model, x, num_samples, "loop")
                            continue
                        if output is None:  # out of memory: half the samples at once, for the rest of the call too
                            fitted[shape] = count // 2
                            fits = min(fits or math.inf, fitted[shape] * x.numel())
                            if x.device.type == "cuda":
                                torch.cuda.empty_cache()
                            continue
                        _add_output(summary, output, task, rows)
                        repeats.add(output)
                        drawn += count
                        if failed:
                            _remember_batched_failure(model, x)
                            failed = False
                    repeats.end_batch()
            except _NonFiniteOutput as error:
                message = _non_finite_message(error, model, x, offset, _read_in_order(inputs))
                raise _NonFiniteOutput(message, error.rows) from None
            except Exception as error:
                _note_dtypes(error, model, x)
                raise
            offset += rows
            summaries.append(summary.result())
            targets.append(y)
    if not summaries:
        raise ValueError("inputs are empty: nothing to predict")
    prediction = summaries[0] if len(summaries) == 1 else Prediction.cat(summaries)
    if len(prediction) == 0:
        raise ValueError("inputs are empty: nothing to predict")
    if trained is not None:
        prediction = trained._with_noise(prediction)
    if all(y is not None for y in targets):
        prediction.targets = torch.cat([y.to(prediction_device(prediction)) for y in targets])
        _check_class_targets(prediction, given=task_given)
    elif any(y is not None for y in targets):  # the labelled batches' targets were dropped silently
        raise ValueError("some batches of inputs came with targets and some without: give every batch (x, y), or every batch x")
    return prediction


def _check_class_targets(prediction: Prediction, given: bool) -> None:
    """Refuse fractional targets beside class probabilities: a regression network's outputs read as a classifier's
    (the default task; a mean-only network's ``[B, 1]`` is a binary classifier's logit) gave probabilities, without a
    word, until :func:`bdl.evaluate` refused the targets. Soft labels pass: rows of class probabilities ``[N, C]``
    (what ELBOLoss trains on), and a binary classifier's ``[N]`` in [0, 1] (BCEWithLogitsLoss's)."""
    targets, probs = prediction.targets, prediction.probs
    if prediction.task != "classification" or not isinstance(targets, Tensor) or not targets.is_floating_point():
        return
    if probs is None or targets.dim() not in (1, 2) or len(targets) != len(prediction):
        return  # not one target per input (sequences' [B, T] beside [B, C] probabilities are left to the user)
    classes = probs.shape[-1]
    finite = targets[torch.isfinite(targets)]
    in_unit = bool(((finite >= 0) & (finite <= 1)).all())
    if targets.dim() == 2 and targets.shape[1] != 1:
        if targets.shape[1] != classes:
            return  # neither labels nor soft labels of these classes: [B, T] and the like, left to the user
        if in_unit and bool(((targets.sum(-1) - 1).abs() <= 1e-3 * classes).all()):
            return  # rows of class probabilities
    elif classes == 2 and in_unit:
        return  # a binary classifier's soft labels
    fractional = finite[finite != finite.round()]
    if fractional.numel():
        logit = " (the default task; a [B, 1] output is then a binary classifier's logit)" if classes == 2 else " (the default task)"
        raise ValueError(
            f"predict: task='classification'{'' if given else logit}, but the targets hold fractional values such as "
            f"{fractional[0].item():.4g}, which are no class labels nor rows of class probabilities: for a regression "
            "model pass task='regression'"
        )


def _warn_if_dropout_is_off(model: nn.Module, num_samples: int) -> bool:
    """Warn where ``model`` has dropout that could fire but nothing bdl knows draws noise at prediction: its
    dropout is off in eval mode, so (unless the model draws noise itself) the samples are all one forward and
    the mutual information is 0, with no word of why (the user meant MC dropout and forgot the wrapper).
    Whether it warned."""
    from .wrappers.mc_dropout import _can_fire, _is_dropout

    _, sources, _ = _stochastic_sources(model)
    if not sources and any(_is_dropout(module) and _can_fire(module) for module in model.modules()):
        held = any(isinstance(module, BayesianModule) for module in model.modules())
        bayesian = "its Bayesian layers held at their means (bdl.deterministic)" if held else "no Bayesian layer"
        warnings.warn(
            f"the model has dropout, which is off at prediction (eval mode), and {bayesian}: unless it draws "
            f"noise itself, its {num_samples} samples are one forward repeated (epistemic uncertainty 0); wrap it "
            "in bdl.MCDropout for MC dropout, or pass num_samples=1",
            UserWarning,
            stacklevel=3,
        )
        return True
    return False


class _RepeatCheck:
    """Whether the first batch's samples of a model with nothing bdl knows to draw noise are one output repeated: a
    plain network sampled ``num_samples`` times (32 by default, reported as Monte Carlo samples, without a word), or
    Bayesian layers held at their means. Read off the draws themselves: a probe's extra forwards broke a model that
    keeps state across calls, and showed in the user's hooks. A model with noise of its own differs."""

    def __init__(self, model: Any, num_samples: int) -> None:  # noqa: ANN401
        self.num_samples = num_samples
        self.reference: Optional[list[Tensor]] = None
        self.done = not (isinstance(model, nn.Module) and num_samples > 1) or bool(_stochastic_sources(model)[1])
        self.held = not self.done and any(isinstance(m, BayesianModule) for m in model.modules())

    def add(self, output: Any) -> None:  # noqa: ANN401 - a draw's stacked samples
        """Compare a draw's samples with the batch's first (chunk by chunk: two samples of a few outcomes agreed)."""
        if self.done:
            return
        parts = list(_tensors(output))
        if not parts or any(not part.numel() for part in parts):  # an empty batch tells nothing
            return
        if self.reference is None:  # a copy: a view kept the whole first chunk's output alive to the batch's end
            self.reference = [part[:1].clone() for part in parts]
        if not all(_alike(part, first.expand_as(part)) for part, first in zip(parts, self.reference)):
            self.done, self.reference = True, None

    def end_batch(self) -> None:
        """After a batch's draws: warn where every sample of the first batch that held rows agreed."""
        if self.done or self.reference is None:
            return
        self.done, self.reference = True, None
        why = ("its Bayesian layers are held at their means (bdl.deterministic)" if self.held else
               "the model has no Bayesian layer nor MC dropout, and its samples agree")  # fmt: skip
        fix = "" if self.held else ", or make it Bayesian (bdl.bayesianize, bdl.MCDropout)"
        warnings.warn(
            f"{why}: its {self.num_samples} samples are one forward repeated (epistemic uncertainty 0); pass "
            f"num_samples=1 for a deterministic network{fix}",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _summary(prediction: Prediction) -> Tensor:
    """The per-input summary every Prediction of its task has: ``probs`` [N, C], or ``mean`` [N, D]."""
    return prediction.probs if prediction.task == "classification" else prediction.mean


def prediction_device(prediction: Prediction) -> torch.device:
    """The device a :class:`Prediction`'s tensors are on."""
    return _summary(prediction).device


def outputs_shape(prediction: Prediction) -> tuple[int, ...]:
    """Per-input shape of a :class:`Prediction`'s outputs: ``(C,)`` classes, or the regression outputs ``(D,)``."""
    return tuple(_summary(prediction).shape[1:])
