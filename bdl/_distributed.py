"""What every distributed (Lightning DDP) run of a bdl module needs: one decision to stop on all processes, and the
process group destroyed at exit. Imported by ``bdl.lightning`` and by ``bdl.infer``'s ``SVIModule``."""

from __future__ import annotations

import atexit
import math
from typing import Any, Optional

import torch
from lightning.fabric.utilities.data import sized_len


def raise_on_every_process(module: Any, error: Optional[Exception], what: str) -> None:  # noqa: ANN401 - a LightningModule
    """Raise ``error`` (None: nothing went wrong here), and in a multi-process run stop the other processes too.

    Every process calls this at the same point (each training step; once per evaluation pass, at its last
    batch): a check that failed on one process alone left the others at their next collective, to fail there
    with "connection closed by peer" (gloo) or to wait for the timeout (NCCL). The processes where nothing went
    wrong raise an error of the failing one's kind (its nearest built-in one: a ValueError of a target is one
    everywhere) that names that process and quotes its message.
    """
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            told = None if error is None else ([kind.__name__ for kind in type(error).__mro__], str(error))
            messages = _every_process(told)  # every process is here: a collective
            if error is None:
                failed = [(rank, message) for rank, message in enumerate(messages or []) if message is not None]
                # the failing process's own words: a spawned run shows one process's error, not always its
                where = f"process {failed[0][0]}" if failed else "another process"
                said = f": {failed[0][1][1]}" if failed else ": that process's error says where"
                kinds = failed[0][1][0] if failed else ["FloatingPointError"]
                error = _same_kind(kinds)(
                    f"{what} on {where} at epoch {module.current_epoch}, step {module.global_step} (this is process "
                    f"{trainer.global_rank} of {trainer.world_size}){said}"
                )
    if error is not None:
        raise error


# built-in errors that take one message (UnicodeDecodeError takes five) and print it unquoted (KeyError quotes it),
# none that a loop reads as a signal (Lightning's evaluation loop ends at a StopIteration)
_KINDS = {kind.__name__: kind for kind in (
    FloatingPointError, ZeroDivisionError, OverflowError, ArithmeticError, ValueError, TypeError, IndexError,
    LookupError, NotImplementedError, RuntimeError, AssertionError, AttributeError, MemoryError,
    FileNotFoundError, OSError,
)}  # fmt: skip


def _same_kind(names: list[str]) -> type[Exception]:
    """The first of an error's classes (``names``: its MRO's) that is one of ``_KINDS``, else RuntimeError."""
    return next((_KINDS[name] for name in names if name in _KINDS), RuntimeError)


def validation_batches(module: Any) -> float:  # noqa: ANN401 - a LightningModule
    """The number of batches this validation pass runs in this process, limits applied (inf where it is not known
    beforehand: a loader of no length; 0 outside a Trainer). Processes may differ: a sampler of the loader's own
    splits the rows as it likes."""
    trainer = module._trainer
    return 0 if trainer is None else sum(batch_counts(trainer, "validation"))


def batch_counts(trainer: Any, stage: str) -> list[float]:  # noqa: ANN401 - a Trainer
    """The number of batches of each of the ``stage`` ("validation" or "test") pass's loaders in this process, limits
    applied; inf for a loader of no length, whose count Lightning gives as ``limit_val_batches`` (or the sanity
    check's steps), which its stream may never reach."""
    if stage == "validation":
        counts = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        loaders = getattr(trainer, "val_dataloaders", None)
    else:
        counts, loaders = trainer.num_test_batches, getattr(trainer, "test_dataloaders", None)
    if loaders is None:
        return list(counts)
    loaders = flat_loaders(loaders)
    return [count if index >= len(loaders) or sized_len(loaders[index]) is not None else math.inf for index, count in enumerate(counts)]


def flat_loaders(loaders: Any) -> list[Any]:  # noqa: ANN401 - a loader, or lists/tuples/dicts of them, nested
    """The loaders in the order Lightning numbers them (``dataloader_idx``): nested lists, tuples and dicts
    flattened, a dict's values in its order."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [loader for part in loaders for loader in flat_loaders(part)]
    return [loaders]


def _every_process(message: Optional[tuple[list[str], str]]) -> Optional[list[Optional[tuple[list[str], str]]]]:
    """Each process's ``message`` (None where torch.distributed is not running)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    messages: list[Optional[tuple[list[str], str]]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, message)
    return messages


def _destroy_process_group() -> None:
    # a distributed run's worker processes (ddp_spawn's; ddp's beside the one that launched them) exit with gloo's
    # process group alive: Lightning destroys it at exit for NCCL only, and gloo's threads, left to interpreter exit,
    # can abort a process that trained and tested (SIGABRT, "terminate called without an active exception")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


atexit.register(_destroy_process_group)  # every process that runs a bdl LightningModule imports this module
