"""Multilinear-extension importance (ferrox.importance): the DP against
brute-force enumeration of every existence pattern, multilinearity, thread
determinism, the (eps, delta) sampling guarantee, grouping, the errors, the
ragbooster-compatible form, the Fakepedia toy and a planted-noise kNN corpus."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ferrox
from ferrox.importance import (group_gradient, learn_importance, multilinear_gradient, prune_lowest, rerank,
                               reweight_scores, sample_count, sampled_gradient)


# ---------------------------------------------------------------- reference

def brute_query(util, p, k):
    """d E[U] / d p for one query by enumerating all 2^m patterns:
    E[U | j exists] - E[U | j absent] = sum over patterns of U * d P(pattern) / d p_j."""
    m = len(util)
    pats = np.array(list(itertools.product([0, 1], repeat=m)), dtype=bool).reshape(-1, m)
    before = np.cumsum(pats, axis=1) - pats  # existing items ranked before each item
    u = ((pats & (before < k)) @ np.asarray(util, dtype=np.float64)) / k
    f = np.where(pats, p, 1.0 - p)
    grad = np.empty(m)
    for j in range(m):
        others = np.prod(np.delete(f, j, axis=1), axis=1)
        grad[j] = np.sum(np.where(pats[:, j], 1.0, -1.0) * others * u)
    return grad


def brute(rows, utils, k, probs):
    """Mean over queries of the per-query gradients, scattered onto the corpus."""
    g = np.zeros(len(probs))
    for ids, u in zip(rows, utils):
        ids = np.asarray(ids, dtype=np.int64)
        g[ids] += brute_query(u, probs[ids], k) if len(ids) else 0.0
    return g / len(rows)


def random_case(rng, q, m, n, ragged=False):
    rows, utils = [], []
    for _ in range(q):
        mm = int(rng.integers(0, m + 1)) if ragged else m
        rows.append(rng.choice(n, size=mm, replace=False))
        utils.append(rng.uniform(-1.0, 2.0, size=mm))
    probs = rng.uniform(0, 1, size=n)
    probs[rng.integers(0, n, size=2)] = [0.0, 1.0]  # the edges of the box too
    return rows, utils, probs


def padded(rows, utils, m):
    ids = np.full((len(rows), m), -1, dtype=np.int64)
    u = np.full((len(rows), m), 7.0)  # padding utilities must be ignored
    for q, (r, v) in enumerate(zip(rows, utils)):
        ids[q, :len(r)] = r
        u[q, :len(r)] = v
    return ids, u


# ------------------------------------------------------------ exactness

@pytest.mark.parametrize("m", [1, 3, 7, 10, 12])
@pytest.mark.parametrize("k", [1, 2, 3, "m+1", "m+5"])
def test_dp_matches_enumeration(m, k):
    k = m + int(k[2:]) if isinstance(k, str) else k
    rng = np.random.default_rng(100 * m + k)
    q = 2 if m >= 10 else 4
    rows, utils, probs = random_case(rng, q, m, n=m + 5)
    ids, u = padded(rows, utils, m)
    got = multilinear_gradient(ids, u, k, probs)
    want = brute(rows, utils, k, probs)
    assert got.dtype == np.float64 and got.shape == probs.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_ragged_layouts_agree_with_enumeration():
    rng = np.random.default_rng(1)
    rows, utils, probs = random_case(rng, 12, 9, 20, ragged=True)
    rows[3], utils[3] = rows[3][:0], utils[3][:0]  # an empty query counts in the mean
    want = brute(rows, utils, 2, probs)
    ids, u = padded(rows, utils, 9)
    a = multilinear_gradient(ids, u, 2, probs)
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    b = multilinear_gradient(np.concatenate(rows), np.concatenate(utils), 2, probs, indptr=indptr)
    c = multilinear_gradient([list(r) for r in rows], [list(v) for v in utils], 2, probs)
    np.testing.assert_allclose(a, want, rtol=0, atol=1e-10)
    assert np.array_equal(a, b) and np.array_equal(a, c)


@settings(max_examples=max(10, settings.default.max_examples // 2), deadline=None)
@given(data=st.data(), m=st.integers(1, 8), k=st.integers(1, 10), q=st.integers(1, 4))
def test_property_matches_enumeration(data, m, k, q):
    n = m + data.draw(st.integers(0, 4))
    unit = st.floats(0, 1, allow_nan=False)
    probs = np.array(data.draw(st.lists(unit, min_size=n, max_size=n)))
    rows = [data.draw(st.permutations(range(n)))[:m] for _ in range(q)]
    utils = [data.draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=m, max_size=m)) for _ in range(q)]
    got = multilinear_gradient(np.array(rows), np.array(utils), k, probs)
    np.testing.assert_allclose(got, brute(rows, utils, k, probs), rtol=0, atol=1e-10)


def test_multilinear_second_difference_is_zero():
    """E[U] is affine in each p_j: g_j does not move with p_j, and the whole
    gradient's second finite difference along any p_j vanishes."""
    rng = np.random.default_rng(2)
    rows, utils, probs = random_case(rng, 30, 10, 25)
    probs = np.clip(probs, 0.2, 0.8)
    ids, u = padded(rows, utils, 10)
    g0 = multilinear_gradient(ids, u, 3, probs)
    h = 0.1
    for j in range(len(probs)):
        e = np.zeros_like(probs)
        e[j] = h
        gp = multilinear_gradient(ids, u, 3, probs + e)
        gm = multilinear_gradient(ids, u, 3, probs - e)
        assert abs(gp[j] - g0[j]) < 1e-12
        np.testing.assert_allclose(gp - 2 * g0 + gm, 0.0, rtol=0, atol=1e-12)


def test_finite_difference_of_the_objective_is_the_gradient():
    """The objective itself, by enumeration, moves by exactly h * g_j."""
    rng = np.random.default_rng(3)
    m, k = 6, 2
    util = rng.uniform(0, 1, m)
    probs = rng.uniform(0.1, 0.9, m)

    def objective(p):
        pats = np.array(list(itertools.product([0, 1], repeat=m)), dtype=bool)
        before = np.cumsum(pats, axis=1) - pats
        u = ((pats & (before < k)) @ util) / k
        return float(np.sum(np.prod(np.where(pats, p, 1 - p), axis=1) * u))

    g = multilinear_gradient(np.arange(m)[None], util[None], k, probs)
    for j in range(m):
        e = np.zeros(m)
        e[j] = 0.25
        assert abs((objective(probs + e) - objective(probs)) / 0.25 - g[j]) < 1e-12


def test_torch_in_torch_out():
    rng = np.random.default_rng(4)
    rows, utils, probs = random_case(rng, 5, 6, 12)
    ids, u = padded(rows, utils, 6)
    got = multilinear_gradient(torch.from_numpy(ids), torch.from_numpy(u).float(), 2, torch.from_numpy(probs))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    # float32 utilities are widened exactly, not rounded
    np.testing.assert_array_equal(got.numpy(), multilinear_gradient(ids, u.astype(np.float32), 2, probs))


# ------------------------------------------------------------ determinism

def test_same_bits_for_one_and_two_threads():
    rng = np.random.default_rng(5)
    q, m, n = 6000, 40, 20000
    ids = np.argsort(rng.random((q, n // 50)), axis=1)[:, :m] * 50 + rng.integers(0, 50, (q, 1))
    u = rng.integers(0, 2, (q, m)).astype(np.float64)
    probs = rng.uniform(0, 1, n)
    results = []
    try:
        for t in (1, 2):
            ferrox.set_num_threads(t)
            results.append((multilinear_gradient(ids, u, 5, probs), sampled_gradient(ids, u, 5, probs, 0.2, 0.1, 7),
                            learn_importance((ids, u), 5, 50.0, 3, probs=probs),
                            learn_importance((ids[:300], u[:300]), 5, 50.0, 3, probs=probs)))
    finally:
        ferrox.set_num_threads(ferrox._runtime._default_threads())
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()
    assert np.abs(results[0][0]).max() > 0


# ------------------------------------------------------------ sampling

def test_sampling_is_within_eps_with_the_stated_probability():
    rng = np.random.default_rng(6)
    rows, utils, probs = random_case(rng, 3, 8, 12)
    utils = [np.round(rng.uniform(0, 1, 8), 2) for _ in rows]
    ids, u = padded(rows, utils, 8)
    k, eps, delta = 2, 0.05, 0.1
    exact = multilinear_gradient(ids, u, k, probs)
    span = max(u.max(), 0) - min(u.min(), 0)
    assert sample_count(u, k, eps, delta) == math.ceil(2 * (span / k) ** 2 * math.log(2 / delta) / eps ** 2)
    assert sample_count(np.array([[0.5, 9.0]]), 1, eps, delta, retrieved=np.array([[3, -1]])) == \
        math.ceil(2 * 0.5 ** 2 * math.log(2 / delta) / eps ** 2)
    seeds = 100
    est = np.stack([sampled_gradient(ids, u, k, probs, eps, delta, seed=s) for s in range(seeds)])
    err = np.abs(est - exact)
    retrieved = np.isin(np.arange(len(probs)), ids)
    # Per item, the share of seeds missing eps is at most delta (plus binomial slack).
    assert (err >= eps).mean(axis=0).max() <= delta + 3 * math.sqrt(delta * (1 - delta) / seeds)
    assert err[:, retrieved].max() > 0  # it samples: not the exact value by accident
    assert np.abs(est.mean(axis=0) - exact).max() < eps / 3  # unbiased
    assert np.array_equal(est[0], sampled_gradient(ids, u, k, probs, eps, delta, seed=0))


# ------------------------------------------------------------ learning and grouping

def test_grouping_is_the_sum_of_the_group_item_gradients():
    rng = np.random.default_rng(7)
    rows, utils, _ = random_case(rng, 40, 6, 30)
    ids, u = padded(rows, utils, 6)
    groups = rng.integers(0, 7, size=30)
    v0 = np.full(30, 0.5)
    g = multilinear_gradient(ids, u, 2, v0)
    naive = np.array([g[groups == c].sum() for c in range(7)])
    np.testing.assert_allclose(group_gradient(g, groups), naive, rtol=0, atol=1e-15)
    lr = 3.0
    got = learn_importance((ids, u), 2, lr, 1, grouping=groups)
    np.testing.assert_allclose(got, np.clip(0.5 + lr * naive, 0, 1)[groups], rtol=0, atol=1e-15)
    # two epochs: the second gradient is taken at the shared weights
    w1 = np.clip(0.5 + lr * naive, 0, 1)
    g1 = multilinear_gradient(ids, u, 2, w1[groups])
    w2 = np.clip(w1 + lr * group_gradient(g1, groups, 7), 0, 1)
    np.testing.assert_allclose(learn_importance((ids, u), 2, lr, 2, grouping=groups), w2[groups], atol=1e-15)


@pytest.mark.parametrize("n", [15, 400])  # more entries than items (dense gradient) and fewer (per-entry steps)
def test_learning_without_groups_is_clipped_ascent(n):
    rng = np.random.default_rng(8)
    rows, utils, probs = random_case(rng, 20, 5, n)
    ids, u = padded(rows, utils, 5)
    v = probs.copy()
    for _ in range(4):
        v = np.clip(v + 2.0 * multilinear_gradient(ids, u, 2, v), 0, 1)
    np.testing.assert_allclose(learn_importance((ids, u), 2, 2.0, 4, probs=probs), v, rtol=0, atol=1e-14)


def test_ragbooster_form_matches_its_update_rule():
    """List-of-dicts input, corpus size max id + 1, ragbooster's grouping rule
    (each item steps and is clipped, then takes its group's mean)."""
    rng = np.random.default_rng(9)
    rows, utils, _ = random_case(rng, 25, 6, 18)
    retrievals = [{"retrieved": [int(i) for i in r], "utility_contributions": [float(x) for x in v]}
                  for r, v in zip(rows, utils)]
    n = max(int(r.max()) for r in rows if len(r)) + 1
    groups = list(rng.integers(0, 4, size=n))
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    flat_ids, flat_u = np.concatenate(rows).astype(np.int64), np.concatenate(utils)
    v = np.full(n, 0.5)
    for _ in range(3):
        v = np.clip(v + 0.5 * multilinear_gradient(flat_ids, flat_u, 3, v, indptr=indptr), 0, 1)
        means = np.array([v[np.array(groups) == c].mean() if c in groups else 0 for c in range(4)])
        v = means[groups]
    got = learn_importance(retrievals, 3, 0.5, 3, n_jobs=1, grouping=groups)
    assert isinstance(got, list) and len(got) == n
    np.testing.assert_allclose(got, v, rtol=0, atol=1e-14)
    plain = learn_importance(retrievals, 3, 0.5, 3)
    assert len(plain) == n and learn_importance([], 1, 0.1, 1) == [0.5]


def test_fakepedia_toy():
    """One question (who won the Turing award?), two right answers; six
    sources ranked Wikipedia, Bing, Fakepedia, Google, DuckDuckGo, Liepedia.
    Fakepedia (rank 3, inside the top 3) answers wrongly and must drop below
    0.5; the right sources rise. Liepedia (rank 6) is wrong too but only
    matters when three of the five above it are missing, so it falls less;
    with grouping it shares Fakepedia's weight and falls below 0.5 as well."""
    wiki, bing, fake, google, ddg, lie = range(6)
    answers = ["stonebraker", "gray", "schelter", "gray", "stonebraker", "grafberger"]
    right = {"stonebraker", "gray"}
    retrievals = [{"retrieved": [wiki, bing, fake, google, ddg, lie],
                   "utility_contributions": [float(a in right) for a in answers]}]
    v = learn_importance(retrievals, 3, 0.1, 3)
    assert v[fake] < 0.5 and v[lie] <= 0.5
    assert all(v[i] > 0.5 for i in (wiki, bing, google, ddg))
    assert v[fake] < v[lie]
    grouped = learn_importance(retrievals, 3, 0.1, 3, grouping=[0, 1, 2, 1, 0, 2])
    assert grouped[fake] == grouped[lie] < 0.5 and min(grouped[i] for i in (wiki, bing, google, ddg)) > 0.5


# ------------------------------------------------------------ planted noise

def test_planted_noise_pruning_beats_random_pruning():
    """``ferrox.testing.retrieval.planted_noise``: 10k synthetic items (4
    Gaussian classes in 2-d), 30% of the labels flipped to another class.
    Validation queries (clean labels) retrieve their M = 20 nearest items; an
    item's utility is 1 if its label equals the query's, else 0; the model is
    a k = 5 nearest-neighbour vote. Learning importance and pruning the 30%
    lowest must raise validation and test accuracy more than pruning 30% at
    random."""
    from ferrox.testing.retrieval import planted_noise

    c = planted_noise(seed=10)
    n = c.x.shape[0]
    v = learn_importance((c.retrieved, c.utility), c.k, 200.0, 5, num_items=n)
    everything = np.ones(n, dtype=bool)
    base = c.accuracy(everything)
    pruned = everything.copy()
    pruned[prune_lowest(v, 3000)] = False
    learned = c.accuracy(pruned)
    randoms = []
    for seed in range(3):
        keep = everything.copy()
        keep[np.random.default_rng(seed).choice(n, 3000, replace=False)] = False
        randoms.append(c.accuracy(keep))
    random_val, random_test = np.mean(randoms, axis=0)
    print(f"accuracy val/test: all {base}, importance-pruned {learned}, random-pruned ({random_val}, {random_test}); "
          f"noisy share of the pruned: {c.noisy[~pruned].mean():.3f}")
    assert learned[0] - base[0] > random_val - base[0] + 0.01
    assert learned[1] - base[1] > random_test - base[1] + 0.01
    assert c.noisy[~pruned].mean() > 0.6  # it finds the planted noise


# ------------------------------------------------------------ outputs

def test_prune_reweight_rerank():
    w = np.array([0.9, 0.1, 0.5, 0.1, 0.7])
    assert prune_lowest(w, 3).tolist() == [1, 3, 2]
    assert prune_lowest(w, 0).tolist() == []
    ids = np.array([[0, 1, 2], [4, 3, -1]])
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 5.0, 9.0]])
    s = reweight_scores(scores, ids, w)
    np.testing.assert_array_equal(s, [[2.7, 0.2, 0.5], [0.7, 0.5, -np.inf]])
    assert rerank(ids, scores, w).tolist() == [[0, 2, 1], [4, 3, -1]]


# ------------------------------------------------------------ errors

def _case():
    ids = np.array([[0, 1, 2], [3, 4, -1]])
    return ids, np.ones((2, 3)), np.full(6, 0.5)


@pytest.mark.parametrize("change, match", [
    (lambda i, u, p: (np.array([[0, 1, 6], [3, 4, -1]]), u, p), r"retrieved: id 6 at query 0, position 2 is out of range"),
    (lambda i, u, p: (np.array([[0, 1, -2], [3, 4, -1]]), u, p), r"retrieved: id -2 at query 0, position 2"),
    (lambda i, u, p: (np.array([[0, 1, 2], [3, 3, -1]]), u, p), r"retrieved: id 3 appears twice in query 1 \(positions 0 and 1\)"),
    (lambda i, u, p: (np.array([[0, -1, 2], [3, 4, -1]]), u, p), r"retrieved: query 0 has id 2 at position 2 after -1 padding"),
    (lambda i, u, p: (i, np.ones((2, 2)), p), r"utility: shape \(2, 2\)|utility: shape \[2, 2\]"),
    (lambda i, u, p: (i, np.array([[1, np.nan, 0], [0, 0, 0]]), p), r"utility: non-finite value NaN at query 0, position 1"),
    (lambda i, u, p: (i, np.array([[1, 0, 0], [0, np.inf, 0]]), p), r"utility: non-finite value inf at query 1, position 1"),
    (lambda i, u, p: (i, u, np.array([0.5, 0.5, 1.5, 0.5, 0.5, 0.5])), r"probs: value 1.5 at index 2 is outside \[0, 1\]"),
    (lambda i, u, p: (i, u, np.array([0.5, -0.1, 0.5, 0.5, 0.5, 0.5])), r"probs: value -0.1 at index 1"),
    (lambda i, u, p: (i, u, np.array([0.5, 0.5, np.nan, 0.5, 0.5, 0.5])), r"probs: value NaN at index 2"),
    (lambda i, u, p: (i, u, np.full((2, 3), 0.5)), r"probs: expected a 1-d array"),
    (lambda i, u, p: (i[0], u[0], p), r"retrieved: expected a 2-d array"),
])
def test_value_errors_name_the_argument(change, match):
    ids, u, p = change(*_case())
    with pytest.raises(ValueError, match=match):
        multilinear_gradient(ids, u, 2, p)
    with pytest.raises(ValueError, match=match):
        sampled_gradient(ids, u, 2, p, 0.1, 0.1)


def test_more_value_errors():
    ids, u, p = _case()
    flat, fu = np.array([0, 1, 2, 3]), np.ones(4)
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        multilinear_gradient(ids, u, 0, p)
    with pytest.raises(ValueError, match=r"indptr: offsets must not decrease"):
        multilinear_gradient(flat, fu, 1, p, indptr=np.array([0, 3, 2, 4]))
    with pytest.raises(ValueError, match=r"indptr: expected the last offset to be len\(retrieved\) = 4, got 3"):
        multilinear_gradient(flat, fu, 1, p, indptr=np.array([0, 3]))
    with pytest.raises(ValueError, match=r"indptr: expected indptr\[0\] = 0"):
        multilinear_gradient(flat, fu, 1, p, indptr=np.array([1, 4]))
    with pytest.raises(ValueError, match=r"retrieved: id -1 at query 1, position 0 is out of range"):
        multilinear_gradient(np.array([0, -1]), np.ones(2), 1, p, indptr=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"utility: query 1 has 1 utilities for 2 retrieved ids"):
        multilinear_gradient([[0], [1, 2]], [[1.0], [1.0]], 1, p)
    with pytest.raises(ValueError, match=r"eps: expected a finite value > 0"):
        sampled_gradient(ids, u, 2, p, 0.0, 0.1)
    with pytest.raises(ValueError, match=r"delta: expected a value in \(0, 1\)"):
        sampled_gradient(ids, u, 2, p, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"seed: expected an integer"):
        sampled_gradient(ids, u, 2, p, 0.1, 0.1, seed=-1)
    with pytest.raises(ValueError, match=r"grouping: expected 6 group ids"):
        learn_importance((ids, u), 2, 0.1, 1, grouping=[0, 1], num_items=6)
    with pytest.raises(ValueError, match=r"grouping: group id -1 at item 1 is negative"):
        learn_importance((ids, u), 2, 0.1, 1, grouping=[0, -1, 0, 0, 0, 0], num_items=6)
    with pytest.raises(ValueError, match=r"group_step: expected 'sum' or 'mean'"):
        learn_importance((ids, u), 2, 0.1, 1, grouping=[0] * 5, group_step="max")
    with pytest.raises(ValueError, match=r"learning_rate: expected a finite value"):
        learn_importance((ids, u), 2, float("nan"), 1)
    with pytest.raises(ValueError, match=r"retrievals\[1\]: missing key 'utility_contributions'"):
        learn_importance([{"retrieved": [0], "utility_contributions": [1.0]}, {"retrieved": [1]}], 1, 0.1, 1)
    with pytest.raises(ValueError, match=r"n: expected an integer in \[0, 3\]"):
        prune_lowest([0.1, 0.2, 0.3], 4)
    with pytest.raises(TypeError, match=r"retrieved: expected integer ids"):
        multilinear_gradient(ids.astype(np.float64), u, 2, p)
