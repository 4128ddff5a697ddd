"""k-th largest |x| of 64M f32 (abs() timed on both sides)."""

import torch

import ferrox

NAME = "kth"
CASES = ["k=1%", "k=10%", "k=50%"]
MAIN_COMPARATOR = "torch.kthvalue"
SLOW_SIDES = {"torch.argsort"}


def setup(case, quick):
    n = (4 if quick else 64) << 20
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    k = max(1, int(n * float(case[2:-1]) / 100))
    return {"x": x, "k": k}


def _kthvalue(d):
    x = d["x"]
    return torch.kthvalue(x.abs(), x.numel() - d["k"] + 1).values.item()


def _topk(d):
    return torch.topk(d["x"].abs(), d["k"], sorted=False).values.min().item()


def _argsort(d):
    a = d["x"].abs()
    return a[torch.argsort(a, descending=True)[d["k"] - 1]].item()


SIDES = {
    "ferrox": lambda d: ferrox.select.kth_largest_abs(d["x"], d["k"]),
    "torch.kthvalue": _kthvalue,
    "torch.topk": _topk,
    "torch.argsort": _argsort,
}


def check(results):
    for side, value in results.items():
        assert value == results["ferrox"], f"{side} gives {value}, ferrox {results['ferrox']}"
