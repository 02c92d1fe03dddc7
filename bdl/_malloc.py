"""The one process-wide setting bdl makes on import: glibc's malloc thresholds raised as far as its own rules go.

glibc's ``malloc`` hands a request of at least its *mmap threshold* (128 KiB when a process starts) a fresh
``mmap`` of its own, unmapped again on ``free``, and gives the top of its heap back to the system whenever
more than the *trim threshold* (twice the mmap threshold) is free there. Freeing an mmap-ed block raises
both to that block's size (up to 32 MiB on 64-bit systems): glibc's "dynamic threshold", see mallopt(3).
Until a process has freed a large block, the tensors of a few MiB that every training step and prediction
makes and drops (a 1200x1200 weight's noise and gradients, a chunk of activations) are mapped afresh or
trimmed away each time, and every one of their pages costs a page fault when written again.

On the 2-core development VM (a fault costs ~3 us there) a 784-1200-1200-10 MLP took 7,000-8,400 faults
per training step with ``BayesLinear`` (reparam) and up to 4,200 with ``nn.Linear``; after freeing one
32 MiB block, none, and the medians of 30 steps (fresh processes, three rounds) went from 72-76 to 55-63 ms
(reparam), 91-105 to 62-87 ms (Flipout) and 21-34 to 21-24 ms (``nn.Linear``). MC dropout's 32-sample
prediction of a 64-128-128-10 MLP at batch 1024 took 10,000-16,000 faults per call, 0 after.

So on import bdl allocates and frees one such block: what any process does that frees a 32 MiB tensor, and
the largest thresholds glibc sets by itself. The process then keeps up to 64 MiB of freed heap memory for
reuse instead of returning it at once. Set ``BDL_MALLOC_WARMUP=0`` to leave malloc as it is. Elsewhere than
glibc (macOS, Windows, musl) nothing is done.
"""

from __future__ import annotations

import os
import sys

import torch

# glibc's largest dynamic mmap threshold is 32 MiB (4 Mi * sizeof(long)); a freed block counts only up to
# that size, its header and alignment included
WARMUP_BYTES = (32 << 20) - (1 << 16)


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # no such name: another C library
        return False


def warm_up_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds by freeing one 32 MiB block (see the module docstring).

    Returns whether it did (glibc, and ``BDL_MALLOC_WARMUP`` not ``0``). The block is never written, so
    no page of it is touched: the cost is one ``mmap`` and one ``munmap``.
    """
    if os.environ.get("BDL_MALLOC_WARMUP", "1") == "0" or not _glibc():
        return False
    try:
        block = torch.empty(WARMUP_BYTES, dtype=torch.uint8, device="cpu")  # whatever torch's default device
    except RuntimeError:  # address space refused (a tight ulimit -v): keep glibc's defaults
        return False
    del block
    return True
