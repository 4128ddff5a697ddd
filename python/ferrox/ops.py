"""Fused elementwise ops, on CPU (rayon) and CUDA (ferrox's NVRTC kernels on
torch's current stream)."""

import torch

from . import _checks, _core
from .cuda import stream_of


def axpby(out: torch.Tensor, a: float, x: torch.Tensor, b: float, y: torch.Tensor) -> torch.Tensor:
    """``out = a * x + b * y`` in one pass (f32 arithmetic, rounded once to
    out's dtype). ``out`` may be ``x`` or ``y`` itself. Returns ``out``."""
    for name, t in (("out", out), ("x", x), ("y", y)):
        _checks.tensor(name, t)
    _core.axpby(out, float(a), x, float(b), y, stream_of(out))
    return out
