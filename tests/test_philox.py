"""Philox4x32-10: Random123 known answers, counter addressing, distributions,
and CPU/GPU bit identity."""

import numpy as np
import pytest
import torch
from scipy import stats

from ferrox import philox

# Random123 kat_vectors for philox4x32 with 10 rounds.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_known_answer_vectors(ctr, key, want):
    assert philox.philox4x32_10(ctr, key) == want


def test_counter_layout_matches_block_function():
    seed, stream = 0x1234_5678_9ABC_DEF0, 0xDEAD_BEEF_0000_0007
    bits = philox.bits((10,), seed=seed, stream=stream, offset=6).numpy().view(np.uint32)
    for i, e in enumerate(range(6, 16)):
        blk, lane = divmod(e, 4)
        ctr = (blk & 0xFFFFFFFF, blk >> 32, stream & 0xFFFFFFFF, stream >> 32)
        assert bits[i] == philox.philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))[lane]


def test_uniform_is_bits_mapped_exactly():
    b = philox.bits((100_001,), seed=7, stream=3, offset=5).numpy().view(np.uint32)
    u = philox.uniform((100_001,), seed=7, stream=3, offset=5).numpy()
    want = ((b >> 9).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)
    assert np.array_equal(u, want)
    assert u.min() > 0 and u.max() < 1


@pytest.mark.parametrize("fill", [philox.uniform, philox.normal])
def test_values_depend_only_on_element_index(fill):
    whole = fill((1_000_000,), seed=99, stream=1)
    pieces = torch.cat([fill((n,), seed=99, stream=1, offset=o)
                        for o, n in [(0, 3), (3, 250_001), (250_004, 749_996)]])
    assert torch.equal(whole, pieces)
    import ferrox
    t = ferrox.get_num_threads()
    ferrox.set_num_threads(1)
    try:
        assert torch.equal(fill((1_000_000,), seed=99, stream=1), whole)
    finally:
        ferrox.set_num_threads(t)


def test_streams_and_seeds_differ():
    a = philox.uniform((1000,), seed=1, stream=0)
    assert not torch.equal(a, philox.uniform((1000,), seed=2, stream=0))
    assert not torch.equal(a, philox.uniform((1000,), seed=1, stream=1))


def test_uniform_distribution():
    u = philox.uniform((1_000_000,), seed=2024).double().numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)


def test_normal_distribution():
    z = philox.normal((1_000_000,), seed=2024).double().numpy()
    assert np.isfinite(z).all()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    within = np.mean(np.abs(z) < 1)
    assert abs(within - 0.682689) < 5 * np.sqrt(0.6827 * 0.3173 / z.size)


def test_argument_errors():
    with pytest.raises(ValueError, match="seed"):
        philox.uniform((3,), seed=-1)
    with pytest.raises(TypeError, match="out: expected dtype float32, got float16"):
        philox.uniform(seed=1, out=torch.empty(3, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("fill", [philox.uniform, philox.normal])
def test_cuda_bits_identical_to_cpu(fill):
    cpu = fill((1_000_003,), seed=5, stream=11, offset=13)
    gpu = fill((1_000_003,), seed=5, stream=11, offset=13, device="cuda")
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))
