"""The rule by which a ferrox merge agrees with mergekit 0.1.5's, per tensor.

One place for it, so the parity tests and the benchmarks (benches/bench_merge.py
checks its sides with it before timing them) hold the two tools to the same
tolerance. Each function raises AssertionError naming the tensor when the
outputs disagree.

Dense methods (linear, task_arithmetic): per element, |ferrox - mergekit| <= 4
ulp of the largest magnitude among base, inputs and outputs at that element.
ferrox rounds once from f32; mergekit rounds every step (deltas, weights,
products, sum) in the input dtype, which is where the differences come from.

Sparsified methods (ties, breadcrumbs, breadcrumbs_ties): masks equal
mergekit's except where |delta| equals the cut (mergekit's argsort orders ties
arbitrarily; ferrox takes lower indices first), with the same rounding of k.
Where every mask agrees and the sign election is not decided by rounding
(|sum w*delta| above the input dtype's resolution), values agree within 4 ulp
as above; the caller checks that most elements were compared (`COVERAGE`).
"""

import torch

ULP_LIMIT = 4.0
# bf16 deltas tie at a cut for several % of elements per model, and those are
# excluded from the value comparison; most elements must still be compared.
COVERAGE = 0.75
DENSE = ("linear", "task_arithmetic")


def ulp(x, dtype):
    bits = 7 if dtype == torch.bfloat16 else 23
    x = x.abs().clamp(min=2.0**-126)
    return torch.pow(2.0, torch.floor(torch.log2(x)) - bits)


def _ulp_error(x_out, y_out, base, models):
    x, y = x_out.float(), y_out.float()
    scale = torch.stack([x.abs(), y.abs()] + ([base.float().abs()] if base is not None else [])
                        + [m.float().abs() for m in models]).amax(0)
    return (x - y).abs() / ulp(scale, x_out.dtype)


def check_dense(name, fx, mk, base, models):
    """Dense rule for one tensor; `base` may be None (linear)."""
    err = _ulp_error(fx, mk, base, models)
    assert float(err.max()) <= ULP_LIMIT, f"{name}: {float(err.max())} ulp"


def check_sparsified(name, method, params, fx, mk, base, models, compare_all_dropped=False):
    """Sparsified rule for one tensor. `params`: one dict per model with
    weight, density and (Breadcrumbs) gamma. Returns how many elements were
    compared by value. `compare_all_dropped`: also compare the elements that
    every model's mask drops (there both tools write the base), which the
    parity tests' rule leaves out with the undecided sign elections."""
    from mergekit.sparsify import magnitude, magnitude_outliers

    from ferrox.merge.methods import METHODS
    from ferrox.select import band_mask

    deltas = [m - base for m in models]  # in the input dtype, as both tools do
    agree = torch.ones(base.shape, dtype=torch.bool)
    wsum = torch.zeros(base.shape)
    wabs = torch.zeros(base.shape)
    for d, p in zip(deltas, params):
        n = d.numel()
        if METHODS[method].sparsify == "magnitude":
            mk_kept = magnitude(d, p["density"]) != 0
            lo, hi = 0, max(1, int(p["density"] * n))
        else:
            mk_kept = magnitude_outliers(d, p["density"], gamma=p["gamma"]) != 0
            target, top = int(p["density"] * n), int(p["gamma"] * n)
            bottom = max(0, n - target - top)
            lo, hi = n - bottom - target, n - bottom
        fx_kept = band_mask(d, lo, hi, granularity="tensor") & (d != 0)
        assert int(fx_kept.sum()) <= hi - lo, f"{name}: ferrox keeps more than {hi - lo} elements"
        differ = fx_kept != mk_kept
        mag = d.abs().float()
        cuts = {float(mag.flatten().kthvalue(n - r + 1).values) for r in (lo, hi) if 0 < r <= n}
        on_cut = torch.zeros_like(differ)
        for c in cuts:
            on_cut |= mag == c
        assert not (differ & ~on_cut).any(), f"{name}: masks differ off the cut"
        agree &= ~differ
        contrib = p["weight"] * d.float() * fx_kept
        wsum += contrib
        wabs += contrib.abs()
    eps = 2.0 ** (-7 if base.dtype == torch.bfloat16 else -23)
    decided = wsum.abs() > 4 * eps * wabs
    keep = agree & (decided | ~torch.tensor(METHODS[method].consensus))
    if compare_all_dropped:
        keep |= agree & (wabs == 0)
    err = _ulp_error(fx, mk, base, models)[keep]
    assert err.numel() == 0 or float(err.max()) <= ULP_LIMIT, f"{name}: {float(err.max())} ulp"
    return int(keep.sum())
