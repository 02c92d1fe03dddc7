"""Small tensor facts bdl's caches key by."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def version_or_none(tensor: Tensor) -> Optional[int]:
    """``tensor._version``, or None where the tensor keeps no version counter: an inference tensor, and a parameter
    made in a ``torch.inference_mode`` block and cast outside it (``.double()`` gives it a normal ``.data``, yet
    ``_version`` still raises). A cache keyed by the counter cannot see edits of such a tensor: it must not keep one."""
    try:
        return tensor._version
    except RuntimeError:
        return None
