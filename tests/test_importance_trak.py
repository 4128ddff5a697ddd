"""TRAK-style attribution: the implicit Rademacher projection (determinism,
its documented (seed, i, j) mapping, JL distortion vs a dense Gaussian,
memory) and the TRAKer against closed-form ridge regression retraining."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ferrox
from ferrox import _core
from ferrox.importance import TRAKer, project


def rademacher_naive(seed, p, d):
    """R [p, d] from the documented mapping, via the Philox words of each stream."""
    words = (d + 31) // 32
    r = np.empty((p, d))
    for i in range(p):
        w = torch.empty(words, dtype=torch.int32)
        _core.philox_bits(w, seed, i, 0)
        u = w.numpy().view(np.uint32)
        j = np.arange(d)
        bit = (u[j // 32] >> (j % 32).astype(np.uint32)) & 1
        r[i] = np.where(bit == 1, -1.0, 1.0)
    return r


def test_projection_follows_the_mapping():
    for n, d, p, seed in [(3, 1, 1, 0), (4, 300, 70, 5), (2, 129, 130, 2**63 + 7)]:
        g = torch.randn(n, d, generator=torch.Generator().manual_seed(d))
        got = project(g, p, seed).double().numpy()
        want = g.double().numpy() @ rademacher_naive(seed, p, d).T / np.sqrt(p)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_projection_seeded_deterministic():
    g = torch.randn(6, 5000, generator=torch.Generator().manual_seed(1))
    before = ferrox.get_num_threads()
    try:
        ferrox.set_num_threads(1)
        one = project(g, 300, 11)
        ferrox.set_num_threads(2)
        two = project(g, 300, 11)
    finally:
        ferrox.set_num_threads(before)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))
    assert torch.equal(project(g, 300, 11).view(torch.int32), one.view(torch.int32))
    other = project(g, 300, 12)
    assert (other != one).float().mean() > 0.99
    # A row projected alone gets the bits it gets in a batch.
    assert torch.equal(project(g[3], 300, 11).view(torch.int32), one[3].view(torch.int32))
    # Half inputs: the same as their exact f32 widening.
    gb = g.bfloat16()
    assert torch.equal(project(gb, 300, 11), project(gb.float(), 300, 11))


def distortion(px, py, x, y):
    num = (px * py).sum(1) - (x * y).sum(1)
    return np.percentile((num.abs() / (x.norm(dim=1) * y.norm(dim=1))).numpy(), 95)


def test_jl_distortion_vs_dense_gaussian():
    d, p, pairs = 2048, 256, 3000
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(pairs, d, generator=gen, dtype=torch.float64)
    # Half independent pairs, half correlated ones (<x, y> far from 0).
    y = torch.randn(pairs, d, generator=gen, dtype=torch.float64)
    y[: pairs // 2] = x[: pairs // 2] + 0.5 * y[: pairs // 2]
    ours = distortion(project(x.float(), p, 0).double(), project(y.float(), p, 0).double(), x, y)
    gauss = []
    for s in range(3):
        m = torch.randn(p, d, generator=torch.Generator().manual_seed(100 + s), dtype=torch.float64) / np.sqrt(p)
        gauss.append(distortion(x @ m.T, y @ m.T, x, y))
    ref = float(np.mean(gauss))
    print(f"JL 95th pct distortion: rademacher {ours:.4f}, dense gaussian {ref:.4f} (p={p}, d={d})")
    assert ours <= 1.1 * ref
    # And it is a real projection: the distortion is of order sqrt(2/p).
    assert ours < 3 * np.sqrt(2 / p)


CHILD = r"""
import json, torch
from ferrox.importance import project
import ferrox._core
def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
project(torch.zeros(1, 4096), 16, 0)  # load the extension and its pool first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kb("VmRSS")
g = torch.empty(8, 1 << 20)
g.normal_()
out = project(g, 2048, 0)
assert out.shape == (8, 2048) and bool(torch.isfinite(out).all())
print(json.dumps({"base_kb": base, "peak_kb": kb("VmHWM")}))
"""


def test_projection_memory_1m_to_2048():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.fail("needs /proc/self/clear_refs to measure peak RSS")
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    extra_mb = (m["peak_kb"] - m["base_kb"]) / 1024
    print(f"peak RSS above baseline: {extra_mb:.1f} MB (the 8 x 1M float32 input alone is 32 MB)")
    assert extra_mb < 64


def ridge_fit(x, y, lam):
    d = x.shape[1]
    return torch.linalg.solve(x.T @ x + lam * torch.eye(d, dtype=x.dtype), x.T @ y)


def linear_model(theta):
    m = torch.nn.Linear(theta.shape[0], 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(theta[None])
    return m


def reg_out(model, x, y):
    return model(x.unsqueeze(0))[0, 0]


def reg_q(model, x, y):
    # -d(½(f - y)²)/df
    return y - model(x.unsqueeze(0))[0, 0]


def ridge_case(seed, n=400, d=10, n_eval=40):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    xe = torch.randn(n_eval, d, generator=gen, dtype=torch.float64)
    return x, y, xe


def removal_correlation(tau, x, y, xe, lam, seed, subsets=100, frac=0.05):
    theta = ridge_fit(x, y, lam)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    pred, actual = [], []
    for _ in range(subsets):
        s = rng.choice(n, int(frac * n), replace=False)
        keep = np.setdiff1d(np.arange(n), s)
        th = ridge_fit(x[keep], y[keep], lam)
        actual.append((xe @ (th - theta)).numpy())
        pred.append(-tau[s].sum(0).numpy())
    return np.corrcoef(np.concatenate(pred), np.concatenate(actual))[0, 1]


def featurize_all(tr, x, y, batch=64):
    for s in range(0, x.shape[0], batch):
        tr.featurize((x[s:s + batch], y[s:s + batch]), torch.arange(s, min(s + batch, x.shape[0])))


@pytest.mark.parametrize("proj_dim", [None, 256])
def test_trak_ridge_predicts_retraining(proj_dim):
    lam = 2.0
    x, y, xe = ridge_case(0)
    theta = ridge_fit(x, y, lam)
    tr = TRAKer(linear_model(theta), x.shape[0], output_fn=reg_out, out_to_loss=reg_q,
                proj_dim=proj_dim, seed=4, lambda_=lam)
    featurize_all(tr, x, y)
    tr.finalize()
    tau = tr.score((xe, torch.zeros(xe.shape[0], dtype=torch.float64))).double()
    assert tau.shape == (x.shape[0], xe.shape[0])
    if proj_dim is None:
        # Full gradients: τ is the one-Newton-step influence in closed form.
        h = x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64)
        want = (x @ torch.linalg.solve(h, xe.T)) * (y - x @ theta)[:, None]
        torch.testing.assert_close(tau, want, rtol=1e-4, atol=1e-6)
    r = removal_correlation(tau, x, y, xe, lam, seed=1)
    print(f"proj_dim={proj_dim}: Pearson(predicted, retrained) = {r:.4f}")
    assert r > 0.95


def test_trak_scores_are_not_noise():
    # A shuffled attribution must fail the same check (the test can fail).
    lam = 2.0
    x, y, xe = ridge_case(2)
    theta = ridge_fit(x, y, lam)
    tr = TRAKer(linear_model(theta), x.shape[0], output_fn=reg_out, out_to_loss=reg_q, proj_dim=None, lambda_=lam)
    featurize_all(tr, x, y)
    tr.finalize()
    tau = tr.score((xe, torch.zeros(xe.shape[0], dtype=torch.float64))).double()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    assert removal_correlation(tau[perm], x, y, xe, lam, seed=3) < 0.5


def logistic_setup(seed, n=120, d=6, classes=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    models = []
    for k in range(2):
        torch.manual_seed(seed * 10 + k)
        models.append(torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, classes)))
    return x, y, models


def test_ensemble_is_the_mean_and_resume_skips_done(tmp_path):
    x, y, models = logistic_setup(0)
    xe, ye = x[:10] + 0.1, y[:10]
    sds = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in enumerate(models)}
    singles = []
    for k in sds:
        tr = TRAKer(models[0], x.shape[0], proj_dim=32, seed=1, lambda_=1e-3)
        tr.load_checkpoint(sds[k], model_id=k)
        featurize_all(tr, x, y, batch=50)
        tr.finalize()
        singles.append(tr.score((xe, ye)))
    # Interrupted run: the first checkpoint half done, then a fresh TRAKer on the same save_dir.
    tr = TRAKer(models[0], x.shape[0], proj_dim=32, seed=1, lambda_=1e-3, save_dir=str(tmp_path))
    tr.load_checkpoint(sds[0], model_id=0)
    tr.featurize((x[:60], y[:60]), torch.arange(60))
    del tr
    tr = TRAKer(models[0], x.shape[0], proj_dim=32, seed=1, lambda_=1e-3, save_dir=str(tmp_path))
    rows = []
    real = tr._features
    tr._features = lambda b: (rows.append(b[0].shape[0]), real(b))[1]
    for k in sds:
        tr.load_checkpoint(sds[k], model_id=k)
        featurize_all(tr, x, y, batch=50)
    assert sum(rows) == 2 * x.shape[0] - 60, rows
    tr._features = real
    tr.finalize()
    ens = tr.score((xe, ye), checkpoints=sds, out_path=str(tmp_path / "scores.npy"))
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "scores.npy", mmap_mode="r").copy()), ens)
    torch.testing.assert_close(ens, (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)


def test_bad_inputs_name_the_argument():
    g = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="grads"):
        project(g.double(), 4)
    with pytest.raises(ValueError, match="grads"):
        project(torch.zeros(2, 3, 4), 4)
    with pytest.raises(ValueError, match="p:"):
        project(g, 0)
    with pytest.raises(ValueError, match="out"):
        _core.importance_project(g, 0, 4, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="out"):
        _core.importance_project(g, 0, 4, torch.zeros(2, 4, dtype=torch.float64))
    x, y, models = logistic_setup(1)
    with pytest.raises(ValueError, match="params"):
        TRAKer(models[0], 10, params=["nope"])
    tr = TRAKer(models[0], 10, proj_dim=8)
    with pytest.raises(ValueError, match="indices"):
        tr.featurize((x[:2], y[:2]), [3, 10])
    tr.featurize((x[:2], y[:2]), [0, 1])
    with pytest.raises(ValueError, match="not featurized"):
        tr.finalize()


@pytest.mark.parametrize("per_module", [False, True])
def test_features_match_per_example_autograd(per_module):
    # Reference: one backward pass per example, no vmap.
    from ferrox.importance import margin_output, module_seed
    x, y, models = logistic_setup(3, n=12)
    model = models[0]
    names = ["0.weight", "2.weight", "2.bias"]
    tr = TRAKer(model, x.shape[0], params=names, proj_dim=24, seed=9, per_module=per_module)
    tr.featurize((x, y), torch.arange(x.shape[0]))
    plist = dict(model.named_parameters())
    want = []
    for i in range(x.shape[0]):
        out = margin_output(model, x[i], y[i])
        gs = torch.autograd.grad(out, [plist[n] for n in names])
        if per_module:
            want.append(torch.cat([project(g.reshape(-1), 24, module_seed(9, k)) for k, g in enumerate(gs)]))
        else:
            want.append(project(torch.cat([g.reshape(-1) for g in gs]), 24, 9))
    torch.testing.assert_close(torch.from_numpy(tr._feat[0]), torch.stack(want), rtol=1e-4, atol=1e-5)
    assert tr._feat[0].shape[1] == (72 if per_module else 24)


def test_numpy_integer_seeds_equal_python_ints_and_bools_are_refused():
    g = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(project(g, 16, np.uint32(7)), project(g, 16, 7))
    with pytest.raises(ValueError, match="seed"):
        project(g, 16, True)
