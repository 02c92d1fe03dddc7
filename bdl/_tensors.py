"""Small tensor facts bdl's caches key by, and the random state Monte Carlo draws come from."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def version_or_none(tensor: Tensor) -> Optional[int]:
    """``tensor._version``, or None where the tensor keeps no version counter: an inference tensor, and a parameter
    made in a ``torch.inference_mode`` block and cast outside it (``.double()`` gives it a normal ``.data``, yet
    ``_version`` still raises). A cache keyed by the counter cannot see edits of such a tensor: it must not keep one."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def in_trace(*tensors: object) -> bool:
    """Whether values cannot be read here: inside ``torch.compile`` (a data-dependent branch breaks the graph, and
    fails under ``fullgraph=True``), or where a tensor is batched by ``torch.func.vmap`` (of per-example gradients,
    say), at any level. A check of values is left out then; under ``torch.func.grad`` alone values are read."""
    if torch.compiler.is_compiling():
        return True
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if not any(isinstance(t, Tensor) and wrapped(t) for t in tensors):
        return False
    try:  # torch's private interpreter stack (there in 2.14 and long before; unread: as under vmap)
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:
        return True
    return any(interpreter.key() == TransformType.Vmap for interpreter in retrieve_all_functorch_interpreters())


RandomState = tuple[Tensor, Optional[list[Tensor]]]


def random_state() -> RandomState:
    """The state of torch's CPU generator and, where CUDA is in use, of every CUDA device's: where
    :func:`set_random_state` puts them back, the same Monte Carlo draws come again (common random numbers)."""
    return torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def set_random_state(state: RandomState) -> None:
    """Put back a state :func:`random_state` took."""
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
