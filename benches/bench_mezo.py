"""MeZO memory: ferrox.optim.MeZO fine-tuning vs backprop fine-tuning (torch
SGD) and plain inference of the same model, each side's peak RSS above its
post-setup baseline measured in its own child process (benches/run.py).

Model: an MLP of 4 square float32 layers (2048 wide, 16 MiB each; ``--quick``:
1024, 4 MiB), batch 64, 5 steps per run. The issue's bound: MeZO's peak ≤
the inference peak + the largest parameter tensor (z is regenerated from
Philox, never stored; backprop needs gradients of parameter size and the
activations). ``check`` makes every side finish with a finite loss, and
MeZO and SGD start from the same loss.

Results: benches/results/mezo.md.
"""

import torch

from ferrox.optim import MeZO

NAME = "mezo"
MAIN_COMPARATOR = "backprop_sgd"
CASES = ["mlp"]
STEPS = 5


def setup(case, quick):
    width = 1024 if quick else 2048
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    x = torch.randn(64, width)
    y = torch.randint(0, 10, (64,))
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    # Constructing a torch.optim.Optimizer imports torch._dynamo (~150 MB of
    # RSS) once per process: done here, before the baseline, for every side.
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return {"model": model, "x": x, "y": y, "largest_mb": largest / 2**20,
            "init": [p.detach().clone() for p in model.parameters()]}


def _reset(inp):
    with torch.no_grad():
        for p, q in zip(inp["model"].parameters(), inp["init"]):
            p.copy_(q)


def _loss(inp):
    return torch.nn.functional.cross_entropy(inp["model"](inp["x"]), inp["y"])


def _mezo(inp):
    _reset(inp)
    opt = MeZO(inp["model"].parameters(), lr=1e-4, eps=1e-3, record=False)
    with torch.no_grad():
        first = float(_loss(inp))
    for _ in range(STEPS):
        opt.step(lambda: _loss(inp))
    with torch.no_grad():
        return first, float(_loss(inp))


def _backprop(inp):
    _reset(inp)
    opt = torch.optim.SGD(inp["model"].parameters(), lr=1e-3)
    first = None
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=False)
        loss = _loss(inp)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    with torch.no_grad():
        return first, float(_loss(inp))


def _inference(inp):
    _reset(inp)
    with torch.no_grad():
        vals = [float(_loss(inp)) for _ in range(2 * STEPS)]
    return vals[0], vals[-1]


SIDES = {"ferrox_mezo": _mezo, "backprop_sgd": _backprop, "inference": _inference}


def check(results, case, inputs):
    for side, (first, last) in results.items():
        assert torch.isfinite(torch.tensor([first, last])).all(), side
    assert abs(results["ferrox_mezo"][0] - results["backprop_sgd"][0]) < 1e-6, results
    print(f"largest parameter tensor: {inputs['largest_mb']:.1f} MiB; losses {results}")
