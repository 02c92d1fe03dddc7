"""Input checks shared by the functional metrics.

Every public metric validates its arguments here, once, where they enter; the arithmetic after that
trusts its inputs. Messages name the argument, the expected form and what came.
"""

from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch
from torch import Tensor


def probability_sum_tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance on ``|sum_k p_k - 1|`` for rows of class probabilities.

    ``max(1e-3, 8 * eps(dtype))``: ``1e-3`` for float32/float64 (averaging a few hundred softmax
    outputs in float32 stays far inside it), ``8 * eps`` for half types whose rounding is coarser
    (about ``0.0078`` for float16 and ``0.0625`` for bfloat16).
    """
    return max(1e-3, 8 * torch.finfo(dtype).eps)


def look_like_probabilities(logits: Tensor) -> bool:
    """Whether every row of ``logits`` [..., C] is non-negative and sums to 1 (within :func:`probability_sum_tolerance`:
    a float16 softmax's rows are 3e-4 off, bfloat16's 3e-3): probabilities passed for logits. The row sums in float64
    and ``amin``, not a mask and a float64 copy of the logits."""
    tolerance = probability_sum_tolerance(logits.dtype)
    return bool(logits.amin() >= 0) and bool(((logits.sum(-1, dtype=torch.float64) - 1).abs() < tolerance).all())


def are_probabilities(outputs: Tensor) -> bool:
    """Whether a model's outputs ``[..., C]`` (C >= 2) are probabilities where logits belong (see
    :func:`probabilities_verdict`)."""
    return bool(probabilities_verdict(outputs))


def probabilities_verdict(outputs: Tensor) -> Optional[bool]:
    """Whether a model's outputs ``[..., C]`` are probabilities where logits belong: :func:`look_like_probabilities`;
    None where they cannot tell: fewer than 2 classes, or no two rows that differ (one row of logits, or rows all
    alike, such as a zero-initialised head's, may happen to sum to 1)."""
    if outputs.dim() < 2 or outputs.shape[-1] < 2 or not outputs.numel() or not outputs.is_floating_point():
        return None
    if not bool((outputs != outputs[(0,) * (outputs.dim() - 1)]).any()):  # against the first row, broadcast (no copy)
        return None
    return look_like_probabilities(outputs)


def as_tensor(value, name: str) -> Tensor:  # noqa: ANN001 - anything tensor-like
    if isinstance(value, Tensor):
        if value.is_meta:
            raise ValueError(f"`{name}` is on the 'meta' device (a shape without values), got shape {tuple(value.shape)}")
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`{name}` must be a tensor or array-like, got {type(value).__name__}") from error


def check_float(value, name: str) -> Tensor:  # noqa: ANN001
    """A floating tensor with finite entries; integers are promoted to float64 (float32 on MPS, which has none)."""
    tensor = _real(value, name)
    _check_finite(tensor, name)
    return tensor


def _real(value, name: str) -> Tensor:  # noqa: ANN001
    tensor = as_tensor(value, name)
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.dtype in _INTEGER_DTYPES):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():  # exact to 2^53: float32 rounded integer targets from 2^24 (RMSE 1 for 0)
        tensor = tensor.to(device_dtype(torch.float64, tensor.device))
    return tensor


def all_finite(tensor: Tensor, total: Optional[Tensor] = None) -> bool:
    """Whether every entry of ``tensor`` is finite. ``total`` is its sum (or a sum of partial sums; None: taken
    here, in float32 for float16): NaN and Inf propagate into it, so a finite one clears every entry at the
    cost of a sum; only a non-finite one (or an overflow of large finite entries) takes the elementwise test,
    whose masks cost 3-4 times the input's memory (53x the sum's time at 100,000 x 1,000 probabilities)."""
    if total is None:
        total = tensor.sum(dtype=torch.float32 if tensor.dtype == torch.float16 else None)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def _check_finite(tensor: Tensor, name: str, total: Optional[Tensor] = None) -> None:
    """Raise if an entry of ``tensor`` is NaN/Inf (see :func:`all_finite`)."""
    if all_finite(tensor, total):
        return
    bad = (~torch.isfinite(tensor)).sum().item()
    raise ValueError(f"`{name}` must be finite, got {bad} NaN/Inf entries out of {tensor.numel()}")


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64)


def check_probs(probs, name: str = "probs") -> Tensor:  # noqa: ANN001
    """``probs`` [N, C]: finite, in [0, 1], rows summing to 1 within :func:`probability_sum_tolerance`."""
    probs = as_tensor(probs, name)
    if probs.dtype in _INTEGER_DTYPES:  # one-hot rows: exact in the default dtype, whose log floor the NLL keeps
        probs = probs.to(torch.get_default_dtype())
    probs = _real(probs, name)
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"`{name}` must have shape [N, C] with C >= 2 classes, got shape {tuple(probs.shape)}")
    if probs.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one example, got shape {tuple(probs.shape)}")
    check_probability_rows(probs, name)
    return probs


def check_probability_rows(probs: Tensor, name: str, hint: str = "pass softmax(logits), not logits") -> None:
    """Raise unless ``probs`` [..., C] (non-empty) is finite, in [0, 1], and sums to 1 over its last dimension
    within :func:`probability_sum_tolerance`; ``hint`` follows the [0, 1] error."""
    # two passes over the tensor (row sums, min and max) and no temporaries of its size; half types sum in float32
    half = probs.dtype in (torch.float16, torch.bfloat16)
    row_sums = probs.sum(dim=-1, dtype=torch.float32 if half else None)
    _check_finite(probs, name, row_sums.sum())
    low, high = torch.aminmax(probs)
    if low < 0 or high > 1:
        raise ValueError(
            f"`{name}` must be probabilities in [0, 1], got values in [{low.item():.4g}, {high.item():.4g}] ({hint})"
        )
    tolerance = probability_sum_tolerance(probs.dtype)
    error = (row_sums - 1).abs()
    if (error > tolerance).any():
        worst = [int(i) for i in torch.unravel_index(error.argmax(), error.shape)]
        where = f"row {worst[0]}" if len(worst) == 1 else f"row {tuple(worst)}"
        raise ValueError(
            f"rows of `{name}` must sum to 1 over the last dimension (tolerance {tolerance:.3g}), {where} sums to "
            f"{row_sums[tuple(worst)].item():.6g}"
        )


def as_class_labels(target: Tensor) -> Tensor:
    """A binary classifier's labels as binary cross-entropy takes them (whole-number floats, ``[N, 1]``) as integer
    class labels ``[N]``; anything else as it is, for :func:`check_labels` to judge."""
    # (an empty batch too: ELBOLoss gave torch's dtype error, not its 'skip empty batches')
    if target.is_floating_point() and bool((target == target.round()).all()) and bool(target.isfinite().all()):
        # half precision holds every whole number below 2^(mantissa + 1) (256 in bfloat16) and rounds larger ones to
        # others (257 -> 256): from there up, a label may be another class's (Lightning's bf16-true casts the labels)
        exact = {torch.bfloat16: 256, torch.float16: 2048}.get(target.dtype)
        if exact is not None and bool((target.abs() >= exact).any()):
            raise TypeError(
                f"class labels in {target.dtype} from {exact} up may have been rounded to other classes (257 -> 256 in "
                "bfloat16): pass integer labels (torch.long)"
            )
        target = target.long()
    if not target.is_floating_point() and target.dim() == 2 and target.shape[1] == 1:
        target = target.reshape(-1)
    return target


def check_labels(target, num_classes: int, num_examples: int, name: str = "target") -> Tensor:  # noqa: ANN001
    """``target`` [N]: integer class labels in ``[0, num_classes)``."""
    target = as_tensor(target, name)
    if target.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"`{name}` must hold integer class labels, got dtype {target.dtype}")
    if target.dtype in (torch.uint16, torch.uint32, torch.uint64):  # numpy's unsigned labels; torch has few ops for them
        target = target.to(torch.int64)  # a uint64 label past 2^63 wraps negative: refused below as out of range
    if target.dim() != 1 or target.shape[0] != num_examples:
        raise ValueError(
            f"`{name}` must have shape [N] = [{num_examples}] to match the predictions, got shape {tuple(target.shape)}"
        )
    if num_examples and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(
            f"`{name}` must hold labels in [0, {num_classes - 1}] for {num_classes} classes, got labels in "
            f"[{target.min().item()}, {target.max().item()}]"
        )
    return target.long()


def targets_like(target, mean: Tensor, name: str = "target", *, finite: bool = True) -> Tensor:  # noqa: ANN001
    """Regression ``target`` as ``mean`` is shaped ([N, D] or [N]): finite (unless ``finite`` is False), of the
    same shape up to trailing dimensions of size 1 (``[N]`` for ``[N, 1]`` and back). A reshape by element
    count alone paired a transposed ``[D, N]`` target with the wrong outputs."""
    target = check_float(target, name) if finite else _real(target, name)

    def core(shape: tuple[int, ...]) -> tuple[int, ...]:
        while len(shape) > 1 and shape[-1] == 1:
            shape = shape[:-1]
        return shape

    if core(tuple(target.shape)) != core(tuple(mean.shape)):
        raise ValueError(f"`{name}` must have the shape of the predicted means {tuple(mean.shape)}, got shape {tuple(target.shape)}")
    return moved(target.reshape(mean.shape), mean.device)


def device_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``dtype`` as ``device`` holds it: float64 as float32 on MPS, which has no float64."""
    return torch.float32 if dtype == torch.float64 and torch.device(device).type == "mps" else dtype


def moved(tensor: Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``tensor`` on ``device`` in ``dtype`` (None: its own), as :func:`device_dtype` allows there (integer targets,
    read in float64 on the CPU, failed on an MPS model's means)."""
    return tensor.to(device=device, dtype=device_dtype(tensor.dtype if dtype is None else dtype, device))


def check_vector(value, name: str, *, allow_empty: bool = False) -> Tensor:  # noqa: ANN001
    """A finite 1-D floating tensor (scores, confidences, losses); integers become float64, which holds them exactly
    up to 2^53 (float32 from 2^24 on merged distinct scores into ties), and bools 0/1 (a 0/1 error,
    ``predicted_class != target``, as the selective metrics' docs write it, was refused)."""
    as_given = as_tensor(value, name)
    if as_given.dtype == torch.bool:
        as_given = as_given.to(torch.uint8)  # then float64 with the integers, in check_float
    tensor = check_float(as_given, name)
    if tensor.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D with shape [N], got shape {tuple(tensor.shape)}")
    if not allow_empty and tensor.numel() == 0:
        raise ValueError(f"`{name}` must not be empty")
    return tensor


def check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"`{name}` {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: expected equal shapes, got {listed}")


def check_positive_int(value: int, name: str) -> int:
    """``value`` as an int if it is an integer >= 1 (a numpy one too, not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_n_bins(n_bins: int) -> int:
    return check_positive_int(n_bins, "`n_bins`")


def check_fraction(value: float, name: str, *, open_left: bool = True, open_right: bool = False) -> float:
    """A number in (0, 1] (``[0, ...`` when ``open_left`` is False, ``..., 1)`` when ``open_right`` is True)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    low_ok = value > 0 if open_left else value >= 0
    high_ok = value < 1 if open_right else value <= 1
    if not (low_ok and high_ok):
        interval = ("(" if open_left else "[") + "0, 1" + (")" if open_right else "]")
        raise ValueError(f"`{name}` must lie in {interval}, got {value}")
    return float(value)


def percent_key(fraction: float) -> str:
    """A fraction as a percentage for a metric's name, to 6 significant digits in fixed notation: 0.925 ->
    ``"92_5"``, 1e-7 -> ``"0_00001"`` (``%g`` wrote ``"1e-05"``, which the report's key reader did not take), and
    more digits where 6 round a fraction below 1 to ``"100"`` (0.9999999 -> ``"99_99999"``)."""
    digits, text = 6, ""
    while digits <= 17 and (not text or (text == "100" and fraction != 1)):
        text = np.format_float_positional(100 * fraction, precision=digits, fractional=False, trim="-")
        digits += 1
    return text.replace(".", "_")
