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

import math

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


def model_stock_t(base, models, filter_wise):
    """Model Stock's t per row in float64 from the f32 task vectors (as both
    tools round them), its conditioning |dt/dc| and the row length n."""
    shape = base.shape
    rows = (lambda x: x.reshape(-1, shape[-1])) if filter_wise and base.dim() > 1 else (lambda x: x.reshape(1, -1))
    taus = [rows(m.float() - base.float()).double() for m in models]
    k = len(models)
    cos = []
    for i, x in enumerate(taus):
        for y in taus[i + 1:]:
            norms = x.norm(dim=-1) * y.norm(dim=-1)
            cos.append(((x * y).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    den = 1 + (k - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, 0.0, k * c / torch.where(singular, 1.0, den))
    slope = torch.where(singular, 0.0, k / torch.where(singular, 1.0, den) ** 2)
    return t, slope, taus[0].shape[-1]


def check_model_stock(name, fx, mk, base, models, filter_wise):
    """Model Stock rule for one float32 tensor. Both tools compute
    out = fl(fl(t·avg) + fl(fl(1 − t)·base)) with avg the same f32 sum / k, so
    they differ only through t. ferrox's t comes from float64 sums of exact
    products (within 2^-24·|t| of the float64 t); mergekit's from float32
    norms and dots. Their error is replayed: the same torch ops on the same
    f32 task vectors give mergekit's mean cosine c32, and its distance r
    from the float64 one, plus (log2 n + 5)·2^-24 for a different summation
    order, bounds mergekit's cosine error (torch's CPU f32 norm sums
    sequentially, so r grows with n), and its t is within
    |dt/dc|·(r + (log2 n + 5)·2^-24) + 2·2^-24·|t|. Per element:
    |fx − mk| <= Δt·(|avg| + |base|) + 2·2^-24·(|t|·Σ|x_i| + |base|)
    (the second term: both sides' roundings of the products and the sum with
    coefficients that differ by Δt)."""
    t, slope, n = model_stock_t(base, models, filter_wise)
    u = 2.0 ** -24
    rows = (lambda x: x.reshape(-1, base.shape[-1])) if filter_wise and base.dim() > 1 else (lambda x: x.reshape(1, -1))
    # mergekit's own f32 cosines, replayed with its torch ops: torch's CPU
    # f32 norm sums sequentially, so its error grows with n past the
    # pairwise model (measured: 1e-5 relative at 2^20 elements).
    taus32 = [rows(m.float() - base.float()) for m in models]
    cos32 = [((x * y).sum(-1) / (torch.norm(x, dim=-1) * torch.norm(y, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
             for i, x in enumerate(taus32) for y in taus32[i + 1:]]
    taus64 = [x.double() for x in taus32]
    cos64 = [((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
             for i, x in enumerate(taus64) for y in taus64[i + 1:]]
    replay = (torch.stack(cos32).double().mean(0) - torch.stack(cos64).mean(0)).abs()
    dt = slope * (replay + (math.log2(max(n, 2)) + 5) * u) + 2 * u * t.abs()
    avg = rows(sum(m.double() for m in models) / len(models))
    abs_sum = rows(sum(m.double().abs() for m in models))
    b = rows(base.double())
    bound = dt[:, None] * (avg.abs() + b.abs()) + 2 * u * (t.abs()[:, None] * abs_sum + b.abs() + avg.abs())
    err = (rows(fx.double()) - rows(mk.double())).abs()
    assert bool((err <= bound).all()), f"{name}: |diff| {float(err.max()):.3g} over the bound (max ratio " \
                                       f"{float((err / bound.clamp(min=1e-300)).max()):.3g})"


def _mergekit_slerp_cosine(a, b, chunk=1 << 20):
    """mergekit 0.1.5's slerp cosine of two whole tensors, by its torch ops in
    f32: norms of 2^20-element chunks, the norm of those, then the chunked
    dot of the normalized vectors."""
    x, y = a.reshape(1, -1).float(), b.reshape(1, -1).float()
    if not x.numel():
        return 0.0
    spans = [(s, min(x.shape[1], s + chunk)) for s in range(0, x.shape[1], chunk)]

    def norm(v):
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v[:, s:e], dim=1, keepdim=True)
                                                      for s, e in spans]), dim=0)
        return torch.where(total > 1e-8, total, 1)

    nx, ny = norm(x), norm(y)
    dot = torch.stack([((x[:, s:e] / nx) * (y[:, s:e] / ny)).sum(dim=1, keepdim=True) for s, e in spans]).sum(0)
    return float(dot.clamp(-1, 1))


def _slerp_coefficients(t, dot):
    if abs(dot) > 0.9995:
        return 1 - t, t
    th = math.acos(dot)
    return math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)


def check_slerp(name, fx, mk, a, b, t):
    """Slerp rule for one tensor (a: the base, b: the other model). Both tools
    compute out = fl(fl(c_a·a) + fl(c_b·b)) in f32 and round once to the
    output dtype, so they differ only through the coefficients, which depend
    on the cosine alone. ferrox's cosine is from float64 sums (exact to far
    below f32); mergekit's from float32 norms and dots of 2^20-element
    chunks. That error is replayed: the same torch ops give mergekit's cosine
    c32, and the interval is the float64 cosine ± (|c32 − c64| +
    (log2 n + 4)·2^-24) (torch's CPU f32 norm sums sequentially: measured
    5e-5 relative at 2.9M elements). So |Δc| <= max |dc/dcos| over that interval times it
    (taken by evaluating the coefficients at its ends; both sides' lerp test
    may flip only if the interval straddles the threshold, and then the
    bound is both branches' spread), plus 2^-23·|c| for each side's rounding.
    Per element: |fx − mk| <= |Δc_a|·|a| + |Δc_b|·|b| + 2·2^-24·(|c_a·a| + |c_b·b|)
    + one unit in the last place of the output dtype."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    n = max(a64.numel(), 2)
    na, nb = float(a64.norm()), float(b64.norm())
    dot = float((a64 @ b64) / ((na if na > 1e-8 else 1) * (nb if nb > 1e-8 else 1))) if a64.numel() else 0.0
    dot = min(1.0, max(-1.0, dot))
    u = 2.0 ** -24
    width = (math.log2(n) + 4) * u + abs(_mergekit_slerp_cosine(a, b) - dot)
    ends = [_slerp_coefficients(t, min(1.0, max(-1.0, dot + s * width))) for s in (-1, 0, 1)]
    ca, cb = ends[1]
    dca = max(abs(e[0] - ca) for e in ends) + 2 * u * abs(ca)
    dcb = max(abs(e[1] - cb) for e in ends) + 2 * u * abs(cb)
    out = fx.double().reshape(-1)
    bound = (dca * a64.abs() + dcb * b64.abs() + 2 * u * ((ca * a64).abs() + (cb * b64).abs())
             + ulp(out.float(), fx.dtype).double())
    err = (out - mk.double().reshape(-1)).abs()
    assert bool((err <= bound).all()), f"{name}: |diff| {float(err.max()):.3g} over the bound"
