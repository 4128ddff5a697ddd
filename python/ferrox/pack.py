"""Bit packing with one layout for every ferrox format.

A tensor is packed row by row along its last dimension; each packed row takes
``packed_row_bytes(row_len, bits)`` bytes, so rows start on byte boundaries.
Inside a row, element j's code occupies bits ``[j*bits, (j+1)*bits)`` of a
little-endian bit stream (bit p is bit ``p % 8`` of byte ``p // 8``; a code's
low bit comes first); padding bits are zero. Sign packing stores the IEEE sign
bit (``-0.0`` packs as 1) and unpacks 1 to -1.0 and 0 to +1.0.
"""

import torch

from . import _checks, _core, dtypes

FLOAT_DTYPES = tuple(dtypes.to_torch(name) for name in dtypes.KERNEL_FLOATS)


def packed_row_bytes(row_len: int, bits: int) -> int:
    return _core.packed_row_bytes(row_len, bits)


def _packed_shape(shape, row_len: int, bits: int):
    return (*shape[:-1], packed_row_bytes(row_len, bits)) if len(shape) else (packed_row_bytes(1, bits),)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """uint8 tensor of x's sign bits, packed along the last dimension."""
    _checks.tensor("x", x)
    row_len = x.shape[-1] if x.dim() else 1
    out = torch.empty(_packed_shape(x.shape, row_len, 1), dtype=torch.uint8)
    _core.pack_signs(x, out)
    return out


def unpack_signs(packed: torch.Tensor, row_len: int, dtype=torch.float32) -> torch.Tensor:
    """±1 tensor of shape ``(*packed.shape[:-1], row_len)``."""
    _checks.tensor("packed", packed)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    _checks.count("row_len", row_len, 0, 2**62)
    out = torch.empty((*packed.shape[:-1], row_len), dtype=dtype)
    _core.unpack_signs(packed, out)
    return out


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs uint8 codes (each < 2**bits) of ``bits`` in 1..8 bits."""
    _checks.tensor("codes", codes)
    _checks.count("bits", bits, 1, 8)
    row_len = codes.shape[-1] if codes.dim() else 1
    out = torch.empty(_packed_shape(codes.shape, row_len, bits), dtype=torch.uint8)
    _core.pack_codes(codes, bits, out)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, row_len: int) -> torch.Tensor:
    _checks.tensor("packed", packed)
    _checks.count("bits", bits, 1, 8)
    _checks.count("row_len", row_len, 0, 2**62)
    out = torch.empty((*packed.shape[:-1], row_len), dtype=torch.uint8)
    _core.unpack_codes(packed, bits, out)
    return out
