"""MKOR and MKOR-H: Kronecker-factored preconditioning kept as inverses and
updated by rank-1 Sherman–Morrison steps (Mozaffari et al., NeurIPS 2023).

Every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` whose weight is optimized,
the root module included, is preconditioned, except grouped convolutions
(``groups > 1``, depthwise ones included): their weight is block-diagonal
across groups, which one Kronecker pair over all channels does not model, so
they are left to the inner optimizer with their plain gradients (no hooks,
no factors). Hooks capture the
batch-mean input vector ā (with a trailing 1 when the bias is optimized) and
the batch-mean output-gradient vector ḡ; each layer keeps the inverses
A⁻¹ ((d_in+1)²) and G⁻¹ (d_out²) of its two factors and never the factors.
A step

1. updates the inverses from ā and ḡ (every ``inv_freq`` steps) by one fused
   Rust/CUDA call over all layers (``_core.mkor_rank1_update``), in one of two
   modes (``mode=``):

   * ``"reference"`` (default; the reference code's): damping in inverse
     space, Inv ← (inv(γ·Inv + (1−γ)·I) + v·vᵀ)⁻¹;
   * ``"paper"``: the exact inverse of the factor EMA L ← γ·L + (1−γ)·v·vᵀ
     (L₀ = I), i.e. Inv ← SM(Inv/γ, √(1−γ)·v). Without damping its only
     damping term is the identity part of L, which decays as γᵗ along
     directions the vectors do not refresh (the stabiliser then puts it
     back, below). ``damping`` δ ∈ [0, 1] (default 0: the exact EMA inverse)
     blends the decayed inverse towards I before the rank-1 step,
     Inv ← SM((1−δ)·Inv/γ + δ·I, √(1−γ)·v), i.e. L ← inv((1−δ)·(γL)⁻¹ + δ·I)
     + (1−γ)·v·vᵀ: for δ > 1−γ the eigenvalues of L along directions no
     vector refreshes settle at (δ+γ−1)/(δγ) (those of Inv at δγ/(δ+γ−1))
     instead of decaying to 0. The ``"reference"`` mode's damping is fixed
     (1−γ, in inverse space) and takes no ``damping``.

2. preconditions ΔW = G⁻¹ · [∇W | ∇b] · A⁻¹ (torch GEMMs in f32) and rescales
   it to the Frobenius norm of [∇W | ∇b] (a non-finite ratio keeps the plain
   gradient), writes it into ``.grad`` and
3. steps the inner optimizer (``inner="sgd"`` with momentum, ``"adamw"`` or
   ``"lamb"``), which shares MKOR's ``param_groups``: ``lr`` is the inner LR
   and LR schedulers act on it.

Inverses are stored in ``factor_dtype`` (float16 by default, computed in
f32; float32/bfloat16; float64 runs the same update in torch, for tests).
Norm-based stabiliser: when max|Inv| exceeds ``stabilizer_threshold`` after
an update the factor is flagged and its next update first blends it,
Inv ← (1−ζ)·Inv + ζ·I (ζ = ``stabilization_factor``); a non-finite result
(fp16 overflow) is replaced by I at once, so a stored inverse is never
inf/NaN. Input rows are clamped to ±``clipping_value`` before averaging.

Statistics: ḡ is the mean over rows of (rows of that backward) × grad_output,
which undoes a mean-reduced loss (the reference code's scaling), divided by
the ``grad_scaler``'s scale when one is given. Under ``torch.distributed``
(an initialised process group with more than one rank) only the O(d) sums
and row counts are all-reduced — one call per step — so every rank builds the
factors of the global batch. ``zero_grad`` clears collected statistics (a
step that a GradScaler skipped leaves none behind).

MKOR-H (``hybrid=True``): the rule that ends the second-order phase. Losses
come from the closure or ``step(loss=...)``; each ``hybrid_window`` steps the
window's mean loss is compared with the previous window's. When it fell by
less than the fraction ``hybrid_tol`` (the preconditioned steps stopped
reducing the loss) MKOR falls back for good to the plain inner optimizer
(``stats["mkor_fallbacks"]`` = 1): no preconditioning, no factor updates.

``stats``: steps, skipped_steps (non-finite gradients), stabilizer_hits
(factors flagged), factor_resets (non-finite results replaced by I),
mkor_fallbacks. Everything needed to resume (inverses, flags, inner state,
step, MKOR-H mode and window) is in ``state_dict()`` as tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Optimizer, check_betas, check_choice, check_float, check_int, int_tensor, tensor_int

_MODES = ("reference", "paper")
_INNER = ("sgd", "adamw", "lamb")
_FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _core():
    from .. import _core as core
    return core


# --- the update in torch (float64 path and test reference) -----------------

def rank1_update_reference(inv: torch.Tensor, v: torch.Tensor, *, flagged: bool, mode: str = "reference",
                           stat_decay: float = 0.95, stabilization_factor: float = 0.1,
                           stabilizer_threshold: float = 2.0, damping: float = 0.0):
    """One factor's update in torch, in ``inv``'s dtype: the algebra of the
    fused kernel (see the module docstring), without its float order.
    Returns (new inverse, flagged for the next update, max|new|, reset to I)."""
    n = inv.shape[0]
    eye = torch.eye(n, dtype=inv.dtype, device=inv.device)
    gamma, zeta = stat_decay, stabilization_factor
    w = inv if not flagged else (1 - zeta) * inv + zeta * eye
    if mode == "reference":
        m, vec = gamma * w + (1 - gamma) * eye, v.to(inv.dtype)
    else:
        m, vec = (1 - damping) / gamma * w + damping * eye, math.sqrt(1 - gamma) * v.to(inv.dtype)
    u = m @ vec
    d = 1 + vec @ u
    new = m - torch.outer(u, u) / d if bool(torch.isfinite(d)) and float(d) > 0 else m
    if not bool(torch.isfinite(new).all()):
        return eye, False, 1.0, True
    top = float(new.abs().max()) if n else 0.0
    return new, top > stabilizer_threshold, top, False


# --- inner optimizers --------------------------------------------------------

class _Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020): Adam's direction plus decoupled weight decay,
    scaled per tensor by the trust ratio ‖p‖/‖r‖ (1 where either is 0)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                r = (st["exp_avg"] / (1 - b1 ** t)) / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + group["eps"])
                pf = p.float()
                if group["weight_decay"]:
                    r = r + group["weight_decay"] * pf
                pn, rn = pf.norm(), r.norm()
                trust = torch.where((pn > 0) & (rn > 0), pn / rn, torch.ones_like(pn))
                p.copy_(pf - group["lr"] * trust * r)
        return None


def _make_inner(kind, groups, lr, momentum, weight_decay, betas, eps):
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    return _Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# --- layers and their statistics ---------------------------------------------

class _Layer:
    """One preconditioned module: hooks accumulate the row sums of its inputs
    and (rows × output gradients), and the row counts, until the step."""

    def __init__(self, module: nn.Module, bias_used: bool, owner: "MKOR", index: int):
        self.module = module
        self.index = index
        self.weight = module.weight
        self.bias = module.bias if bias_used else None
        self.d_out = module.weight.shape[0]
        self.d_in = module.weight[0].numel() + (1 if bias_used else 0)
        self.owner = owner
        self.clear()
        self.handle = module.register_forward_hook(self._forward)

    def clear(self):
        self.a_sum = self.g_sum = None
        self.a_rows = self.g_rows = 0

    def _row_sum(self, x: torch.Tensor):
        """Sum over the rows of the layer's input matrix (a conv's patches)
        and the row count; elements clamped to ±clipping_value first."""
        c = self.owner.clipping_value
        x = x.to(self.owner.stat_dtype).clamp(-c, c)
        m = self.module
        if not isinstance(m, nn.Conv2d):
            rows = x.reshape(-1, x.shape[-1])
            return rows.sum(0), rows.shape[0]
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            pad = 0
        else:
            pad = m.padding
        # Patches are copies of input elements, so the batch is summed first
        # and only one image is unfolded.
        batch = x.shape[0] if x.dim() == 4 else 1
        cols = F.unfold(x.sum(0, keepdim=True) if x.dim() == 4 else x[None], m.kernel_size,
                        dilation=m.dilation, padding=pad, stride=m.stride)
        return cols[0].sum(1), batch * cols.shape[2]

    def _forward(self, module, inputs, output):
        if not (module.training and torch.is_grad_enabled() and self.owner._collecting()):
            return
        with torch.no_grad():
            s, rows = self._row_sum(inputs[0].detach())
            if self.bias is not None:
                s = torch.cat([s, s.new_full((1,), float(rows))])
            self.a_sum = s if self.a_sum is None else self.a_sum + s
            self.a_rows += rows
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, grad):
        with torch.no_grad():
            g = grad.detach()
            g = g.movedim(1, -1) if isinstance(self.module, nn.Conv2d) else g
            g = g.reshape(-1, g.shape[-1]).to(self.owner.stat_dtype)
            s = g.sum(0) * float(g.shape[0])
            self.g_sum = s if self.g_sum is None else self.g_sum + s
            self.g_rows += g.shape[0]

    def ready(self) -> bool:
        return self.a_rows > 0 and self.g_rows > 0


class MKOR(Optimizer):
    """MKOR / MKOR-H (see the module docstring).

    ``params``: the parameters to optimize (all of them; the Linear/Conv2d
    weights among them are preconditioned). ``model``: the module whose
    layers are hooked. ``lr``, ``momentum``, ``weight_decay``, ``betas``,
    ``eps``: the inner optimizer's. ``mode``: ``"reference"`` or ``"paper"``;
    ``damping``: the paper mode's blend of the inverse towards I, in [0, 1]
    (0, the default, is the exact EMA inverse; see the module docstring).
    Grouped ``nn.Conv2d`` layers (``groups > 1``) are not preconditioned.
    ``grad_scaler``: a ``torch.amp.GradScaler``
    whose scale the output gradients carry (use ``scaler.step(opt)``).
    ``process_group``: for the all-reduce of the statistics (default: the
    world group when torch.distributed is initialised).
    """

    STAT_NAMES = Optimizer.STAT_NAMES + ("stabilizer_hits", "factor_resets", "mkor_fallbacks")

    def __init__(self, params, *, model: nn.Module, lr: float, inner: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-6, mode: str = "reference",
                 damping: float = 0.0, stat_decay: float = 0.95, inv_freq: int = 1, stabilization_factor: float = 0.1,
                 stabilizer_threshold: float = 2.0, factor_dtype: torch.dtype = torch.float16,
                 clipping_value: float = 100.0, hybrid: bool = False, hybrid_window: int = 20,
                 hybrid_tol: float = 0.01, grad_scaler=None, process_group=None,
                 nonfinite: str = "skip", seed: int = 0):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        lr = check_float("lr", lr, lo=0.0)
        self.inner_kind = check_choice("inner", inner, _INNER)
        momentum = check_float("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
        weight_decay = check_float("weight_decay", weight_decay, lo=0.0)
        betas = check_betas("betas", betas)
        eps = check_float("eps", eps, lo=0.0, lo_open=True)
        self.mode = check_choice("mode", mode, _MODES)
        self.damping = check_float("damping", damping, lo=0.0, hi=1.0)
        if self.mode == "reference" and self.damping != 0.0:
            raise ValueError(f"damping: only mode='paper' takes it (the reference mode's is fixed), got {damping!r}")
        self.stat_decay = check_float("stat_decay", stat_decay, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        self.inv_freq = check_int("inv_freq", inv_freq, lo=1)
        self.stabilization_factor = check_float("stabilization_factor", stabilization_factor, lo=0.0, hi=1.0)
        self.stabilizer_threshold = check_float("stabilizer_threshold", stabilizer_threshold, lo=0.0, lo_open=True)
        if factor_dtype not in _FACTOR_DTYPES:
            raise ValueError(f"factor_dtype: expected one of {_FACTOR_DTYPES}, got {factor_dtype!r}")
        self.factor_dtype = factor_dtype
        # The statistics in f32, or f64 with f64 inverses (the exact path).
        self.stat_dtype = torch.float64 if factor_dtype == torch.float64 else torch.float32
        self.clipping_value = check_float("clipping_value", clipping_value, lo=0.0, lo_open=True)
        if not isinstance(hybrid, bool):
            raise ValueError(f"hybrid: expected a bool, got {type(hybrid).__name__}")
        self.hybrid = hybrid
        self.hybrid_window = check_int("hybrid_window", hybrid_window, lo=1)
        self.hybrid_tol = check_float("hybrid_tol", hybrid_tol, lo=0.0)
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        super().__init__(params, {"lr": lr}, nonfinite=nonfinite, seed=seed)
        self.inner = _make_inner(self.inner_kind, self.param_groups, lr, momentum, weight_decay, betas, eps)
        self._link_inner()
        gs = self.global_state
        gs["mkor_step"] = int_tensor(0)
        gs["mkor_first_order"] = int_tensor(0)
        gs["hybrid_sum"] = torch.tensor(0.0, dtype=torch.float64)
        gs["hybrid_count"] = int_tensor(0)
        gs["hybrid_prev"] = torch.tensor(math.nan, dtype=torch.float64)
        optimized = {id(p) for g in self.param_groups for p in g["params"]}
        self._layers = []
        for m in model.modules():
            is_conv = isinstance(m, nn.Conv2d) and m.groups == 1  # grouped: see the module docstring
            if (isinstance(m, nn.Linear) or is_conv) and id(m.weight) in optimized:
                bias_used = m.bias is not None and id(m.bias) in optimized
                self._layers.append(_Layer(m, bias_used, self, len(self._layers)))

    def _link_inner(self):
        # One set of groups and one state for both: schedulers and
        # state_dict see the inner optimizer's hyperparameters and buffers.
        self.inner.param_groups = self.param_groups
        self.inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link_inner()
        # The base keeps global state on the CPU; the inverses go back to
        # their layers' devices.
        for layer in self._layers:
            for k, v in self.factors(layer.index).items():
                self.global_state[f"mkor_{layer.index}_{k}"] = v.to(layer.weight.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self._layers:
            layer.clear()

    def remove_hooks(self) -> None:
        """Detaches MKOR from the model (the hooks stay otherwise)."""
        for layer in self._layers:
            layer.handle.remove()

    # --- state ----------------------------------------------------------------

    @property
    def first_order(self) -> bool:
        return bool(tensor_int(self.global_state["mkor_first_order"]))

    def _collecting(self) -> bool:
        return not self.first_order and tensor_int(self.global_state["mkor_step"]) % self.inv_freq == 0

    def _factors(self, layer: _Layer) -> dict:
        """The layer's inverses and flags. They live in ``global_state`` (saved
        under ``state_dict()["ferrox"]``), not in ``self.state``, which is the
        inner optimizer's: torch's optimizers initialise a parameter's state
        only while it is empty."""
        gs, key = self.global_state, f"mkor_{layer.index}_"
        if key + "a_inv" not in gs:
            dev = layer.weight.device
            gs[key + "a_inv"] = torch.eye(layer.d_in, dtype=self.factor_dtype, device=dev)
            gs[key + "g_inv"] = torch.eye(layer.d_out, dtype=self.factor_dtype, device=dev)
            gs[key + "flags"] = torch.zeros(2, dtype=torch.float32, device=dev)
        return {k: gs[key + k] for k in ("a_inv", "g_inv", "flags")}

    def factors(self, layer_index: int) -> dict:
        """A⁻¹, G⁻¹ and the two stabiliser flags of layer ``layer_index`` (in
        ``model.modules()`` order); empty before its first update."""
        key = f"mkor_{layer_index}_"
        return {k: self.global_state[key + k] for k in ("a_inv", "g_inv", "flags") if key + k in self.global_state}

    # --- step -----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One MKOR step. ``closure`` (optional) re-evaluates the loss; MKOR-H
        reads the loss from it or from ``loss``."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.finite_or_skip(self.group_params()):
            self._clear_stats()
            return loss
        self.count("steps")
        if not self.first_order:
            ready = [l for l in self._layers if l.ready()] if self._collecting() else []
            if ready:
                self._update_factors(ready)
            for layer in self._layers:
                if self.factors(layer.index) and layer.weight.grad is not None:
                    self._precondition(layer)
        self._clear_stats()
        self.inner.step()
        self.global_state["mkor_step"] = int_tensor(tensor_int(self.global_state["mkor_step"]) + 1)
        if self.hybrid and loss is not None and not self.first_order:
            self._hybrid_rule(float(loss))
        return loss

    def _clear_stats(self):
        for layer in self._layers:
            layer.clear()

    def _vectors(self, layers):
        """ā and ḡ per layer, from the (all-reduced) sums and row counts."""
        sums = [t for l in layers for t in (l.a_sum, l.g_sum)]
        dev = sums[0].device
        counts = torch.tensor([c for l in layers for c in (l.a_rows, l.g_rows)], dtype=self.stat_dtype, device=dev)
        flat = torch.cat(sums + [counts])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size(self.process_group) > 1:
            torch.distributed.all_reduce(flat, group=self.process_group)
        counts = flat[-counts.numel():]
        out, off = [], 0
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        for k, t in enumerate(sums):
            v = flat[off:off + t.numel()] / counts[k]
            out.append(v / scale if k % 2 else v)
            off += t.numel()
        return out

    def _update_factors(self, layers):
        vecs = self._vectors(layers)
        states = [self._factors(l) for l in layers]
        invs = [st[k] for st in states for k in ("a_inv", "g_inv")]
        flags = torch.cat([st["flags"] for st in states])
        kw = dict(mode=self.mode, stat_decay=self.stat_decay, stabilization_factor=self.stabilization_factor,
                  damping=self.damping)
        if self.factor_dtype == torch.float64:
            maxabs = torch.empty_like(flags)
            for k, (inv, v) in enumerate(zip(invs, vecs)):
                new, fl, top, reset = rank1_update_reference(inv, v, flagged=bool(flags[k]), stabilizer_threshold=self.stabilizer_threshold, **kw)
                inv.copy_(new)
                flags[k], maxabs[k] = float(fl), (-1.0 if reset else top)
        else:
            flat = torch.cat(vecs).float().contiguous()
            maxabs = torch.empty_like(flags)
            extra = {}
            if flat.is_cuda:
                from ..cuda import stream_of
                ns = [inv.shape[0] for inv in invs]
                offs = [0]
                for n in ns[:-1]:
                    offs.append(offs[-1] + n)
                table = torch.tensor([[inv.data_ptr(), n, o] for inv, n, o in zip(invs, ns, offs)], dtype=torch.int64)
                extra = dict(table=table.to(flat.device), scratch=torch.empty_like(flat), stream=stream_of(flat))
            _core().mkor_rank1_update(invs, flat, flags, maxabs, threshold=self.stabilizer_threshold, **kw, **extra)
        for k, st in enumerate(states):
            st["flags"].copy_(flags[2 * k:2 * k + 2])
        hits, resets = torch.stack([flags.sum(), (maxabs < 0).sum().float()]).tolist()
        self.count("stabilizer_hits", hits)
        self.count("factor_resets", resets)

    def _precondition(self, layer: _Layer):
        st = self.factors(layer.index)
        gw = layer.weight.grad
        gm = gw.reshape(layer.d_out, -1).float()
        if layer.bias is not None:
            gb = layer.bias.grad if layer.bias.grad is not None else torch.zeros_like(layer.bias)
            gm = torch.cat([gm, gb.float().reshape(-1, 1)], 1)
        delta = st["g_inv"].float() @ gm @ st["a_inv"].float()
        ratio = gm.norm() / delta.norm()
        delta = torch.where(torch.isfinite(ratio), delta * ratio, gm)
        if layer.bias is not None:
            gw.copy_(delta[:, :-1].reshape_as(gw))
            if layer.bias.grad is not None:
                layer.bias.grad.copy_(delta[:, -1])
        else:
            gw.copy_(delta.reshape_as(gw))

    def _hybrid_rule(self, loss: float):
        gs = self.global_state
        gs["hybrid_sum"] += loss
        count = tensor_int(gs["hybrid_count"]) + 1
        if count < self.hybrid_window:
            gs["hybrid_count"] = int_tensor(count)
            return
        mean = float(gs["hybrid_sum"]) / count
        prev = float(gs["hybrid_prev"])
        gs["hybrid_sum"].zero_()
        gs["hybrid_count"] = int_tensor(0)
        gs["hybrid_prev"].fill_(mean)
        if math.isfinite(prev) and not mean < prev * (1.0 - self.hybrid_tol):
            gs["mkor_first_order"] = int_tensor(1)
            self.count("mkor_fallbacks")
