"""Two small bases for the ``torchmetrics.Metric`` wrappers: a running mean and a concatenating buffer."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors


def require_data(metric: Metric, count: Tensor) -> None:
    """Raise when ``metric`` holds no examples (``count``, summed across processes, is 0): computed before any
    update, a mean was NaN, an MCE 0 (a perfect score of nothing) and a buffered metric failed in torchmetrics."""
    if not bool(count.sum() > 0):
        raise ValueError(f"{type(metric).__name__}.compute() before any example was added: call update() with a batch first")


def empty_batch(*values: object) -> bool:
    """Whether every one of a batch's ``values`` (tensors, arrays or lists) holds no example: ``update`` then adds
    nothing, as torchmetrics' own metrics do (a masked batch, ``probs[mask]``, can be empty); a batch with some
    values empty and others not goes on to the checks, which name the mismatch."""
    def rows(value: object) -> Optional[int]:
        if isinstance(value, Tensor):
            return value.shape[0] if value.dim() else None
        try:
            return len(value)  # type: ignore[arg-type]
        except TypeError:
            return None

    return all(rows(value) == 0 for value in values)


def _syncs_each_step(metric: Metric) -> bool:
    """Whether ``metric``'s ``forward`` gathers its batch across processes: ``dist_sync_on_step``, in a run its
    ``distributed_available_fn`` says is distributed (as torchmetrics' ``sync`` decides)."""
    return bool(metric.dist_sync_on_step) and bool(metric.distributed_available_fn())


class _Metric(Metric):
    """A ``Metric`` whose ``forward`` on an empty batch returns NaN and keeps what was added.

    torchmetrics' ``forward`` computes the batch's value by resetting the state, updating with the batch alone
    and calling ``compute``, which refuses to report on no examples: the error lost everything added before.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - the subclass's update arguments
        empty = empty_batch(*args, *kwargs.values())
        if _syncs_each_step(self):  # the batch value is every process's: empty when all of them are
            holding = torch.tensor([0.0 if empty else 1.0], dtype=torch.float64, device=self.device)
            empty = not any(bool(count.sum() > 0) for count in self._gather_step(holding))
        if empty:
            self.update(*args, **kwargs)  # adds nothing, as torchmetrics' own metrics do
            self._forward_cache = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
            return self._forward_cache
        return super().forward(*args, **kwargs)

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> Metric:
        """Moves the states, but keeps their dtypes (float64 totals and counts) unless :meth:`set_dtype` asks:
        torchmetrics keeps them through ``.half()``, ``.float()``, ... but not ``.to(dtype)``, which Lightning's
        ``"bf16-true"`` and ``"16-true"`` precisions call on the module holding the metric (a bfloat16 count stopped
        growing at 256 batches of 64, a float16 one reached inf after 65504 examples, and the NLL read 0)."""
        if self._dtype_convert:
            return super()._apply(fn, exclude_state)

        def keep_dtype(tensor: Tensor) -> Tensor:  # the device move alone: a round trip through the dtype rounded them
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)

        return super()._apply(keep_dtype, exclude_state)

    def _gather_step(self, tensor: Tensor) -> list[Tensor]:
        """``tensor`` of every process (``dist_sync_on_step``), by the metric's own sync function if it has one."""
        return (self.dist_sync_fn or gather_all_tensors)(tensor, group=self.process_group)


class _RunningMean(_Metric):
    """Accumulates ``sum(batch_mean * batch_size)`` and ``sum(batch_size)``: exact for any split into batches.

    The two states are named after the metric (``nll_total``, ``nll_count``; read them as ``total`` and
    ``count``): a ``MetricCollection`` merges metrics whose states have the same names and values after the
    first update (compute groups), and the NLL and the Brier score of a first batch that is all confidently
    right both sum to 0: one reported the other's value for the rest of the run.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - torchmetrics options
        super().__init__(**kwargs)
        prefix = type(self).__name__.lower()
        self._state_names = (f"{prefix}_total", f"{prefix}_count")
        for name in self._state_names:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def total(self) -> Tensor:
        """``sum(batch_mean * batch_size)`` so far."""
        return getattr(self, self._state_names[0])

    @property
    def count(self) -> Tensor:
        """``sum(batch_size)`` so far."""
        return getattr(self, self._state_names[1])

    def _add(self, batch_mean: Tensor, batch_size: int) -> None:
        total, count = self._state_names
        setattr(self, total, self.total + batch_mean.detach().double() * batch_size)
        setattr(self, count, self.count + batch_size)

    def compute(self) -> Tensor:
        require_data(self, self.count)
        return self.total / self.count


class _Buffered(_Metric):
    """Keeps every update's tensors (concatenated, gathered across processes) and applies a functional metric."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: tuple[str, ...], **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self._names = names
        for name in names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _append(self, **tensors: Tensor) -> None:
        for name, tensor in tensors.items():
            getattr(self, name).append(tensor.detach())

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Optional[Any] = None) -> None:
        # every process sends float64 (exact for float32, float16 and integers up to 2^53): one without updates sends
        # torchmetrics' empty placeholder in the metric's dtype, float32, and gloo aborted the whole job (SIGABRT,
        # "Received data size doesn't match") where the others had stored float64, float16 or integer values
        for name in self._names:
            stored = getattr(self, name)
            stored = stored if isinstance(stored, list) else [stored]
            setattr(self, name, [t.double() for t in stored] or [torch.empty(0, dtype=torch.float64, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def _gathered(self) -> list[Tensor]:
        first = getattr(self, self._names[0])
        require_data(self, torch.tensor(sum(t.numel() for t in first) if isinstance(first, list) else first.numel()))
        return [dim_zero_cat(getattr(self, name)) for name in self._names]

    def _compute_with(self, function: Callable[..., Tensor], *args, **kwargs) -> Tensor:  # noqa: ANN002, ANN003
        return function(*self._gathered(), *args, **kwargs)
