"""What every distributed (Lightning DDP) run of a bdl module needs: one decision to stop on all processes, and the
process group destroyed at exit. Imported by ``bdl.lightning`` and by ``bdl.infer``'s ``SVIModule``."""

from __future__ import annotations

import atexit
from typing import Any, Optional

import torch


def raise_on_every_process(module: Any, error: Optional[Exception], what: str) -> None:  # noqa: ANN401 - a LightningModule
    """Raise ``error`` (None: nothing went wrong here), and in a multi-process run stop the other processes too.

    Every process calls this at the same point (each step, each evaluation batch): a check that failed on one
    process alone left the others at their next collective, to fail there with "connection closed by peer"
    (gloo) or to wait for the timeout (NCCL). The processes where nothing went wrong raise a
    ``FloatingPointError`` that points to the one that failed.
    """
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            messages = _every_process(None if error is None else str(error))  # every process is here: a collective
            if error is None:
                failed = [(rank, message) for rank, message in enumerate(messages or []) if message is not None]
                # the failing process's own words: a spawned run shows one process's error, not always its
                where = f"process {failed[0][0]}" if failed else "another process"
                said = f": {failed[0][1]}" if failed else ": that process's error says where"
                error = FloatingPointError(
                    f"{what} on {where} at epoch {module.current_epoch}, step {module.global_step} (this is process "
                    f"{trainer.global_rank} of {trainer.world_size}){said}"
                )
    if error is not None:
        raise error


def _every_process(message: Optional[str]) -> Optional[list[Optional[str]]]:
    """Each process's ``message`` (None where torch.distributed is not running)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    messages: list[Optional[str]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, message)
    return messages


def _destroy_process_group() -> None:
    # a distributed run's worker processes (ddp_spawn's; ddp's beside the one that launched them) exit with gloo's
    # process group alive: Lightning destroys it at exit for NCCL only, and gloo's threads, left to interpreter exit,
    # can abort a process that trained and tested (SIGABRT, "terminate called without an active exception")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


atexit.register(_destroy_process_group)  # every process that runs a bdl LightningModule imports this module
