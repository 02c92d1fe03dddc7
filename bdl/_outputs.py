"""Stacking the outputs of repeated forwards (Monte Carlo samples, ensemble members).

A model's output is a tensor, a (named) tuple of tensors such as a :class:`bdl.GaussianHead`'s
``(mean, variance)``, or a dict of tensors (``{"logits": ...}``); these helpers keep that structure.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor


def output_parts(output: Any, who: str = "the model") -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:  # noqa: ANN401
    """The tensors of ``output`` and a function that rebuilds an output of the same structure from others."""
    if isinstance(output, Tensor):
        return [output], lambda parts: parts[0]
    if isinstance(output, (tuple, list)) and output and all(isinstance(part, Tensor) for part in output):
        kind = type(output)
        if hasattr(output, "_fields"):  # NamedTuple, e.g. GaussianOutput
            return list(output), lambda parts: kind(*parts)
        return list(output), lambda parts: kind(parts)
    if isinstance(output, Mapping) and output and all(isinstance(part, Tensor) for part in output.values()):
        keys = list(output)  # e.g. {"logits": ...}: a plain dict of the same keys (vmap gives one too)
        return list(output.values()), lambda parts: dict(zip(keys, parts))
    raise TypeError(f"{who} must return a tensor, a tuple or a dict of tensors, got {type(output).__name__}")


def _signature(parts: list[Tensor]) -> list[tuple[tuple[int, ...], torch.dtype, torch.device]]:
    return [(tuple(part.shape), part.dtype, part.device) for part in parts]


def _describe(parts: list[Tensor], single: bool, full: bool = False) -> str:
    """The parts' shapes as a tuple (one tensor: its shape); ``full`` adds dtype and device."""
    shapes = [tuple(part.shape) for part in parts]
    text = str(shapes[0] if single else tuple(shapes))
    return text + " " + ", ".join(f"{part.dtype} on {part.device}" for part in parts) if full else text


def _keys(keys: list | None, parts: list[Tensor]) -> str:
    return f"a dict of keys {keys}" if keys is not None else f"{len(parts)} tensor(s)"


def draw_stacked(draw: Callable[[int], Any], count: int, who: str = "the model", item: str = "sample") -> Any:  # noqa: ANN401
    """``draw(0), ..., draw(count - 1)`` stacked along a new first dimension (tuple outputs part by part).

    Without gradients each output is copied into a preallocated ``[count, ...]`` tensor and released
    before the next ``draw``: peak memory holds one output fewer than ``count``, and on CPU the next
    forward reuses the memory just released. Measured for a 5-member ensemble of 64-128-128-10 MLPs at
    batch 1024 (2 threads): 2.3 ms against 3.3 ms for keeping the outputs and stacking them at the end,
    whose long-lived small tensors made the allocator hand every forward fresh pages for its
    activations. With gradients enabled the outputs are kept and stacked (autograd needs them anyway), and
    so they are inside ``torch.compile``.
    Outputs of another shape, dtype, device or structure than the first raise a ``ValueError`` naming the
    ``item`` (e.g. ``"member 2: (5, 4)"``).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    first = draw(0)
    parts, rebuild = output_parts(first, who)
    single = isinstance(first, Tensor)
    first_keys = list(first) if isinstance(first, Mapping) else None
    signature = _signature(parts)
    described = {full: _describe(parts, single, full) for full in (False, True)}

    def check(index: int, output: Any) -> list[Tensor]:  # noqa: ANN401
        others, _ = output_parts(output, who)
        other_single = isinstance(output, Tensor)
        keys = list(output) if isinstance(output, Mapping) else None
        if keys != first_keys:
            raise ValueError(f"{who} must give outputs of one structure, got {item} 0: {_keys(first_keys, parts)}, "
                             f"{item} {index}: {_keys(keys, others)}")
        if _signature(others) != signature or other_single != single:
            # same shapes: the dtype or device differs, so name them
            full = other_single == single and [s[0] for s in _signature(others)] == [s[0] for s in signature]
            raise ValueError(
                f"{who} must give outputs of one shape, dtype and device, got {item} 0: {described[full]}, "
                f"{item} {index}: {_describe(others, other_single, full)}"
            )
        return others

    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # a compiled graph plans its own memory
        columns = [parts] + [check(index, draw(index)) for index in range(1, count)]
        return rebuild([torch.stack(list(column)) for column in zip(*columns)])
    stacked = [part.new_empty((count, *part.shape)) for part in parts]
    del first
    for index in range(count):
        if index:
            parts = check(index, draw(index))
        for target, part in zip(stacked, parts):
            target[index].copy_(part)
        del parts
    return rebuild(stacked)
