"""JLCM-style joint learning of codebooks and mappings on calibration data.

Given a 2-D weight W [out, in] already quantized as scalar codes Q (uint8,
0..K−1, K = 2^b) into per-group sorted codebooks C [G, K] (rows grouped
contiguously by ``group_offsets``; the rows of ``weight``, ``codes`` and
the scales are in the same, possibly permuted, order) and per-row scales s,

    Ŵ[r, c] = s[r] · C[g(r), Q[r, c]],

``learn_codebook`` minimises the layer-output error over calibration inputs
X [n, in] (captured with ``capture_inputs``)

    L = ‖X·Wᵀ − X·Ŵᵀ‖²_F / ‖X·Wᵀ‖²_F  =  tr(E H Eᵀ) / tr(W H Wᵀ),
    E = W − Ŵ,  H = XᵀX / n,

learning the codewords and the scales by gradient (Adam) and the
assignments by a straight-through estimator (STE) on a latent value v per
element (initialised to W / s: the unquantized weight), with one of two
assignment rules (JLCM's exact formulas are not public; these are ours):

- ``assign="ste"`` (the baseline): v ← v − η·δ̄·ĝ, then the element takes
  the codeword nearest to v, however far that is;
- ``assign="proximal"`` (the proximal STE): the element at codeword j may
  move only to j−1 or j+1. Its STE gradient is weighted by
  ψ(δ) = 2 / (1 + (δ/δ̄)²), a decreasing function of δ, the distance
  |C[j±1] − C[j]| to the neighbouring codeword in the direction of the step
  (ψ = 1 at the mean gap, → 0 for a far neighbour, 0 at the end of the
  codebook); after the same latent step the element takes the nearest of
  {C[j−1], C[j], C[j+1]} and v is clipped to [C[j'−1], C[j'+1]] of its new
  codeword j', so no element jumps more than one codeword in a step and no
  latent drifts further than one codeword from its assignment.

Here g = s·∂L/∂Ŵ is the STE gradient of an element's unscaled value (times
ψ for the proximal STE; the custom autograd function ``Decode`` hands it to
the latent), ĝ = g / rms(g) over the tensor, δ̄ the group's mean codeword
gap (C[K−1] − C[0]) / (K − 1), and η (``assign_lr``) a typical element's
latent step in units of that gap. After every step each group's codebook is
re-sorted (codes remapped, Ŵ unchanged), so it stays sorted ascending. The
state with the lowest training loss seen is returned.

Where the gain comes from: with uncorrelated inputs (H diagonal) the nearest
codeword is already the best assignment of each element and moves can only
hurt (the best state is then the k-means one plus the codeword and scale
updates); with correlated inputs, as real activations are, moving an
element can cancel the output error of the others in its row, which the
STE gradient (E·H) sees.
"""

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

ASSIGN = ("proximal", "ste")


@dataclass
class JointStats:
    """What ``learn_codebook`` did. Losses are relative layer-output errors
    ``L`` (see the module docstring); ``heldout_*`` on ``heldout_inputs``
    (None without them). ``moved``: the fraction of elements whose code
    changed at each step; ``mean_jump``: the mean |Δcode| over the elements
    that moved (all steps); ``max_jump``: the largest |Δcode| of one element
    in one step; ``jumps``: how many element moves had |Δcode| = 1, 2, ...
    (index 0 is |Δcode| = 1); ``mean_jump_gap``: the mean codeword distance
    |C[new] − C[old]| of a move, in units of the group's mean gap δ̄."""

    assign: str
    loss: List[float] = field(default_factory=list)
    initial_loss: float = 0.0
    final_loss: float = 0.0
    best_step: int = 0
    heldout_initial: Optional[float] = None
    heldout_final: Optional[float] = None
    moved: List[float] = field(default_factory=list)
    mean_jump: float = 0.0
    max_jump: int = 0
    jumps: List[int] = field(default_factory=list)
    mean_jump_gap: float = 0.0


def capture_inputs(model, modules: Union[Sequence[str], Mapping[str, object]], batches: Iterable,
                   *, max_rows: Optional[int] = None) -> Dict[str, "object"]:
    """The inputs each of ``modules`` receives while ``model`` runs on
    ``batches``, captured with forward hooks: name -> float32 [n, in] on the
    CPU (every leading dimension flattened into rows, the batches
    concatenated, at most ``max_rows`` rows each). ``modules``: names in
    ``model.named_modules()`` or a mapping name -> module. A batch is passed
    as ``model(**batch)`` (a mapping), ``model(*batch)`` (a tuple or list)
    or ``model(batch)``. Runs under ``torch.no_grad``; the hooks are removed
    afterwards, also on an error."""
    import torch

    if isinstance(modules, Mapping):
        targets = dict(modules)
    else:
        named = dict(model.named_modules())
        missing = [m for m in modules if m not in named]
        if missing:
            raise ValueError(f"modules: {missing[:5]} are not modules of the model")
        targets = {m: named[m] for m in modules}
    if not targets:
        raise ValueError("modules: expected at least one module")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows: expected a positive integer, got {max_rows!r}")
    captured: Dict[str, List[torch.Tensor]] = {m: [] for m in targets}
    counts = {m: 0 for m in targets}

    def hook_for(name):
        def hook(_module, args, _output):
            if not args or not torch.is_tensor(args[0]):
                raise TypeError(f"{name}: its first input is not a tensor")
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float().cpu()
            if max_rows is not None:
                x = x[: max(0, max_rows - counts[name])]
            counts[name] += x.shape[0]
            if x.shape[0]:
                captured[name].append(x)
        return hook

    handles = [mod.register_forward_hook(hook_for(name)) for name, mod in targets.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
    empty = [m for m, xs in captured.items() if not xs]
    if empty:
        raise ValueError(f"modules {empty[:5]} received no inputs (were they called by the model?)")
    return {m: torch.cat(xs) for m, xs in captured.items()}


def input_gram(x):
    """H = XᵀX / n (float64 accumulation, returned as float32) of inputs
    [..., in]: the layer-output error of a weight error E is tr(E H Eᵀ)."""
    import torch

    x = torch.as_tensor(x).detach()
    x = x.reshape(-1, x.shape[-1]).double()
    if x.shape[0] == 0:
        raise ValueError("calibration inputs: expected at least one row")
    return (x.T @ x / x.shape[0]).float()


def output_error(weight, w_hat, gram) -> float:
    """The relative layer-output error tr(E H Eᵀ) / tr(W H Wᵀ) for H = ``gram``."""
    import torch

    w = weight.double()
    e = w - w_hat.double()
    h = gram.double()
    num = float(((e @ h) * e).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _decode_fn():
    import torch

    class Decode(torch.autograd.Function):
        """Ŵ = s[:, None] · C.flat[idx] (idx = g(r)·K + Q[r, c]); ``latent``
        only receives the STE gradient.

        Backward: the codewords get the scatter-sum of s·∂L/∂Ŵ, the scales
        Σ_c u·∂L/∂Ŵ, and the latent values the STE gradient g = s·∂L/∂Ŵ,
        times ψ(δ) for the proximal STE (δ: the gap to the neighbouring
        codeword in the direction −sign(g) the step will move the element;
        ψ = 0 where there is no neighbour that way) or 1 for the plain STE."""

        @staticmethod
        def forward(ctx, codebook, scales, latent, idx, up_gap, down_gap, mean_gap, proximal):
            u = codebook.reshape(-1)[idx]
            ctx.save_for_backward(codebook, scales, idx, u, up_gap, down_gap, mean_gap)
            ctx.proximal = proximal
            return u * scales[:, None]

        @staticmethod
        def backward(ctx, grad):
            codebook, scales, idx, u, up_gap, down_gap, mean_gap = ctx.saved_tensors
            grad_u = grad * scales[:, None]
            grad_c = torch.zeros(codebook.numel(), dtype=grad.dtype, device=grad.device)
            grad_c.index_add_(0, idx.reshape(-1), grad_u.reshape(-1))
            grad_s = (grad * u).sum(dim=1)
            grad_v = grad_u
            if ctx.proximal:
                # the step −g moves up where g < 0: towards the next codeword
                towards = torch.where(grad_u < 0, up_gap, down_gap)
                psi = 2.0 / (1.0 + (towards / mean_gap) ** 2)
                grad_v = grad_u * torch.where(towards > 0, psi, torch.zeros(()))
            return grad_c.view_as(codebook), grad_s, grad_v, None, None, None, None, None

    return Decode


def _gram(x, cols: int, what: str):
    import torch

    if not torch.is_tensor(x):
        raise ValueError(f"{what}: expected a tensor of layer inputs [..., {cols}]")
    if x.dim() < 1 or x.shape[-1] != cols:
        raise ValueError(f"{what}: expected layer inputs [..., {cols}], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: non-finite values")
    return input_gram(x)


def _gram_of(inputs, gram, cols: int, what: str):
    """The (symmetrised, float32) Gram matrix from inputs or given directly."""
    import torch

    if (inputs is None) == (gram is None):
        raise ValueError(f"{what}: give exactly one of {what}_inputs and {what}_gram")
    if inputs is not None:
        return _gram(inputs, cols, f"{what}_inputs")
    if not torch.is_tensor(gram) or tuple(gram.shape) != (cols, cols) or not gram.is_floating_point():
        raise ValueError(f"{what}_gram: expected a float tensor [{cols}, {cols}], got "
                         f"{tuple(gram.shape) if torch.is_tensor(gram) else type(gram).__name__}")
    h = gram.detach().double().cpu()
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{what}_gram: non-finite values")
    return ((h + h.T) / 2).float()


def _nearest(codebook, v, row_group):
    """Index of the nearest codeword of each v (ties to the lower one):
    bucketize on the midpoints of each row's sorted codebook."""
    import torch

    mids = (codebook[:, 1:] + codebook[:, :-1]) / 2  # [G, K-1]
    out = torch.empty(v.shape, dtype=torch.long)
    for gi in range(codebook.shape[0]):
        rows = row_group == gi
        if bool(rows.any()):
            j = torch.bucketize(v[rows], mids[gi], right=False)
            # a repeated codeword: the first of equal ones (ties to the lower index)
            out[rows] = torch.searchsorted(codebook[gi].contiguous(), codebook[gi][j].contiguous())
    return out


def _proximal(codebook, v, codes, row_group):
    """The nearest of codewords j−1, j, j+1 to v for an element at j (ties
    keep j)."""
    import torch

    k = codebook.shape[1]
    flat = codebook.reshape(-1)
    j = row_group[:, None] * k + codes
    here = flat[j]
    up = torch.where(codes < k - 1, flat[(j + 1).clamp(max=flat.numel() - 1)], here)
    down = torch.where(codes > 0, flat[(j - 1).clamp(min=0)], here)
    # strictly nearer only: a tie (or a repeated codeword) keeps the element where it is
    go_up = (up > here) & (v > (here + up) / 2)
    go_down = (down < here) & (v < (here + down) / 2)
    return codes + go_up.long() - go_down.long()


def _check_inputs(weight, codebook, codes, group_offsets, scales):
    import torch

    if not torch.is_tensor(weight) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight: expected a 2-D float tensor, got "
                         f"{tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__}")
    rows, cols = weight.shape
    codebook = torch.as_tensor(codebook)
    if codebook.dim() == 3 and codebook.shape[-1] == 1:  # CodebookTensor's [G, K, 1]
        codebook = codebook[..., 0]
    if codebook.dim() == 1:
        codebook = codebook[None]
    if codebook.dim() != 2 or not codebook.is_floating_point():
        raise ValueError(f"codebook: expected float [G, K] (scalar codebooks), got {tuple(codebook.shape)} "
                         f"{codebook.dtype}")
    g, k = codebook.shape
    if k < 2:
        raise ValueError(f"codebook: expected at least 2 codewords, got {k}")
    codes = torch.as_tensor(codes)
    if tuple(codes.shape) != (rows, cols):
        raise ValueError(f"codes: expected shape {(rows, cols)} (one code per weight, unpacked), "
                         f"got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
    codes = codes.long()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"codes: expected values in [0, {k - 1}], got [{int(codes.min())}, {int(codes.max())}]")
    if group_offsets is None:
        if g != 1:
            raise ValueError(f"group_offsets: required with {g} codebooks")
        group_offsets = torch.tensor([0, rows])
    group_offsets = torch.as_tensor(group_offsets).long()
    if (group_offsets.dim() != 1 or group_offsets.numel() != g + 1 or int(group_offsets[0]) != 0
            or int(group_offsets[-1]) != rows or bool((group_offsets[1:] < group_offsets[:-1]).any())):
        raise ValueError(f"group_offsets: expected {g + 1} non-decreasing offsets from 0 to {rows}, "
                         f"got {group_offsets.tolist()[:8]}")
    if scales is None:
        scales = torch.ones(rows)
    scales = torch.as_tensor(scales).float().reshape(-1)
    if scales.numel() != rows:
        raise ValueError(f"scales: expected {rows} row scales, got {scales.numel()}")
    if not bool(torch.isfinite(codebook).all()) or not bool(torch.isfinite(scales).all()):
        raise ValueError("codebook/scales: non-finite values")
    if bool((scales == 0).any()):
        raise ValueError("scales: a zero row scale has no latent value (W / s)")
    return codebook.float(), codes, group_offsets, scales


def _sort_codebook(codebook, codes, row_group):
    """Re-sorts each group's codewords ascending and remaps the codes so the
    decoded weight is unchanged."""
    import torch

    order = torch.argsort(codebook, dim=1, stable=True)
    if bool((order == torch.arange(codebook.shape[1])).all()):
        return codebook, codes
    inverse = torch.argsort(order, dim=1)
    return torch.gather(codebook, 1, order), torch.gather(inverse[row_group], 1, codes)


def learn_codebook(weight, codebook, codes, calib_inputs=None, *, group_offsets=None, scales=None, steps: int = 100,
                   lr: float = 1e-3, assign: str = "proximal", assign_lr: float = 0.1, learn_scales: bool = True,
                   heldout_inputs=None, calib_gram=None, heldout_gram=None, progress: Optional[bool] = None):
    """Jointly learns the codewords, row scales and assignments of one
    quantized weight on calibration inputs (see the module docstring for the
    objective and the two assignment rules).

    ``weight`` [out, in] (any float dtype; computed in f32); ``codebook``
    [G, K] sorted per group (or [K], or [G, K, 1]); ``codes`` [out, in]
    integers in 0..K−1 (unpacked; rows in ``weight``'s order);
    ``group_offsets`` int [G+1] (None: one group); ``scales`` [out] (None:
    ones); ``calib_inputs``: the layer's inputs [..., in] (``heldout_inputs``
    likewise, only measured); or, instead of the inputs, their Gram matrices
    ``calib_gram`` / ``heldout_gram`` H = XᵀX / n [in, in] (what the loss
    needs; see ``input_gram``), so a caller can accumulate them batch by
    batch without keeping the inputs. ``lr``: Adam's step for the codewords
    in units of their group's weight RMS (and for the scales, absolute);
    ``assign_lr``: the latent step η in units of the mean codeword gap
    (0 freezes the assignments); ``learn_scales=False`` keeps the scales.
    ``progress``: a tqdm bar (None: only on a terminal).

    Returns ``(codebook [G, K] float32 sorted, codes uint8 [out, in],
    scales float32 [out], JointStats)`` for the step with the lowest
    training loss (the initial state when no step improved it)."""
    import torch

    from tqdm import tqdm

    if assign not in ASSIGN:
        raise ValueError(f"assign: expected one of {ASSIGN}, got {assign!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    for name, value in (("lr", lr), ("assign_lr", assign_lr)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value >= 0) \
                or value == float("inf"):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    codebook, codes, group_offsets, scales = _check_inputs(weight, codebook, codes, group_offsets, scales)
    w = weight.detach().float().cpu()
    rows, cols = w.shape
    gram = _gram_of(calib_inputs, calib_gram, cols, "calib")
    held = None if heldout_inputs is None and heldout_gram is None else _gram_of(heldout_inputs, heldout_gram, cols,
                                                                                   "heldout")
    g, k = codebook.shape
    row_group = torch.repeat_interleave(torch.arange(g), (group_offsets[1:] - group_offsets[:-1]))
    codebook, codes = _sort_codebook(codebook, codes, row_group)
    denom = float(((w.double() @ gram.double()) * w.double()).sum())
    if not denom > 0:
        raise ValueError("calib_inputs: the layer's output is zero on them (nothing to fit)")

    # Adam on the codewords in units of each group's weight RMS, so a group of
    # small rows takes steps as small as its codewords.
    sigma = torch.stack([w[int(group_offsets[i]):int(group_offsets[i + 1])].pow(2).mean().sqrt()
                         if int(group_offsets[i + 1]) > int(group_offsets[i]) else torch.ones(())
                         for i in range(g)]).clamp(min=1e-12)[:, None]
    cb_rel = (codebook / sigma).requires_grad_(True)
    sc = scales.clone().requires_grad_(learn_scales)
    latent = (w / scales[:, None]).clone()
    params = [{"params": [cb_rel], "lr": lr}]
    if learn_scales:
        params.append({"params": [sc], "lr": lr})
    opt = torch.optim.Adam(params)
    decode = _decode_fn().apply
    stats = JointStats(assign=assign)
    moved_total = jump_total = 0
    gap_total = 0.0
    jumps = torch.zeros(k + 1, dtype=torch.long)

    def snapshot():
        return (cb_rel.detach() * sigma), codes.clone(), sc.detach().clone()

    def decoded(state):
        c, q, s = state
        return s[:, None] * c.reshape(-1)[row_group[:, None] * k + q]

    initial = snapshot()
    best, best_loss = initial, None
    for step in tqdm(range(steps + 1), desc=f"ferrox codebook joint ({assign})",
                     disable=None if progress is None else not progress):
        cb = cb_rel * sigma
        c_now = cb.detach().clone()
        flat = c_now.reshape(-1)
        mean_gap = ((c_now[:, -1] - c_now[:, 0]) / (k - 1)).clamp(min=1e-12)[row_group][:, None]  # δ̄
        idx = row_group[:, None] * k + codes
        up_gap = torch.where(codes < k - 1, flat[(idx + 1).clamp(max=g * k - 1)] - flat[idx], torch.zeros(()))
        down_gap = torch.where(codes > 0, flat[idx] - flat[(idx - 1).clamp(min=0)], torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        lat = latent.clone().requires_grad_(True)
        w_hat = decode(cb, sc, lat, idx, up_gap, down_gap, mean_gap, assign == "proximal")
        # One matmul a step: with H symmetric, ∂L/∂Ŵ = −2·E·H / tr(W H Wᵀ),
        # and E·H also gives the loss (autograd through (E·H)∘E takes two).
        e = w - w_hat.detach()
        eh = e @ gram
        value = float((eh * e).sum()) / denom
        stats.loss.append(value)
        if best_loss is None or value < best_loss:
            best_loss, best, stats.best_step = value, snapshot(), step
        if step == steps:
            break
        w_hat.backward(eh.mul_(-2.0 / denom))
        g_v = lat.grad
        rms = float(g_v.pow(2).mean().sqrt())
        with torch.no_grad():
            opt.step()
            new_codes = codes
            if assign_lr > 0 and rms > 0:
                latent -= assign_lr * mean_gap * (g_v / rms)
                if assign == "ste":
                    new_codes = _nearest(cb_rel.detach() * sigma, latent, row_group)
                else:
                    # moves are judged against the codebook the gradient was taken at
                    new_codes = _proximal(c_now, latent, codes, row_group)
                    # A moved element restarts at its new codeword (the proximal
                    # point): moving back takes another half gap of push, not
                    # the next small opposite gradient.
                    j = row_group[:, None] * k + new_codes
                    latent.copy_(torch.where(new_codes != codes, flat[j], latent))
                    lo = flat[torch.where(new_codes > 0, j - 1, j)]
                    hi = flat[torch.where(new_codes < k - 1, j + 1, j)]
                    latent.copy_(torch.maximum(torch.minimum(latent, hi), lo))
            d = (new_codes - codes).abs()
            moved = d > 0
            n_moved = int(moved.sum())
            stats.moved.append(n_moved / codes.numel())
            if n_moved:
                moved_total += n_moved
                jump_total += int(d[moved].sum())
                dist = (flat[row_group[:, None] * k + new_codes] - flat[idx]).abs() / mean_gap
                gap_total += float(dist[moved].double().sum())
                stats.max_jump = max(stats.max_jump, int(d.max()))
                jumps += torch.bincount(d[moved].reshape(-1), minlength=k + 1)[: k + 1]
            codes = new_codes
            sorted_cb, codes = _sort_codebook(cb_rel.detach(), codes, row_group)
            cb_rel.copy_(sorted_cb)
    stats.initial_loss, stats.final_loss = stats.loss[0], best_loss
    stats.mean_jump = jump_total / moved_total if moved_total else 0.0
    stats.mean_jump_gap = gap_total / moved_total if moved_total else 0.0
    stats.jumps = jumps[1: stats.max_jump + 1].tolist()
    if held is not None:
        stats.heldout_initial = output_error(w, decoded(initial), held)
        stats.heldout_final = output_error(w, decoded(best), held)
    out_cb, out_codes, out_sc = best
    return out_cb, out_codes.to(torch.uint8), out_sc, stats
