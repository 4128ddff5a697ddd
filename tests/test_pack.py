"""Bit packing against numpy's packbits (little bit order), and roundtrips."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrox import pack

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sign_bits(x: torch.Tensor) -> np.ndarray:
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[x.dtype]
    return (x.view(ints) < 0).numpy().astype(np.uint8)  # the IEEE sign bit


def codes_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Each code as `bits` little-endian bits, rows packed LSB-first."""
    expanded = ((codes[..., None] >> np.arange(bits)) & 1).astype(np.uint8)
    stream = expanded.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


@given(st.sampled_from(DTYPES), st.integers(1, 5), st.integers(1, 70), st.integers(0, 2**31))
@settings(deadline=None)
def test_pack_signs_matches_numpy(dtype, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    x[x.abs() < 0.3] = -0.0
    packed = pack.pack_signs(x)
    assert packed.shape == (rows, (cols + 7) // 8)
    assert np.array_equal(packed.numpy(), np.packbits(sign_bits(x), axis=-1, bitorder="little"))
    back = pack.unpack_signs(packed, cols, dtype)
    assert torch.equal(back, torch.where(torch.from_numpy(sign_bits(x)).bool(), -1.0, 1.0).to(dtype))


@given(st.integers(1, 8), st.integers(1, 4), st.integers(1, 50), st.integers(0, 2**31))
@settings(max_examples=settings.default.max_examples * 3 // 2, deadline=None)
def test_pack_codes_matches_reference_and_roundtrips(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack.pack_codes(codes, bits)
    assert packed.shape == (rows, pack.packed_row_bytes(cols, bits))
    assert np.array_equal(packed.numpy(), codes_reference(codes.numpy(), bits))
    assert torch.equal(pack.unpack_codes(packed, bits, cols), codes)


def test_large_single_row_roundtrip(rng):
    for bits in (1, 2, 3, 4, 5, 8):
        codes = torch.randint(0, 2**bits, (1_000_003,), generator=rng, dtype=torch.uint8)
        packed = pack.pack_codes(codes, bits)
        assert packed.numel() == (1_000_003 * bits + 7) // 8
        assert torch.equal(pack.unpack_codes(packed, bits, 1_000_003), codes)


def test_code_out_of_range_is_an_error():
    codes = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"value 4 at index 4 does not fit in 2 bits"):
        pack.pack_codes(codes, 2)


def test_pack_argument_errors():
    with pytest.raises(ValueError, match=r"bits: expected 1 <= bits <= 8, got 9"):
        pack.pack_codes(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="codes: expected dtype uint8, got int32"):
        pack.pack_codes(torch.zeros(3, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"packed: expected shape \[2, 2\], got \[2, 3\]"):
        pack.unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 2, 5)
