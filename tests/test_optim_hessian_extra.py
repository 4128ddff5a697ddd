"""ferrox.optim under bf16 autocast and under torch.distributed.

Autocast: SophiaH, SophiaG and AdaHessian take their documented closure
(``loss.backward(create_graph=True)``) with each ``step`` wrapped in
``torch.autocast("cpu", dtype=torch.bfloat16)``; MeZO's closure (run under
``torch.no_grad()``) enters autocast itself — see the MeZO test for why.

Distributed (gloo, 2 CPU processes): DistributedDataParallel does not support
``create_graph=True`` (torch 2.x raises "a leaf Variable that requires grad is
being used in an in-place operation" in its reducer), so the test uses the
fallback: a plain module per rank whose closure all-reduces the gradient
values to the global mean while keeping each rank's own graph; the optimizer
then averages the Hessian-vector products itself (one all-reduce per
refresh, ``_hessian.mean_across_ranks``).
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ferrox.optim import AdaHessian, MeZO, SophiaG, SophiaH
from ferrox.optim import _hessian


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n=64):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _f32_loss(model, x, y):
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


# ------------------------------------------------------------------ autocast

AUTOCAST_MAKERS = {
    "SophiaH": (lambda ps: SophiaH(ps, lr=0.02, weight_decay=0.0, update_period=2), False),
    "SophiaG": (lambda ps: SophiaG(ps, lr=0.02, weight_decay=0.0, update_period=2), True),
    "AdaHessian": (lambda ps: AdaHessian(ps, lr=0.1), False),
}


@pytest.mark.parametrize("name", list(AUTOCAST_MAKERS))
def test_hessian_optimizers_train_under_bf16_autocast(name):
    make, gnb = AUTOCAST_MAKERS[name]
    model = _mlp()
    opt = make(model.parameters())
    x, y = _data()
    start = _f32_loss(model, x, y)
    logit_dtypes = []

    def closure():
        opt.zero_grad()
        logits = model(x)
        logit_dtypes.append(logits.dtype)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward(create_graph=True)
        return (loss, logits) if gnb else loss

    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = opt.step(closure)
        assert torch.isfinite(loss)
    assert set(logit_dtypes) == {torch.bfloat16}  # the forward really ran in bf16
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    for st in opt.state.values():
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in st.values())
    assert opt.stats["steps"] == 20 and opt.stats["skipped_steps"] == 0
    assert opt.stats["hessian_updates"] == (20 if name == "AdaHessian" else 10)
    # Measured: 1.119 -> 0.758 (Sophia) and 0.816 (AdaHessian) in f32 after
    # 20 steps; a 15% drop leaves slack for bf16 rounding differences.
    final = _f32_loss(model, x, y)
    assert final < 0.85 * start, (name, start, final)


def test_mezo_trains_under_bf16_autocast():
    # The closure enters autocast itself: autocast caches the bf16 cast of a
    # leaf parameter for the whole enclosing autocast region, so with
    # `with autocast(): opt.step(closure)` both SPSA losses see the same
    # cached (unperturbed) weights and every projected gradient is 0.
    model = _mlp()
    opt = MeZO(model.parameters(), lr=0.05, eps=0.05, n_probes=4, seed=0)
    x, y = _data()
    start = _f32_loss(model, x, y)
    dtypes = []

    def closure():
        assert not torch.is_grad_enabled()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            dtypes.append(logits.dtype)
            return nn.functional.cross_entropy(logits, y)

    nonzero = 0
    for _ in range(20):
        opt.step(closure)
        nonzero += sum(g != 0.0 for g in opt.last_projected_grads)
    assert set(dtypes) == {torch.bfloat16}
    assert nonzero >= 70  # of 80 probes; a bf16-blind perturbation would give 0s
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    # Measured 1.1195 -> 1.031 after 20 steps; zeroth-order is slow, require 4%.
    final = _f32_loss(model, x, y)
    assert final < 0.96 * start, (start, final)


def test_mezo_step_inside_an_autocast_region_sees_its_perturbations():
    # autocast caches the bf16 cast of each leaf weight for its whole region;
    # MeZO.step clears that cache after every in-place pass, so a step taken
    # inside `with autocast():` still evaluates the perturbed weights.
    model = _mlp()
    opt = MeZO(model.parameters(), lr=0.05, eps=0.05, n_probes=4, seed=0)
    x, y = _data()

    def closure():
        return nn.functional.cross_entropy(model(x), y)

    nonzero = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(5):
            opt.step(closure)
            nonzero += sum(g != 0.0 for g in opt.last_projected_grads)
    assert nonzero >= 16  # of 20 probes (without the cache clear: all 0)


# ------------------------------------------------------------ distributed

WORLD = 2
STEPS = 5
LOCAL_BATCH = 16
DIST_MAKERS = {
    "SophiaH": lambda ps: SophiaH(ps, lr=0.02, update_period=2, seed=11),
    "AdaHessian": lambda ps: AdaHessian(ps, lr=0.1, weight_decay=0.01, seed=11),
    # Gauss-Newton-Bartlett: ĝ averaged, B the global row count. Each rank samples
    # labels for its own rows from the same stream, so no single-process twin.
    "SophiaG": lambda ps: SophiaG(ps, lr=0.02, update_period=2, seed=11),
}
HUTCHINSON = ["SophiaH", "AdaHessian"]


def _dist_data():
    gen = torch.Generator().manual_seed(2)
    n = STEPS * WORLD * LOCAL_BATCH
    # Rank-dependent shards with different statistics, so local Hessians differ.
    x = torch.randn(n, 8, generator=gen) + torch.arange(n).remainder(2 * LOCAL_BATCH).ge(LOCAL_BATCH)[:, None]
    return x, torch.randint(0, 3, (n,), generator=gen)


def _run(name, rank, world):
    """STEPS steps on rank's shards (world=1: the whole global batch);
    returns params and the probes z of every refresh."""
    model = _mlp()
    opt = DIST_MAKERS[name](model.parameters())
    x, y = _dist_data()
    probes = []
    real = _hessian.hutchinson

    def recording(*a, **k):
        zs, hzs = real(*a, **k)
        probes.append([z.clone() for z in zs])
        return zs, hzs

    def closure():
        opt.zero_grad()
        logits = model(x[lo:lo + n])
        loss = nn.functional.cross_entropy(logits, y[lo:lo + n])
        loss.backward(create_graph=True)
        if world > 1:
            for p in model.parameters():
                mean = p.grad.detach().clone()
                dist.all_reduce(mean)
                mean /= world
                # value: exactly the global mean (g − g is 0); graph: this rank's gradient
                p.grad = mean + (p.grad - p.grad.detach())
        return (loss, logits) if name == "SophiaG" else loss

    _hessian.hutchinson = recording
    try:
        n = LOCAL_BATCH * (WORLD // world)
        for s in range(STEPS):
            lo = s * WORLD * LOCAL_BATCH + rank * n
            opt.step(closure)
    finally:
        _hessian.hutchinson = real
    return {"params": [p.detach().clone() for p in model.parameters()], "probes": probes,
            "hessian": [opt.state[p]["hessian_moment" if "Sophia" in name else "exp_hessian_diag_sq"].clone()
                        for p in model.parameters()]}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {name: _run(name, rank, WORLD) for name in DIST_MAKERS}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hessian_ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", HUTCHINSON)
def test_probes_are_identical_on_every_rank(ranks, name):
    a, b = (r[name]["probes"] for r in ranks)
    refreshes = 3 if name == "SophiaH" else STEPS  # SophiaH refreshes on steps 0, 2, 4
    assert len(a) == len(b) == refreshes
    for za, zb in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(za, zb))
    # and a fresh draw per refresh
    assert not all(torch.equal(u, v) for u, v in zip(a[0], a[1]))


@pytest.mark.parametrize("name", list(DIST_MAKERS))
def test_ranks_end_with_identical_params(ranks, name):
    a, b = (r[name]["params"] for r in ranks)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    ha, hb = (r[name]["hessian"] for r in ranks)
    assert all(torch.equal(p, q) for p, q in zip(ha, hb))
    start = [p.detach() for p in _mlp().parameters()]
    assert not all(torch.equal(p, q) for p, q in zip(a, start))  # it did train


@pytest.mark.parametrize("name", HUTCHINSON)
def test_ranks_match_a_single_process_on_the_global_batch(ranks, name):
    # Mean loss over equal shards: the global gradient and Hessian are the
    # means of the local ones, so only f32 summation order differs.
    single = _run(name, 0, 1)
    for got, want in zip(ranks[0][name]["params"], single["params"]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    for za, zb in zip(ranks[0][name]["probes"], single["probes"]):
        assert all(torch.equal(u, v) for u, v in zip(za, zb))
