"""torch modules that compute with BitDeltas directly.

``BitDeltaLinear`` replaces an ``nn.Linear`` of the base model:
y = x·W_baseᵀ (+ bias) + α ⊙ (x·Sᵀ), the second term by ferrox's 1-bit
kernel (CPU, or CUDA on torch's current stream) reading the packed signs:
neither S nor W_ft is ever materialised in the forward pass.
``MultiDeltaLinear`` serves several fine-tunes of one base in one batch:
row i uses fine-tune ``adapter_ids[i]``, one kernel call per layer.

On the CPU without autograd, up to ``FUSED_MAX_ROWS`` rows (decode-style
batches), both modules call the fused ``_core.delta_linear``: one pass over
the base rows and the sign rows computes x·W_baseᵀ + bias + α·(x·Sᵀ) with a
fixed summation order per output element, so a row's result does not depend
on the batch it is in. Larger batches (and CUDA) take torch's GEMM for the
base product plus the 1-bit kernel.

Training α (scale distillation) takes another path: calibration batches
are large (thousands of rows), where a dense GEMM beats the 1-bit kernel
(measured 5x on the tiny GPT), and the gradient with respect to x multiplies
by S anyway. So with autograd on, the forward and the backward pass each
unpack S for one layer at a time (freed when that layer's product ends;
only the packed bits are kept for the backward pass). Inference never does.
"""

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .. import _core
from ..cuda import stream_of
from . import format as fmt

#: Batch rows (x's rows, all leading dims together) up to which a CPU forward
#: without autograd runs the fused kernel ``_core.delta_linear`` (base rows and
#: sign rows in one pass); above it torch's GEMM plus the 1-bit kernel. Measured
#: on the loaded 2-core box, 4096x4096, wall time vs torch GEMM + delta_matmul:
#: f32 0.31x at 8 rows, 0.44x at 16, 0.74x at 32, 0.64x at 64; bf16 0.63x at 8,
#: 0.72x at 16, 0.83x at 24, 1.04x at 32 (torch's bf16 GEMM uses AVX512-BF16 dot
#: products). 16 keeps a margin for bf16 and covers decode-style batches.
FUSED_MAX_ROWS = 16


def _fused(x: torch.Tensor, weight: torch.Tensor, *others) -> bool:
    """Whether a forward takes the fused CPU kernel: CPU, few rows, x in the
    weight's dtype, a contiguous weight (never copied), nothing recording
    a graph."""
    if x.device.type != "cpu" or x.dtype != weight.dtype or not weight.is_contiguous():
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dim() == 0:
        return False
    if x.numel() // max(1, x.shape[-1]) > FUSED_MAX_ROWS:
        return False
    return not (torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in (x, weight) + others))


def _unpack_signs(signs: torch.Tensor, cols: int, dtype) -> torch.Tensor:
    """S = ±1 [rows, cols] from packed bits (bit 1 = −1), for the backward pass."""
    bits = torch.arange(8, device=signs.device, dtype=torch.uint8)
    b = (signs.unsqueeze(-1) >> bits) & 1
    b = b.reshape(signs.shape[0], -1)[:, :cols]
    return (1 - 2 * b.to(dtype))


class _SignMatmul(torch.autograd.Function):
    """x·Sᵀ with the gradient g·S for x (α stays a plain torch factor); S is
    unpacked transiently in both passes (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, signs, cols):
        out = x @ _unpack_signs(signs, cols, x.dtype).T
        ctx.save_for_backward(signs)
        ctx.cols = cols
        return out

    @staticmethod
    def backward(ctx, g):
        (signs,) = ctx.saved_tensors
        s = _unpack_signs(signs, ctx.cols, g.dtype)
        return g @ s, None, None


class BitDeltaLinear(nn.Module):
    """An ``nn.Linear`` of the base model plus one fine-tune's 1-bit delta.

    ``alpha`` is a parameter (a scalar, or one per output row), frozen by
    default: then the forward pass adds the 1-bit product into the base's
    output in one kernel call. ``ferrox.delta.distill`` trains it with the
    signs frozen."""

    def __init__(self, base: nn.Linear, signs: torch.Tensor, alpha):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        rb = _core.packed_row_bytes(base.in_features, 1)
        if signs.dtype != torch.uint8 or tuple(signs.shape) != (base.out_features, rb):
            raise ValueError(f"signs: expected uint8 [{base.out_features}, {rb}] for a {base.in_features}->"
                             f"{base.out_features} linear, got {signs.dtype} {list(signs.shape)}")
        alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()
        if alpha.dim() not in (0, 1) or (alpha.dim() == 1 and alpha.shape[0] != base.out_features):
            raise ValueError(f"alpha: expected a scalar or [{base.out_features}], got shape {list(alpha.shape)}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base's own parameter: shared, not copied
        self.bias = base.bias
        self.register_buffer("signs", signs.to(base.weight.device).contiguous())
        # Frozen by default (inference takes the fused kernel); distill() trains it.
        self.alpha = nn.Parameter(alpha.to(base.weight.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x, self.weight, self.bias, self.alpha):
            alpha = float(self.alpha) if self.alpha.dim() == 0 else self.alpha.detach().float().contiguous()
            bias = None if self.bias is None else self.bias.detach().contiguous()
            y = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype)
            _core.delta_linear(x.detach().contiguous(), self.weight.detach(), bias, self.signs, alpha, None, y)
            return y
        y = nn.functional.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (self.alpha.requires_grad or x.requires_grad):
            d = _SignMatmul.apply(x, self.signs, self.in_features)
            return y + (self.alpha.to(d.dtype) * d)
        alpha = float(self.alpha) if self.alpha.dim() == 0 else self.alpha.detach().float().contiguous()
        y = y.contiguous()
        _core.delta_matmul(x.contiguous(), self.signs, alpha, y, True, stream_of(x))
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"alpha={'per-row' if self.alpha.dim() else f'{float(self.alpha):.4g}'}")


class MultiDeltaLinear(nn.Module):
    """One base ``nn.Linear`` and the 1-bit deltas of several fine-tunes:
    ``forward(x, adapter_ids)`` applies fine-tune ``adapter_ids[i]`` to batch
    row i (x: [batch, ..., in]), each row bitwise what ``BitDeltaLinear`` of
    that fine-tune gives, in one kernel call for the whole batch."""

    def __init__(self, base: nn.Linear, deltas: Sequence):
        super().__init__()
        if not deltas:
            raise ValueError("deltas: expected at least one (signs, alpha) pair or BitDeltaLinear")
        pairs = [(d.signs, d.alpha.detach()) if isinstance(d, BitDeltaLinear) else d for d in deltas]
        per_row = {a.dim() if torch.is_tensor(a) else 0 for _, a in pairs}
        if len(per_row) != 1:
            raise ValueError("deltas: mix of per-matrix and per-row alphas; use one kind for every tenant")
        ref = BitDeltaLinear(base, *pairs[0])
        self.in_features, self.out_features = ref.in_features, ref.out_features
        self.weight, self.bias = base.weight, base.bias
        for s, a in pairs[1:]:
            BitDeltaLinear(base, s, a)  # validates each tenant's shapes
        self.register_buffer("signs", torch.stack([s.to(base.weight.device) for s, _ in pairs]).contiguous())
        self.register_buffer("alphas", torch.stack([torch.as_tensor(a, dtype=torch.float32).to(base.weight.device)
                                                    for _, a in pairs]).contiguous())

    @property
    def tenants(self) -> int:
        return self.signs.shape[0]

    def forward(self, x: torch.Tensor, adapter_ids) -> torch.Tensor:
        ids = torch.as_tensor(adapter_ids, dtype=torch.int64, device=x.device)
        if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
            raise ValueError(f"adapter_ids: expected one id per batch row ({x.shape[0]}), got shape {list(ids.shape)}")
        rows = x.reshape(-1, self.in_features).contiguous()
        per_row_ids = ids.repeat_interleave(rows.shape[0] // max(1, x.shape[0])) if x.dim() > 2 else ids
        if _fused(rows, self.weight, self.bias):
            bias = None if self.bias is None else self.bias.detach().contiguous()
            y = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
            _core.delta_linear(rows.detach(), self.weight.detach(), bias, self.signs, self.alphas,
                               per_row_ids.contiguous(), y)
            return y.reshape(*x.shape[:-1], self.out_features)
        y = nn.functional.linear(rows, self.weight, self.bias).contiguous()
        _core.delta_matmul_multi(rows, self.signs, self.alphas, per_row_ids.contiguous(), y, True, True, stream_of(x))
        return y.reshape(*x.shape[:-1], self.out_features)


def _module_of(model: nn.Module, param_name: str):
    path, _, leaf = param_name.rpartition(".")
    module = model.get_submodule(path) if path else model
    return path, leaf, module


def apply_bitdelta(model: nn.Module, delta, *, check_base: bool = True) -> Dict[str, BitDeltaLinear]:
    """Turns a base model into the compressed fine-tune, in place: every
    compressed ``X.weight`` whose module ``X`` is an ``nn.Linear`` becomes a
    ``BitDeltaLinear``; verbatim tensors (embeddings, norms, ...) are loaded
    from the delta. With ``check_base`` the model's weights must be the base
    the delta was made against (content hashes). Returns the new modules."""
    d = delta if isinstance(delta, fmt.BitDelta) else fmt.BitDelta.load(delta)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    swapped = {}
    for name, entry in d.entries.items():
        path, leaf, module = _module_of(model, name)
        if leaf != "weight" or not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r}: BitDelta applies to nn.Linear weights; {path or 'the model'} is "
                             f"{type(module).__name__}")
        w = module.weight.detach()
        if check_base:
            from .. import dtypes

            d.check_base_tensor(name, dtypes.from_torch(w.dtype), tuple(w.shape),
                                _core.delta_content_hash(w.cpu().contiguous()))
        if not path:
            raise ValueError(f"{name!r}: the model itself is the nn.Linear; wrap it in a module, or build a "
                             f"BitDeltaLinear directly")
        new = BitDeltaLinear(module, d.signs(name), d.alpha(name))
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
        swapped[path] = new
    with torch.no_grad():
        for name in d.verbatim:
            target: Optional[torch.Tensor] = params.get(name)
            if target is None:
                continue  # tensors the model does not hold (e.g. tied weights saved twice)
            value = d.verbatim_tensor(name)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{name!r}: the delta holds {list(value.shape)}, the model {list(target.shape)} "
                                 f"(added tokens? resize the model's embeddings first)")
            target.copy_(value.to(target.dtype))
    return swapped
