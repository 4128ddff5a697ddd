"""ferrox.optim.MKOR: the Sherman–Morrison inverses against explicit
inverses, the fused Rust/CUDA update against torch, the fp16 stabiliser,
resume, non-finite gradients, GradScaler, MKOR-H and convergence."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ferrox import _core
from ferrox.optim import MKOR
from ferrox.optim.mkor import rank1_update_reference

from conftest import HAS_CUDA


# --- the inverse recursion -----------------------------------------------------

def explicit_inverse(vs, mode, gamma, damping=0.0):
    """Inverse after the updates by explicit float64 inverses of the recursion
    (paper mode: the factor L ← inv((1−δ)·(γL)⁻¹ + δ·I) + (1−γ)·v·vᵀ, which
    is the EMA γL + (1−γ)·v·vᵀ at δ = 0)."""
    n = vs[0].numel()
    eye = torch.eye(n, dtype=torch.float64)
    inv = torch.linalg.inv
    if mode == "reference":
        w = eye.clone()
        for v in vs:
            w = inv(inv(gamma * w + (1 - gamma) * eye) + torch.outer(v, v))
        return w
    factor = eye.clone()
    for v in vs:
        decayed = gamma * factor if damping == 0 else inv((1 - damping) * inv(gamma * factor) + damping * eye)
        factor = decayed + (1 - gamma) * torch.outer(v, v)
    return inv(factor)


MODES = [("reference", 0.0), ("paper", 0.0), ("paper", 0.02), ("paper", 0.3)]


@pytest.mark.parametrize("mode,damping", MODES)
def test_sherman_morrison_matches_explicit_inverse_float64(mode, damping):
    g = torch.Generator().manual_seed(0)
    n, gamma = 8, 0.95
    vs = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(100)]
    inv = torch.eye(n, dtype=torch.float64)
    for v in vs:
        inv, flagged, _, reset = rank1_update_reference(inv, v, flagged=False, mode=mode, stat_decay=gamma,
                                                        stabilizer_threshold=1e300, damping=damping)
        assert not flagged and not reset
    want = explicit_inverse(vs, mode, gamma, damping)
    rel = float((inv - want).norm() / want.norm())
    assert rel < 1e-10, rel


def layer_problem(seed=0, n=64, d_in=5, d_out=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) + 2.0
    y = torch.randn(n, d_out, generator=g)
    return x, y


@pytest.mark.parametrize("mode,damping", MODES)
def test_optimizer_factors_are_the_recursion_of_the_batch_means(mode, damping):
    """Through hooks and step, float64 inverses: A⁻¹ and G⁻¹ equal the explicit
    recursion over the batch means computed here by autograd (1e-10)."""
    torch.manual_seed(1)
    layer = nn.Linear(5, 3).double()
    opt = MKOR(layer.parameters(), model=layer, lr=0.01, mode=mode, factor_dtype=torch.float64,
               stabilizer_threshold=1e300, stat_decay=0.9, damping=damping)
    x, y = layer_problem()
    x, y = x.double(), y.double()
    a_vs, g_vs = [], []
    for step in range(20):
        xb, yb = x[8 * (step % 8):8 * (step % 8) + 8], y[8 * (step % 8):8 * (step % 8) + 8]
        opt.zero_grad()
        out = layer(xb)
        out.retain_grad()
        loss = ((out - yb) ** 2).mean()
        loss.backward()
        a_vs.append(torch.cat([xb, torch.ones(8, 1, dtype=torch.float64)], 1).mean(0))
        g_vs.append(out.grad.mean(0) * 8)
        opt.step()
    st_ = opt.factors(0)
    for got, vs in ((st_["a_inv"], a_vs), (st_["g_inv"], g_vs)):
        want = explicit_inverse(vs, mode, 0.9, damping)
        assert float((got - want).norm() / want.norm()) < 1e-10


# --- the fused kernel --------------------------------------------------------------

def sym_factor(n, g, dtype):
    a = torch.randn(n, n, generator=g) * 0.05
    return (torch.eye(n) + (a + a.T) / 2).to(dtype)


def fused(invs, vecs, flags, **kw):
    flat = torch.cat(vecs).float()
    fl = flags.clone()
    maxabs = torch.empty_like(fl)
    _core.mkor_rank1_update(invs, flat, fl, maxabs, **kw)
    return fl, maxabs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,damping", [("reference", 0.0), ("paper", 0.0), ("paper", 0.3)])
def test_fused_update_matches_torch_reference(dtype, mode, damping):
    g = torch.Generator().manual_seed(3)
    sizes = [1, 4, 17, 70, 9]
    invs = [sym_factor(n, g, dtype) for n in sizes]
    start = [t.clone() for t in invs]
    vecs = [torch.randn(n, generator=g) for n in sizes]
    flags = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    kw = dict(mode=mode, stat_decay=0.9, stabilization_factor=0.2, threshold=1.05, damping=damping)
    fl, maxabs = fused(invs, vecs, flags, **kw)
    ulp = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    for k, (w0, v) in enumerate(zip(start, vecs)):
        want, wflag, wtop, reset = rank1_update_reference(
            w0.double(), v.double(), flagged=bool(flags[k]), mode=mode, stat_decay=0.9,
            stabilization_factor=0.2, stabilizer_threshold=1.05, damping=damping)
        assert not reset
        err = float((invs[k].double() - want).abs().max())
        # f32 compute (relative ~n·2^-24) plus one rounding to the storage type.
        assert err <= (ulp + 64 * sizes[k] * 2.0 ** -24) * float(want.abs().max()), (k, err)
        assert abs(float(maxabs[k]) - wtop) <= 2 * ulp * wtop
        assert bool(fl[k]) == (float(maxabs[k]) > 1.05)
        assert torch.equal(invs[k], invs[k].T), "the update keeps the factor exactly symmetric"


def test_fused_update_refuses_bad_inputs():
    inv = torch.eye(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="vecs"):
        fused([inv], [torch.ones(2)], torch.zeros(1), mode="reference", stat_decay=0.9,
              stabilization_factor=0.1, threshold=2.0)
    with pytest.raises(ValueError, match="factors\\[1\\]"):
        fused([inv, torch.eye(2)], [torch.ones(3), torch.ones(2)], torch.zeros(2), mode="reference",
              stat_decay=0.9, stabilization_factor=0.1, threshold=2.0)
    with pytest.raises(ValueError, match="mode"):
        fused([inv], [torch.ones(3)], torch.zeros(1), mode="exact", stat_decay=0.9,
              stabilization_factor=0.1, threshold=2.0)
    with pytest.raises(ValueError, match="stat_decay"):
        fused([inv], [torch.ones(3)], torch.zeros(1), mode="paper", stat_decay=1.0,
              stabilization_factor=0.1, threshold=2.0)
    for mode, damping in (("paper", 1.5), ("paper", -0.1), ("reference", 0.1)):
        with pytest.raises(ValueError, match="damping"):
            fused([inv], [torch.ones(3)], torch.zeros(1), mode=mode, stat_decay=0.9,
                  stabilization_factor=0.1, threshold=2.0, damping=damping)


@pytest.mark.parametrize("gamma,damping", [(0.9, 0.5), (0.95, 0.2), (0.8, 1.0)])
def test_paper_damping_bounds_the_inverse_where_no_vector_refreshes_it(gamma, damping):
    """Vectors in span(e0, e1) only: along e2..e5 the inverse follows
    μ ← (1−δ)·μ/γ + δ and settles at δγ/(δ+γ−1) (fused kernel, f32), where
    the undamped paper mode grows as γ^−t."""
    g = torch.Generator().manual_seed(4)
    n, steps = 6, 200
    invs = {d: [torch.eye(n, dtype=torch.float32)] for d in (0.0, damping)}
    for _ in range(steps):
        v = torch.zeros(n)
        v[:2] = torch.randn(2, generator=g)
        for d, inv in invs.items():
            fused(inv, [v], torch.zeros(1), mode="paper", stat_decay=gamma, stabilization_factor=0.0,
                  threshold=1e30, damping=d)
    fixed = damping * gamma / (damping + gamma - 1)
    rest = invs[damping][0][2:, 2:]
    assert torch.allclose(rest, fixed * torch.eye(n - 2), rtol=1e-5, atol=1e-6), (rest.diagonal(), fixed)
    assert float(invs[damping][0][:2, 2:].abs().max()) < 1e-6
    assert float(invs[0.0][0][2, 2]) > 0.5 * gamma ** -steps  # undamped: unbounded growth


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_fp16_stabiliser_never_yields_nonfinite_over_10k_updates(mode):
    g = torch.Generator().manual_seed(5)
    sizes = [3, 8, 16, 33]
    invs = [torch.eye(n, dtype=torch.float16) for n in sizes]
    flags = torch.zeros(len(sizes))
    maxabs = torch.empty(len(sizes))
    total = sum(sizes)
    # Heavy-tailed vector scales 1e-3 .. 1e3, a non-finite vector now and then.
    scales = torch.exp(torch.empty(10_000).uniform_(math.log(1e-3), math.log(1e3), generator=g))
    hits = resets = 0
    for t in range(10_000):
        v = torch.randn(total, generator=g) * scales[t]
        if t % 997 == 0:
            v[t % total] = math.inf
        _core.mkor_rank1_update(invs, v, flags, maxabs, mode=mode, stat_decay=0.95, stabilization_factor=0.1,
                                threshold=2.0)
        assert torch.equal(flags, ((maxabs > 2.0)).float())
        hits += int(flags.sum())
        resets += int((maxabs < 0).sum())
        if t % 500 == 0 or t == 9_999:
            assert all(bool(torch.isfinite(i).all()) for i in invs), t
    if mode == "paper":
        assert hits > 0  # Inv/γ grows where the vectors do not refresh it
    else:
        # inv(γ·W + (1−γ)·I) + vvᵀ ⪰ I for W ⪯ I: the inverse stays within I.
        assert hits == 0 and float(maxabs.max()) <= 1.0 + 2.0 ** -9
    assert all(bool(torch.isfinite(i).all()) for i in invs)


# --- the optimizer -----------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x.view(-1, 1, 8, 8)))
        return self.fc2(torch.tanh(self.fc1(h.flatten(1))))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target)


def run_steps(model, opt, x, y, steps, start=0, bs=64, loss_fn=nn.functional.cross_entropy):
    for s in range(start, start + steps):
        i = (s * bs) % (len(x) - bs)
        opt.zero_grad()
        loss = loss_fn(model(x[i:i + bs]), y[i:i + bs])
        loss.backward()
        opt.step()
    return loss


def test_mlp_on_digits_reaches_train_accuracy(digits):
    x, y = digits
    torch.manual_seed(0)
    model = Net()
    opt = MKOR(model.parameters(), model=model, lr=0.05)
    assert len(opt._layers) == 3  # conv and both linears
    for epoch in range(3):
        run_steps(model, opt, x, y, len(x) // 64, start=epoch * (len(x) // 64))
    acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.95, acc
    assert opt.stats["steps"] == 3 * (len(x) // 64)


@pytest.mark.parametrize("inner,mode,dtype", [("sgd", "reference", torch.float16), ("adamw", "paper", torch.float32),
                                              ("lamb", "reference", torch.bfloat16)])
def test_state_dict_resume_is_bit_identical(digits, inner, mode, dtype):
    x, y = digits
    torch.manual_seed(1)
    model = Net()
    kw = dict(lr=0.01, inner=inner, mode=mode, factor_dtype=dtype, hybrid=True, hybrid_window=2)
    opt = MKOR(model.parameters(), model=model, **kw)
    run_steps(model, opt, x, y, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run_steps(model, opt, x, y, 4, start=5)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = Net()
    model2.load_state_dict(saved["model"])
    opt2 = MKOR(model2.parameters(), model=model2, **kw)
    opt2.load_state_dict(saved["opt"])
    run_steps(model2, opt2, x, y, 4, start=5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt.stats == opt2.stats
    # Schedulers act on MKOR's groups, which the inner optimizer shares.
    opt2.param_groups[0]["lr"] *= 0.5  # what a scheduler does
    assert opt2.inner.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == 0.005


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradients_skip_the_step(bad):
    layer = nn.Linear(5, 3)
    opt = MKOR(layer.parameters(), model=layer, lr=0.1)
    x, y = layer_problem()
    run_steps(layer, opt, x, y, 2, bs=8, loss_fn=nn.functional.mse_loss)
    before = [p.clone() for p in layer.parameters()]
    state = {k: v.clone() for k, v in {**opt.state[layer.weight], **opt.factors(0)}.items()}
    opt.zero_grad()
    nn.functional.mse_loss(layer(x[:8]), y[:8]).backward()
    layer.weight.grad[0, 0] = bad
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    now = {**opt.state[layer.weight], **opt.factors(0)}
    assert all(torch.equal(v, now[k]) for k, v in state.items())
    assert opt.stats["skipped_steps"] == 1 and opt.stats["steps"] == 2
    opt.nonfinite = "raise"
    with pytest.raises(FloatingPointError):
        opt.step()


def test_grad_scaler_through_step_without_closure():
    """A power-of-two loss scale is exact, so MKOR with the scaler (stats
    unscaled by its scale) follows the unscaled run bit for bit; an inf
    gradient makes the scaler skip the step and leaves no statistics."""
    x, y = layer_problem(2)
    runs = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        layer = nn.Linear(5, 3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None
        opt = MKOR(layer.parameters(), model=layer, lr=0.05, grad_scaler=scaler)
        for s in range(6):
            opt.zero_grad()
            loss = nn.functional.mse_loss(layer(x[8 * s:8 * s + 8]), y[8 * s:8 * s + 8])
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        runs.append((layer, opt, scaler))
    (l0, o0, _), (l1, o1, scaler) = runs
    assert all(torch.equal(a, b) for a, b in zip(l0.parameters(), l1.parameters()))
    assert torch.equal(o0.factors(0)["g_inv"], o1.factors(0)["g_inv"])
    before = [p.clone() for p in l1.parameters()]
    o1.zero_grad()
    loss = nn.functional.mse_loss(l1(x[:8]), y[:8]) * math.inf
    scaler.scale(loss).backward()
    scaler.step(o1)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, l1.parameters()))
    o1.zero_grad()
    assert not any(layer.ready() for layer in o1._layers)


def test_gradient_rescaling_keeps_the_gradient_norm():
    layer = nn.Linear(5, 3)
    opt = MKOR(layer.parameters(), model=layer, lr=0.0, momentum=0.0)
    x, y = layer_problem(4)
    for s in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x[8 * s:8 * s + 8]), y[8 * s:8 * s + 8]).backward()
        raw = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).clone()
        opt.step()
        pre = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        assert abs(float(pre.norm() / raw.norm()) - 1) < 1e-6
        # The factors are no longer I, so the direction changed.
        assert float((pre - raw).norm()) > 1e-3 * float(raw.norm())


def test_hybrid_falls_back_when_the_loss_stops_falling():
    layer = nn.Linear(5, 3)
    opt = MKOR(layer.parameters(), model=layer, lr=0.01, momentum=0.0, hybrid=True, hybrid_window=3,
               hybrid_tol=0.05)
    x, y = layer_problem(5)
    # Window means 9, 6 (33% lower), 5.83 (3% lower, under hybrid_tol): fall back after the 9th step.
    losses = [10, 9, 8, 7, 6, 5, 5.9, 5.8, 5.8]
    for k, fake in enumerate(losses):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x[:8]), y[:8]).backward()
        opt.step(loss=fake)
        assert opt.first_order == (k == len(losses) - 1)
    assert opt.stats["mkor_fallbacks"] == 1
    # First order now: the step is plain SGD on the raw gradient.
    opt.zero_grad()
    nn.functional.mse_loss(layer(x[:8]), y[:8]).backward()
    twin = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    for t, p in zip(twin, layer.parameters()):
        t.grad = p.grad.clone()
    torch.optim.SGD(twin, lr=0.01).step()
    factors = opt.factors(0)["a_inv"].clone()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(twin, layer.parameters()))
    assert torch.equal(factors, opt.factors(0)["a_inv"])


@given(st.sampled_from(["lr", "stat_decay", "inv_freq", "stabilization_factor", "mode", "inner", "factor_dtype",
                        "hybrid_window", "momentum", "damping"]))
@settings(max_examples=11)
def test_invalid_hyperparameters_name_themselves(name):
    bad = {"lr": -1.0, "stat_decay": 1.0, "inv_freq": 0, "stabilization_factor": 2.0, "mode": "exact",
           "inner": "rmsprop", "factor_dtype": torch.int8, "hybrid_window": 0, "momentum": 1.5,
           "damping": 1.5}[name]
    layer = nn.Linear(2, 2)
    kw = {"lr": 0.1, name: bad}
    if name == "damping":
        kw["mode"] = "paper"
    with pytest.raises(ValueError, match=name):
        MKOR(layer.parameters(), model=layer, **kw)


def test_damping_is_refused_in_reference_mode():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="damping"):
        MKOR(layer.parameters(), model=layer, lr=0.1, damping=0.1)


class GroupedNet(nn.Module):
    """A grouped and a depthwise convolution between a plain conv and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        h = torch.tanh(self.conv(x.view(-1, 1, 8, 8)))
        h = torch.tanh(self.depthwise(torch.tanh(self.grouped(h))))
        return self.fc(h.flatten(1))


def test_grouped_convolutions_are_left_to_the_inner_optimizer(digits):
    """groups > 1: no hooks and no factors; the step hands the plain gradient
    to the inner SGD-momentum (a twin torch SGD fed the same gradients moves
    those weights bit for bit alike), while the groups=1 layers get the
    preconditioned one."""
    x, y = digits
    torch.manual_seed(0)
    model = GroupedNet()
    opt = MKOR(model.parameters(), model=model, lr=0.05, momentum=0.9)
    assert [layer.module for layer in opt._layers] == [model.conv, model.fc]
    assert all(not m._forward_hooks for m in (model.grouped, model.depthwise))
    grouped = [model.grouped.weight, model.grouped.bias, model.depthwise.weight, model.depthwise.bias]
    twin = [p.detach().clone().requires_grad_() for p in grouped]
    sgd = torch.optim.SGD(twin, lr=0.05, momentum=0.9, foreach=False)
    for s in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[64 * s:64 * s + 64]), y[64 * s:64 * s + 64]).backward()
        plain = [p.grad.clone() for p in grouped]
        fc_plain = model.fc.weight.grad.clone()
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(grouped, plain))
        assert not torch.allclose(model.fc.weight.grad, fc_plain)  # preconditioned
        for t, g in zip(twin, plain):
            t.grad = g
        sgd.step()
        assert all(torch.equal(p, t) for p, t in zip(grouped, twin)), s
    assert len([k for k in opt.global_state if k.endswith("a_inv")]) == 2


# --- convergence -------------------------------------------------------------------

def ill_conditioned_problem():
    """Non-zero-mean inputs: E[xxᵀ] = Σ + μμᵀ with Σ's eigenvalues 1..2 and
    |μ|² = 900, so the second moment's condition number is about 900 (the
    ill-conditioning MKOR's rank-1 batch means see). One output, no bias."""
    g = torch.Generator().manual_seed(0)
    d, n = 12, 4096
    mu = torch.randn(d, generator=g)
    mu = 30 * mu / mu.norm()
    x = torch.randn(n, d, generator=g) * torch.linspace(1, 2, d).sqrt() + mu
    w = torch.randn(1, d, generator=g)
    return x, x @ w.T


def steps_to_target(make_opt, x, y, target_frac=1e-3, cap=400, bs=64):
    """Steps until the full-data loss is at most target_frac of the initial
    one (checked every 5 steps); cap + 1 when never (or on divergence)."""
    torch.manual_seed(0)
    layer = nn.Linear(x.shape[1], y.shape[1], bias=False)
    opt = make_opt(layer)
    with torch.no_grad():
        l0 = float(nn.functional.mse_loss(layer(x), y))
    for s in range(cap):
        i = (s * bs) % (len(x) - bs)
        opt.zero_grad()
        nn.functional.mse_loss(layer(x[i:i + bs]), y[i:i + bs]).backward()
        opt.step()
        if s % 5 == 4:
            with torch.no_grad():
                full = float(nn.functional.mse_loss(layer(x), y))
            if not math.isfinite(full):
                return cap + 1
            if full <= target_frac * l0:
                return s + 1
    return cap + 1


def test_mkor_beats_tuned_sgd_momentum_on_ill_conditioned_least_squares(record_property):
    x, y = ill_conditioned_problem()
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    sgd = min(steps_to_target(lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), x, y) for lr in grid)
    mkor = min(steps_to_target(lambda m: MKOR(m.parameters(), model=m, lr=lr, momentum=0.9), x, y) for lr in grid)
    record_property("mkor_steps", mkor)
    record_property("sgd_momentum_steps", sgd)
    print(f"steps to 1e-3 of the initial loss: MKOR {mkor}, SGD-momentum {sgd} (ratio {sgd / mkor:.2f})")
    assert mkor < sgd


# --- GPU -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,damping", [("reference", 0.0), ("paper", 0.3)])
def test_cuda_fused_update_matches_cpu_bitwise(dtype, mode, damping):
    g = torch.Generator().manual_seed(9)
    sizes = [1, 5, 33, 300, 7]
    invs = [sym_factor(n, g, dtype) for n in sizes]
    vecs = [torch.randn(n, generator=g) for n in sizes]
    flags = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    kw = dict(mode=mode, stat_decay=0.95, stabilization_factor=0.1, threshold=1.02, damping=damping)
    cuda_invs = [t.cuda() for t in invs]
    fl, mx = fused(invs, vecs, flags, **kw)
    flat = torch.cat(vecs).cuda()
    offs = np.cumsum([0] + sizes[:-1]).tolist()
    table = torch.tensor([[t.data_ptr(), n, o] for t, n, o in zip(cuda_invs, sizes, offs)], dtype=torch.int64).cuda()
    cfl, cmx = flags.cuda(), torch.empty(len(sizes), device="cuda")
    from ferrox.cuda import stream_of
    _core.mkor_rank1_update(cuda_invs, flat, cfl, cmx, table=table, scratch=torch.empty_like(flat),
                            stream=stream_of(flat), **kw)
    torch.cuda.synchronize()
    for a, b in zip(invs, cuda_invs):
        assert torch.equal(a, b.cpu())
    assert torch.equal(fl, cfl.cpu()) and torch.equal(mx, cmx.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_optimizer_follows_cpu(digits):
    x, y = digits
    runs = []
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = Net().to(dev)
        opt = MKOR(model.parameters(), model=model, lr=0.05, factor_dtype=torch.float32)
        run_steps(model, opt, x.to(dev), y.to(dev), 5)
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def test_bf16_parameters_train_with_f32_statistics():
    x, y = layer_problem(6)
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).to(torch.bfloat16)
    opt = MKOR(layer.parameters(), model=layer, lr=0.05)
    with torch.no_grad():
        first = float(nn.functional.mse_loss(layer(x.bfloat16()).float(), y))
    run_steps(layer, opt, x.bfloat16(), y.bfloat16(), 30, bs=8,
              loss_fn=lambda out, t: nn.functional.mse_loss(out.float(), t.float()))
    with torch.no_grad():
        last = float(nn.functional.mse_loss(layer(x.bfloat16()).float(), y))
    assert layer.weight.dtype == torch.bfloat16 and opt.factors(0)["a_inv"].dtype == torch.float16
    assert last < 0.8 * first, (first, last)
