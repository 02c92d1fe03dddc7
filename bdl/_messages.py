"""Lists of names and indices, shortened for error messages."""

from __future__ import annotations

from typing import Sequence


def first_few(names: Sequence[str], limit: int = 4) -> str:
    """``names`` joined for a message, the first ``limit`` of them and how many more."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def index_list(indices: Sequence[int], limit: int = 8) -> str:
    """Rows or draws for a message that states their count itself: ``[0, 3, 5]``, or the first ``limit`` and
    ``...``."""
    return "[" + ", ".join(str(int(i)) for i in indices[:limit]) + (", ...]" if len(indices) > limit else "]")
