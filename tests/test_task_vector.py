"""Task-vector arithmetic against direct tensor computations."""

import math

import pytest
import torch

from ferrox.merge import TaskVector, merge_tensors


def sd(seed, shapes=((4, 6), (5,))):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def test_arithmetic_and_apply():
    base, a, b, c = sd(0), sd(1), sd(2), sd(3)
    ta, tb, tc = (TaskVector.from_state_dicts(base, m) for m in (a, b, c))
    for k in base:
        torch.testing.assert_close((ta + tb).deltas[k], (a[k] - base[k]) + (b[k] - base[k]))
        torch.testing.assert_close((-ta).deltas[k], base[k] - a[k])
        torch.testing.assert_close((0.5 * ta).deltas[k], 0.5 * (a[k] - base[k]))
        torch.testing.assert_close(TaskVector.analogy(ta, tb, tc).deltas[k], (c[k] - base[k]) + (b[k] - a[k]))
    applied = sum([ta, tb]).apply_to(base, 0.3)
    for k in base:
        torch.testing.assert_close(applied[k], base[k] + 0.3 * ((a[k] - base[k]) + (b[k] - base[k])))
    # Negation then application forgets: θ_a − τ_a = θ_base.
    back = (-ta).apply_to(a)
    for k in base:
        torch.testing.assert_close(back[k], base[k])


def test_task_arithmetic_merge_agrees_with_task_vectors():
    base, a, b = sd(0), sd(1), sd(2)
    tv = 0.4 * TaskVector.from_state_dicts(base, a) + 0.6 * TaskVector.from_state_dicts(base, b)
    want = tv.apply_to(base)
    for k in base:
        got = merge_tensors("task_arithmetic", base[k], [a[k], b[k]], weight=[0.4, 0.6])
        torch.testing.assert_close(got, want[k], rtol=1e-6, atol=1e-6)


def test_cosine():
    base, a = sd(0), sd(1)
    ta = TaskVector.from_state_dicts(base, a)
    assert math.isclose(ta.cosine(ta), 1.0, rel_tol=1e-12)
    assert math.isclose(ta.cosine(-ta), -1.0, rel_tol=1e-12)
    flat = torch.cat([v.flatten() for v in ta.deltas.values()]).double()
    tb = TaskVector.from_state_dicts(base, sd(2))
    flat_b = torch.cat([v.flatten() for v in tb.deltas.values()]).double()
    assert math.isclose(ta.cosine(tb), float(flat @ flat_b / flat.norm() / flat_b.norm()), rel_tol=1e-9)
    per = ta.cosine_per_tensor(tb)
    v, w = ta.deltas["t0"].double().flatten(), tb.deltas["t0"].double().flatten()
    assert math.isclose(per["t0"], float(v @ w / v.norm() / w.norm()), rel_tol=1e-9)


def test_mismatch_errors():
    base, a = sd(0), sd(1, shapes=((4, 6), (6,)))
    with pytest.raises(ValueError, match="t1"):
        TaskVector.from_state_dicts(base, a)
    with pytest.raises(ValueError, match="only one"):
        TaskVector.from_state_dicts(base, {"t0": base["t0"]})
