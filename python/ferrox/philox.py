"""Counter-based random numbers (Philox4x32-10, Salmon et al. 2011).

Element ``e`` of stream ``(seed, stream)`` is lane ``e % 4`` of the block
``philox4x32_10(ctr=[e//4 low, e//4 high, stream low, stream high],
key=[seed low, seed high])``. Values depend only on (seed, stream, element):
never on thread count, chunking or device. Uniforms are
``((bits >> 9) + 0.5) * 2**-23``, exact and strictly inside (0, 1); normals use Box–Muller with
ferrox's own log and sincos, so CPU and CUDA give identical bits.
"""

import torch

from . import _checks, _core
from .cuda import stream_of

_U64 = 2**64 - 1


def philox4x32_10(ctr, key):
    """One Philox block: four 32-bit counter words, two key words."""
    return tuple(_core.philox4x32_10(list(ctr), list(key)))


def _out(shape, out, device, dtype):
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    return _checks.tensor("out", out)


def _ids(seed, stream, offset):
    return (_checks.count("seed", seed, 0, _U64), _checks.count("stream", stream, 0, _U64),
            _checks.count("offset", offset, 0, _U64))


def uniform(shape=(), *, seed: int, stream: int = 0, offset: int = 0, out=None, device="cpu") -> torch.Tensor:
    out = _out(shape, out, device, torch.float32)
    _core.philox_uniform(out, *_ids(seed, stream, offset), stream_of(out))
    return out


def normal(shape=(), *, seed: int, stream: int = 0, offset: int = 0, out=None, device="cpu") -> torch.Tensor:
    out = _out(shape, out, device, torch.float32)
    _core.philox_normal(out, *_ids(seed, stream, offset), stream_of(out))
    return out


def bits(shape=(), *, seed: int, stream: int = 0, offset: int = 0, out=None) -> torch.Tensor:
    """Raw 32-bit outputs stored bit for bit in an int32 tensor (CPU)."""
    out = _out(shape, out, "cpu", torch.int32)
    _core.philox_bits(out, *_ids(seed, stream, offset))
    return out
