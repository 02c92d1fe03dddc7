"""Where bdl's warnings point: the user's line, however the call came through bdl and torch."""

from __future__ import annotations

import os
import sys

import torch

_INTERNAL = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` of the first frame outside bdl and torch: the user's call (under
    torch.compile, which cannot trace the frames, the caller's)."""
    if torch.compiler.is_compiling():
        return 2
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
