"""MKOR under torch.distributed DDP (gloo, 2 CPU processes): only the O(d)
statistics are all-reduced, the factors equal a single-process run on the
global batch, and all ranks end with identical parameters."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ferrox.optim import MKOR

WORLD = 2
STEPS = 5
LOCAL_BATCH = 8


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * WORLD * LOCAL_BATCH, 6, generator=g) + 1.0
    y = torch.randn(STEPS * WORLD * LOCAL_BATCH, 3, generator=g)
    return model, x, y


def make_opt(model, inner_model):
    return MKOR(model.parameters(), model=inner_model, lr=0.05, factor_dtype=torch.float32)


def snapshot(model, opt):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "factors": [opt.factors(i)[k].clone() for i in range(len(opt._layers)) for k in ("a_inv", "g_inv")],
    }


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, x, y = model_and_data()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make_opt(ddp, ddp)
        calls = []
        real = dist.all_reduce

        def counting(t, *a, **k):
            calls.append(t.numel())
            return real(t, *a, **k)

        dist.all_reduce = counting
        for s in range(STEPS):
            lo = (s * WORLD + rank) * LOCAL_BATCH
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x[lo:lo + LOCAL_BATCH]), y[lo:lo + LOCAL_BATCH]).backward()
            opt.step()
        dist.all_reduce = real
        torch.save({**snapshot(model, opt), "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ranks_end_identical(ranks):
    a, b = ranks
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
    assert all(torch.equal(p, q) for p, q in zip(a["factors"], b["factors"]))


def test_only_the_statistics_vectors_are_all_reduced(ranks):
    # Per step one all-reduce of the O(d) sums: (6+1) + 5 + (5+1) + 3 values
    # plus 4 row counts, never a d² factor.
    assert ranks[0]["calls"] == [7 + 5 + 6 + 3 + 4] * STEPS


def test_factors_equal_a_single_process_run_on_the_global_batch(ranks):
    model, x, y = model_and_data()
    opt = make_opt(model, model)
    n = WORLD * LOCAL_BATCH
    for s in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[s * n:(s + 1) * n]), y[s * n:(s + 1) * n]).backward()
        opt.step()
    single = snapshot(model, opt)
    # Same sums in another order (per rank, then across ranks): f32 rounding.
    for got, want in zip(ranks[0]["factors"], single["factors"]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(ranks[0]["params"], single["params"]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
