"""Datamodel-matching unlearning and the KLoM metric (ferrox.importance.unlearn).

KLoM against a per-point numpy loop (np.histogram over the shared range,
the EasyDUB formula), and the functional claim of DMM: on a small synthetic
task, with 50 originals, 50 oracles (retrained without the forget set,
other seeds) and 50 unlearned models, DMM's forget-set KLoM beats gradient
ascent's at every step count and learning rate of a grid. The attribution
is regression datamodels (ridge on random 80% subsets retrained), the
matching fine-tune is on the margins of every training point. All models of
one kind are trained at once as a stack of MLPs (one batched matmul).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ferrox.importance import datamodel_targets, dmm_unlearn, fit_datamodels, klom, klom_scores, margins


def naive_klom_scores(u, o, bins=20, clip=100.0, eps=1e-5):
    out = []
    for j in range(u.shape[1]):
        p_s, q_s = np.clip(u[:, j], -clip, clip), np.clip(o[:, j], -clip, clip)
        lo, hi = min(p_s.min(), q_s.min()), max(p_s.max(), q_s.max())
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, bins + 1)
        p = np.histogram(p_s, edges)[0] / len(p_s)
        q = np.histogram(q_s, edges)[0] / len(q_s)
        out.append(sum(pb * math.log(pb / max(qb, eps)) for pb, qb in zip(p, q) if pb > 0))
    return np.array(out)


@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 6), st.integers(1, 25), st.integers(0, 2**31),
       st.booleans())
def test_klom_scores_match_a_per_point_histogram_loop(n_u, n_o, points, bins, seed, coarse):
    rng = np.random.default_rng(seed)
    u = rng.normal(0, 3, (n_u, points))
    o = rng.normal(1, 2, (n_o, points))
    if coarse:  # many equal margins and values on bin edges, some clipped
        u, o = np.round(u) * 40, np.round(o) * 40
    got = klom_scores(u, o, bins=bins)
    np.testing.assert_allclose(got, naive_klom_scores(u, o, bins=bins), rtol=1e-12, atol=1e-12)
    assert klom(u, o, bins=bins) == pytest.approx(np.quantile(got, 0.95), rel=1e-12, abs=1e-12)


def test_klom_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 40))
    assert np.all(klom_scores(x, x) == 0.0)
    assert klom(x, x) == 0.0
    assert klom_scores(np.ones((5, 3)), np.ones((7, 3))).tolist() == [0.0, 0.0, 0.0]
    # Disjoint supports, each inside one bin: KL = log(1 / eps).
    far = klom_scores(0.01 * x, 0.01 * x + 50.0)
    np.testing.assert_allclose(far, -np.log(1e-5), rtol=1e-12)
    near = klom_scores(x[:25], x[25:])
    assert np.all(near < far) and np.all(near >= 0)
    with pytest.raises(ValueError, match="oracle_margins"):
        klom_scores(x, x[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        klom_scores(np.full((2, 2), np.nan), x[:2, :2])


def test_margins_and_datamodel_targets():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 3.0]]])
    want = torch.tensor([[2.0 - math.log(1 + math.e), 3.0 - math.log(1 + math.exp(3.0))]])
    torch.testing.assert_close(margins(logits, torch.tensor([0, 2])), want)
    scores = np.arange(12.0).reshape(4, 3)
    full = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    got = datamodel_targets(scores, [3, 1], full)
    torch.testing.assert_close(got, full - torch.tensor(scores[3] + scores[1], dtype=torch.float32))
    with pytest.raises(ValueError, match="appears twice"):
        datamodel_targets(scores, [1, 1], full)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        datamodel_targets(scores, [4], full)


def test_fit_datamodels_recovers_a_linear_model():
    rng = np.random.default_rng(1)
    masks = (rng.random((400, 30)) < 0.5).astype(np.float64)
    beta = rng.normal(size=(30, 4))
    outputs = 2.0 + masks @ beta
    np.testing.assert_allclose(fit_datamodels(masks, outputs, ridge=1e-9), beta, atol=1e-6)


def test_dmm_unlearn_matches_targets_with_the_default_margins():
    # Oracle matching of one classifier onto another's margins, in minibatches.
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model, oracle = (nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(2))
    with torch.no_grad():
        targets = margins(oracle(x), y)
        before = nn.functional.mse_loss(margins(model(x), y), targets).item()
    losses = dmm_unlearn(model, (x, y), targets, steps=300, lr=0.02, batch_size=16, seed=1)
    with torch.no_grad():
        after = nn.functional.mse_loss(margins(model(x), y), targets).item()
    assert len(losses) == 300 and after < 0.1 * before
    with pytest.raises(ValueError, match="targets"):
        dmm_unlearn(model, (x, y), targets[:10])


# -- the functional check ---------------------------------------------------

D, H, C = 4, 16, 3  # a 4-16-3 tanh MLP: 131 parameters
N, FORGET = 100, 10  # training points; the first FORGET of them are forgotten
MODELS, SUBSETS = 50, 400


class StackedMLP(nn.Module):
    """``m`` independent MLPs evaluated at once: x [n, D] -> logits [m, n, C]."""

    def __init__(self, m, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(m, D, H, generator=g) / math.sqrt(D))
        self.b1 = nn.Parameter(torch.zeros(m, 1, H))
        self.w2 = nn.Parameter(torch.randn(m, H, C, generator=g) / math.sqrt(H))
        self.b2 = nn.Parameter(torch.zeros(m, 1, C))

    def forward(self, x):
        return torch.tanh(torch.matmul(x, self.w1) + self.b1) @ self.w2 + self.b2


def blobs(n, seed, noise=0.2):
    """3 Gaussian blobs in 4-d, 20% of the labels redrawn at random (so
    single training points matter)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, D, generator=g) * 1.5
    y = torch.randint(0, C, (n,), generator=g)
    x = centers[y] + torch.randn(n, D, generator=g)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(0, C, (n,), generator=g), y)


def train(include, x, y, seed, steps=150, lr=0.06):
    """One model per row of ``include`` [m, n] (1: the point is in its
    training set), full-batch Adam on the mean cross-entropy over it."""
    model = StackedMLP(include.shape[0], seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    w = include / include.sum(1, keepdim=True)
    for _ in range(steps):
        ce = nn.functional.cross_entropy(model(x).reshape(-1, C), y.repeat(include.shape[0]), reduction="none")
        loss = (ce.reshape(include.shape) * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def copy_of(model):
    twin = StackedMLP(MODELS, 0)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny batched steps: one torch thread is fastest (and
    does not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task(one_thread):
    torch.manual_seed(0)
    x, y = blobs(N, 0)
    forget = torch.arange(FORGET)
    full = train(torch.ones(MODELS, N), x, y, seed=1)
    keep = torch.ones(MODELS, N)
    keep[:, forget] = 0
    oracle = train(keep, x, y, seed=2)
    subsets = (torch.rand(SUBSETS, N, generator=torch.Generator().manual_seed(3)) < 0.8).float()
    sub = train(subsets, x, y, seed=4)
    with torch.no_grad():
        m_full, m_oracle, m_sub = (margins(m(x), y) for m in (full, oracle, sub))
    return dict(x=x, y=y, forget=forget, full=full, m_full=m_full, m_oracle=m_oracle, subsets=subsets, m_sub=m_sub)


def test_dmm_beats_gradient_ascent_on_forget_klom(task):
    x, y, forget, m_oracle = task["x"], task["y"], task["forget"], task["m_oracle"]
    beta = fit_datamodels(task["subsets"], task["m_sub"], ridge=1e-3)
    targets = datamodel_targets(beta, forget, task["m_full"])  # [models, n]
    model = copy_of(task["full"])
    dmm_unlearn(model, (x, y), targets.T, output_fn=lambda m, a, b: margins(m(a), b).T, steps=100, lr=0.01)
    with torch.no_grad():
        dmm = klom(margins(model(x), y)[:, forget], m_oracle[:, forget])
    untouched = klom(task["m_full"][:, forget], m_oracle[:, forget])

    ga = {}
    for lr in (0.01, 0.03, 0.1):
        model = copy_of(task["full"])
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for step in range(1, 41):
            # the sum over models of each model's mean forget cross-entropy, ascended
            ce = nn.functional.cross_entropy(model(x[forget]).reshape(-1, C), y[forget].repeat(MODELS)) * MODELS
            opt.zero_grad()
            (-ce).backward()
            opt.step()
            if step in (5, 10, 20, 40):
                with torch.no_grad():
                    ga[lr, step] = klom(margins(model(x), y)[:, forget], m_oracle[:, forget])
    best_ga = min(ga.values())
    print(f"forget KLoM: untouched {untouched:.3f}, DMM {dmm:.3f}, best gradient ascent {best_ga:.3f} "
          f"(at lr, steps = {min(ga, key=ga.get)})")
    assert dmm < best_ga
    assert dmm < 0.6 * untouched
