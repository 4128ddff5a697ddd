"""torch modules that compute with codebook-quantized weights directly.

``CodebookLinear`` replaces an ``nn.Linear``: its forward pass is one call of
ferrox's LUT kernel (``_core.codebook_linear``; Rust on the CPU, CUDA on
torch's current stream), which decodes the packed codes in registers while
it multiplies, so no weight-sized tensor is allocated. The kernel computes the
permuted rows; the output is put back in the original order by one
output-sized gather, or left permuted when the permutation is folded into
the next layer's input columns (``apply_codebook(..., fold_permutation=True)``).

``CodebookEmbedding`` replaces an ``nn.Embedding`` whose table is quantized
(product codebooks over the rows): a lookup decodes only the requested rows.

With autograd recording a gradient for x, the backward pass decodes the
weight transiently (one layer at a time, freed after its product); inference
never does.
"""

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import _core
from ..cuda import stream_of

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

#: Elementwise modules that commute with a permutation of their features:
#: a Linear's row permutation may cross them into the next Linear's columns.
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity,
               nn.Dropout, nn.Softplus, nn.Hardswish)


def _check_ct(ct, what: str):
    for field in ("shape", "dtype", "bits", "vector_dim", "codes", "codebooks", "group_offsets", "perm", "row_scale"):
        if not hasattr(ct, field):
            raise TypeError(f"{what}: expected a CodebookTensor, got {type(ct).__name__} without {field!r}")
    out, inf = (int(s) for s in ct.shape)
    bits, d = int(ct.bits), int(ct.vector_dim)
    if d < 1 or inf % d:
        raise ValueError(f"{what}: vector_dim {d} does not divide in_features {inf}")
    rb = _core.packed_row_bytes(inf // d, bits)
    if ct.codes.dtype != torch.uint8 or tuple(ct.codes.shape) != (out, rb):
        raise ValueError(f"{what}: codes: expected uint8 [{out}, {rb}], got {ct.codes.dtype} {list(ct.codes.shape)}")
    cb = ct.codebooks
    if cb.dim() != 3 or cb.shape[1] != 2 ** bits or cb.shape[2] != d:
        raise ValueError(f"{what}: codebooks: expected [groups, {2 ** bits}, {d}], got {list(cb.shape)}")
    offs = torch.as_tensor(ct.group_offsets).to(torch.int64).cpu()
    if (offs.dim() != 1 or offs.numel() != cb.shape[0] + 1 or int(offs[0]) != 0 or int(offs[-1]) != out
            or bool((offs[1:] < offs[:-1]).any())):
        raise ValueError(f"{what}: group_offsets: expected {cb.shape[0] + 1} non-decreasing values from 0 to {out}, "
                         f"got {offs.tolist()}")
    if ct.perm is not None:
        p = torch.as_tensor(ct.perm).to(torch.int64).cpu()
        if p.shape != (out,) or not torch.equal(torch.sort(p).values, torch.arange(out)):
            raise ValueError(f"{what}: perm: expected a permutation of range({out})")
    if ct.row_scale is not None and tuple(ct.row_scale.shape) != (out,):
        raise ValueError(f"{what}: row_scale: expected [{out}], got {list(ct.row_scale.shape)}")
    return out, inf


def _rows(ct, device=None) -> Dict[str, Optional[torch.Tensor]]:
    """The CodebookTensor's arrays as the kernel takes them (contiguous)."""
    dev = device if device is not None else ct.codes.device
    perm = None if ct.perm is None else torch.as_tensor(ct.perm).to(device=dev, dtype=torch.int64)
    return {
        "codes": ct.codes.to(dev).contiguous(),
        "codebooks": ct.codebooks.to(device=dev, dtype=torch.float32).contiguous(),
        "group_offsets": torch.as_tensor(ct.group_offsets).to(device=dev, dtype=torch.int32).contiguous(),
        "row_scale": None if ct.row_scale is None else ct.row_scale.to(device=dev, dtype=torch.float32).contiguous(),
        "perm": perm,
        "inv_perm": None if perm is None else torch.argsort(perm),
    }


def decode_rows(codes: torch.Tensor, codebooks: torch.Tensor, group_offsets: torch.Tensor,
                row_scale: Optional[torch.Tensor], rows: torch.Tensor, bits: int, vector_dim: int,
                cols: int) -> torch.Tensor:
    """The decoded f32 permuted rows ``rows`` ([n] int64) of a codebook weight
    with ``cols`` columns: [n, cols] (only those rows are touched)."""
    from .. import pack

    packed = codes.index_select(0, rows)
    if packed.device.type == "cpu":
        idx = pack.unpack_codes(packed.contiguous(), bits, cols // vector_dim).to(torch.int64)
    else:  # the bit layout, in torch (a few rows, on the device)
        pos = torch.arange(cols // vector_dim, device=packed.device) * bits
        lo, sh = pos // 8, pos % 8
        hi = (lo + 1).clamp(max=packed.shape[1] - 1)
        two = packed[:, lo].to(torch.int64) | (packed[:, hi].to(torch.int64) << 8) * (lo + 1 < packed.shape[1])
        idx = (two >> sh) & ((1 << bits) - 1)
    g = torch.searchsorted(group_offsets.to(torch.int64), rows, right=True) - 1
    vals = codebooks[g.unsqueeze(1), idx]  # [n, cols // d, d]
    vals = vals.reshape(rows.shape[0], cols)
    if row_scale is not None:
        vals = vals * row_scale.index_select(0, rows).unsqueeze(1)
    return vals


class _CodebookMatmul(torch.autograd.Function):
    """x·Ŵ_permᵀ by the kernel; the gradient for x decodes Ŵ transiently."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module._kernel(x)

    @staticmethod
    def backward(ctx, g):
        m = ctx.module
        w = m.dequantize_permuted().to(g.dtype)
        return g @ w, None


class CodebookLinear(nn.Module):
    """A linear layer whose weight is a ``CodebookTensor``: y = x·Ŵᵀ + bias,
    Ŵ decoded from the packed codes inside the matmul kernel. x: any leading
    dims, float32/float16/bfloat16 (the output has x's dtype), CPU or CUDA
    (the buffers' device; ``.to(device)`` moves them).

    ``bias`` is the original layer's bias (original row order) or None.
    ``permuted_output`` leaves the output rows in the stored (permuted)
    order; ``apply_codebook`` sets it only where the next layer's input
    columns were permuted to match."""

    def __init__(self, ct, bias: Optional[torch.Tensor] = None, *, permuted_output: bool = False):
        super().__init__()
        self.out_features, self.in_features = _check_ct(ct, "weight")
        self.bits, self.vector_dim = int(ct.bits), int(ct.vector_dim)
        self.weight_dtype = ct.dtype
        arrays = _rows(ct)
        for name in ("codes", "codebooks", "group_offsets", "row_scale", "perm", "inv_perm"):
            self.register_buffer(name, arrays[name])
        if bias is not None:
            bias = bias.detach().to(device=self.codes.device, dtype=torch.float32)
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias: expected [{self.out_features}], got {list(bias.shape)}")
            # The kernel adds the bias in permuted row order.
            bias = bias if self.perm is None else bias.index_select(0, self.perm)
        self.register_buffer("bias_permuted", None if bias is None else bias.contiguous())
        self.permuted_output = bool(permuted_output) and self.perm is not None

    def _f32(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # model.to(dtype) casts float buffers too; the kernel reads f32.
        return t if t is None or t.dtype == torch.float32 else t.float()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        _core.codebook_linear(rows, self.codes, self._f32(self.codebooks), self.group_offsets,
                              self._f32(self.row_scale), self._f32(self.bias_permuted), self.bits, self.vector_dim,
                              y, stream_of(x))
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in FLOATS:
            raise TypeError(f"x: expected float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape [..., {self.in_features}], got {list(x.shape)}")
        if x.device != self.codes.device:
            raise ValueError(f"x: on {x.device} but the layer's codes are on {self.codes.device}")
        if torch.is_grad_enabled() and x.requires_grad:
            y = _CodebookMatmul.apply(x, self)
        else:
            y = self._kernel(x.detach())
        if self.perm is None or self.permuted_output:
            return y
        return y.index_select(-1, self.inv_perm)

    def dequantize_permuted(self) -> torch.Tensor:
        """Ŵ_perm as a dense f32 [out, in] (for tests and the backward pass;
        the forward pass never builds it)."""
        rows = torch.arange(self.out_features, device=self.codes.device)
        return decode_rows(self.codes, self._f32(self.codebooks), self.group_offsets, self._f32(self.row_scale),
                           rows, self.bits, self.vector_dim, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """Ŵ in the original row order, dense f32 [out, in]."""
        w = self.dequantize_permuted()
        return w if self.perm is None else w.index_select(0, self.inv_perm)

    def fold_into_columns(self, perm: torch.Tensor) -> None:
        """Permutes this layer's input columns: afterwards it takes the
        previous layer's permuted output h_perm (h_perm[r] = h[perm[r]]).
        Scalar codes only (a column permutation would split d-vectors)."""
        if self.vector_dim != 1:
            raise ValueError(f"fold_into_columns: vector_dim {self.vector_dim} codes cannot be column-permuted")
        from .. import pack

        cols = pack.unpack_codes(self.codes.cpu().contiguous(), self.bits, self.in_features)
        cols = cols.index_select(1, perm.cpu().to(torch.int64)).contiguous()
        self.codes = pack.pack_codes(cols, self.bits).to(self.codes.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"vector_dim={self.vector_dim}, groups={self.codebooks.shape[0]}, "
                f"permuted={'output' if self.permuted_output else self.perm is not None}, "
                f"bias={self.bias_permuted is not None}")


class CodebookEmbedding(nn.Module):
    """An embedding table [num_embeddings, dim] stored as a CodebookTensor
    (rows = tokens, d-dim product codebooks over each row's entries): a
    lookup decodes only the rows of the requested ids (in the table's
    original dtype, or ``dtype``)."""

    def __init__(self, ct, *, padding_idx: Optional[int] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = _check_ct(ct, "weight")
        self.bits, self.vector_dim = int(ct.bits), int(ct.vector_dim)
        self.padding_idx = padding_idx
        self.dtype = dtype or ct.dtype
        arrays = _rows(ct)
        for name in ("codes", "codebooks", "group_offsets", "row_scale", "inv_perm"):
            self.register_buffer(name, arrays[name])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids: expected int64 or int32, got {ids.dtype}")
        flat = ids.reshape(-1).to(device=self.codes.device, dtype=torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"ids: expected values in [0, {self.num_embeddings})")
        rows = flat if self.inv_perm is None else self.inv_perm.index_select(0, flat)
        cb = self.codebooks if self.codebooks.dtype == torch.float32 else self.codebooks.float()
        scale = self.row_scale if self.row_scale is None or self.row_scale.dtype == torch.float32 else self.row_scale.float()
        vals = decode_rows(self.codes, cb, self.group_offsets, scale, rows, self.bits, self.vector_dim,
                           self.embedding_dim)
        return vals.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, vector_dim={self.vector_dim}, "
                f"groups={self.codebooks.shape[0]}")


# ------------------------------------------------------------ apply_codebook


_LINEARS = (nn.Linear, CodebookLinear)


def fold_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """(producer, consumer) Linear (or CodebookLinear) module paths where the producer's output
    feeds only an elementwise activation and then the consumer, so a row
    permutation of the producer can move into the consumer's input columns:
    - in an ``nn.Sequential``: Linear, elementwise modules (``ELEMENTWISE``),
      Linear, consecutive;
    - a BERT-style MLP: ``X.intermediate.dense`` (inside a module with an
      ``intermediate_act_fn``) feeding ``X.output.dense``.
    Never a Linear whose rows feed a residual stream (attention outputs, an
    MLP's last projection), nor gated MLPs (gate and up rows are multiplied
    together: one permutation would have to serve both)."""
    pairs = []
    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for i, (a, ma) in enumerate(kids):
                if not isinstance(ma, _LINEARS):
                    continue
                j = i + 1
                while j < len(kids) and isinstance(kids[j][1], ELEMENTWISE):
                    j += 1
                if j < len(kids) and isinstance(kids[j][1], _LINEARS):
                    pairs.append((prefix + a, prefix + kids[j][0]))
        inter = getattr(mod, "intermediate", None)
        out = getattr(mod, "output", None)
        if (inter is not None and hasattr(inter, "intermediate_act_fn") and isinstance(getattr(inter, "dense", None), _LINEARS)
                and out is not None and isinstance(getattr(out, "dense", None), _LINEARS)):
            pairs.append((f"{prefix}intermediate.dense", f"{prefix}output.dense"))
    return pairs


def _set_module(model: nn.Module, path: str, new: nn.Module):
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def _resolve(model: nn.Module, name: str, params: Dict[str, torch.Tensor]) -> Optional[str]:
    """The model's parameter name for a checkpoint name (exact, or without
    the model's ``base_model_prefix``, e.g. "bert.")."""
    if name in params:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in params:
        return name[len(prefix) + 1:]
    return None


def apply_codebook(model: nn.Module, source, *, fold_permutation: bool = False,
                   pairs: Optional[Iterable[Tuple[str, str]]] = None) -> Dict[str, nn.Module]:
    """Swaps the model's modules for their codebook-quantized versions, in
    place: every quantized ``X.weight`` whose module ``X`` is an
    ``nn.Linear`` becomes a ``CodebookLinear`` (bias kept), an
    ``nn.Embedding`` a ``CodebookEmbedding``; passthrough tensors are loaded
    into the model. ``source``: a folder written by ``ferrox compress
    codebook`` (read with ``ferrox.codebook.load``) or its
    ``(tensors, passthrough)`` pair.

    ``fold_permutation``: for each (producer, consumer) of ``pairs``
    (default ``fold_pairs(model)``: the patterns safe by construction) whose
    producer has a row permutation, the producer's output stays permuted and
    the consumer's input columns are permuted instead (a dense Linear's
    weight, or a scalar-code CodebookLinear's codes), saving the gather.
    Returns the new modules by path."""
    if isinstance(source, (tuple, list)):
        tensors, passthrough = source
    else:
        from . import load

        tensors, passthrough = load(source)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    swapped: Dict[str, nn.Module] = {}
    for name, ct in tensors.items():
        pname = _resolve(model, name, params)
        if pname is None:
            raise ValueError(f"{name!r}: the model has no such parameter")
        path, _, leaf = pname.rpartition(".")
        module = model.get_submodule(path) if path else model
        if leaf != "weight" or not path:
            raise ValueError(f"{name!r}: codebooks apply to the weight of an nn.Linear or nn.Embedding submodule")
        if tuple(ct.shape) != tuple(module.weight.shape):
            raise ValueError(f"{name!r}: the codebook tensor is {list(ct.shape)}, the model's weight "
                             f"{list(module.weight.shape)}")
        if isinstance(module, nn.Linear):
            new = CodebookLinear(ct, module.bias)
        elif isinstance(module, nn.Embedding):
            new = CodebookEmbedding(ct, padding_idx=module.padding_idx, dtype=module.weight.dtype)
        else:
            raise ValueError(f"{name!r}: {path} is {type(module).__name__}, not an nn.Linear or nn.Embedding")
        new.to(module.weight.device)
        _set_module(model, path, new)
        swapped[path] = new
    with torch.no_grad():
        for name, value in passthrough.items():
            pname = _resolve(model, name, params)
            if pname is None:
                continue  # tensors the model does not hold (e.g. tied weights saved twice)
            target = params[pname]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{name!r}: the folder holds {list(value.shape)}, the model {list(target.shape)}")
            target.copy_(value.to(target.dtype))
    if fold_permutation:
        _fold(model, fold_pairs(model) if pairs is None else list(pairs))
    return swapped


def _fold(model: nn.Module, pairs: Sequence[Tuple[str, str]]) -> None:
    for producer, consumer in pairs:
        p = model.get_submodule(producer)
        c = model.get_submodule(consumer)
        if not isinstance(p, CodebookLinear) or p.perm is None or p.permuted_output:
            continue
        if isinstance(c, nn.Linear):
            with torch.no_grad():
                c.weight.data = c.weight.data.index_select(1, p.perm.to(c.weight.device)).contiguous()
        elif isinstance(c, CodebookLinear) and c.vector_dim == 1:
            c.fold_into_columns(p.perm)
        else:
            continue  # vector codes (or another module): keep the gather
        p.permuted_output = True
