"""Weight matching: align the hidden units of two models that do not share an
initialisation before merging them (Git Re-Basin, Ainsworth, Hayase &
Srinivasa 2022, https://arxiv.org/abs/2209.04836; analysed in "Analysis of
Linear Mode Connectivity via Permutation-Based Weight Matching").

Hidden units of an MLP can be permuted without changing its function: the
rows of W_l (and entries of b_l) and the columns of W_{l+1} move together.
Weight matching looks for the permutations that bring model B closest to
model A, maximising Σ_l ⟨W_l^A, P_l W_l^B P_{l-1}^T⟩ by coordinate descent:
with every other permutation fixed, choosing one is a linear assignment
problem (solved exactly with SciPy's ``linear_sum_assignment``); sweeps
repeat until no permutation changes.

A ``PermutationSpec`` says which axes of which tensors each permutation
moves, so layouts other than a plain chain (a transformer block's
``up_proj``/``down_proj``, LayerNorm parameters) are one dict away::

    spec = mlp_spec([("0.weight", "0.bias"), ("2.weight", "2.bias"), ("4.weight", "4.bias")])
    perms = weight_matching(model_a.state_dict(), model_b.state_dict(), spec)
    b_aligned = apply_permutation(model_b.state_dict(), spec, perms)
    # then average / task arithmetic with ferrox.merge as usual
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class PermutationSpec:
    """``axes[perm]``: the (tensor name, axis) pairs that permutation moves."""

    axes: Mapping[str, Sequence[Tuple[str, int]]]

    def tensors(self) -> Dict[str, List[Tuple[str, int]]]:
        """Per tensor, the (permutation, axis) pairs that move it."""
        by_tensor: Dict[str, List[Tuple[str, int]]] = {}
        for perm, pairs in self.axes.items():
            for name, axis in pairs:
                by_tensor.setdefault(name, []).append((perm, axis))
        return by_tensor


def mlp_spec(layers: Sequence[Tuple[str, str]]) -> PermutationSpec:
    """The spec of a chain of Linear layers given as (weight, bias) names in
    order (bias may be None): hidden layer l's units are the rows of W_l and
    b_l and the columns of W_{l+1}; the input and output units stay put."""
    if len(layers) < 2:
        raise ValueError(f"layers: expected at least 2 Linear layers (one hidden layer), got {len(layers)}")
    axes = {}
    for l, ((w, b), (w_next, _)) in enumerate(zip(layers, layers[1:])):
        pairs = [(w, 0)] + ([(b, 0)] if b else []) + [(w_next, 1)]
        axes[f"hidden{l}"] = pairs
    return PermutationSpec(axes)


def _check(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: PermutationSpec) -> Dict[str, int]:
    """Sizes of every permutation, after checking both models agree."""
    sizes: Dict[str, int] = {}
    for perm, pairs in spec.axes.items():
        if not pairs:
            raise ValueError(f"spec: permutation {perm!r} moves no tensor")
        for name, axis in pairs:
            for which, sd in (("reference", a), ("other", b)):
                if name not in sd:
                    raise ValueError(f"{which}: tensor {name!r} (permutation {perm!r}) is missing")
            ta, tb = a[name], b[name]
            if ta.shape != tb.shape:
                raise ValueError(f"tensor {name!r}: shape {list(ta.shape)} in the reference but {list(tb.shape)} in the other model")
            if ta.dtype not in FLOATS or tb.dtype not in FLOATS:
                raise ValueError(f"tensor {name!r}: expected a float tensor, got {ta.dtype} and {tb.dtype}")
            if not -ta.dim() <= axis < ta.dim():
                raise ValueError(f"tensor {name!r}: axis {axis} out of range for shape {list(ta.shape)}")
            size = ta.shape[axis]
            if sizes.setdefault(perm, size) != size:
                raise ValueError(f"permutation {perm!r}: tensor {name!r} axis {axis} has {size} units, "
                                 f"but {sizes[perm]} elsewhere")
    return sizes


def _permuted(t: torch.Tensor, moves: Sequence[Tuple[str, int]], perms: Mapping[str, torch.Tensor],
              skip: str = "") -> torch.Tensor:
    for perm, axis in moves:
        if perm != skip:
            t = torch.index_select(t, axis, perms[perm])
    return t


def weight_matching(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], spec: PermutationSpec,
                    max_iter: int = 100, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Permutations (perm name -> index tensor) that align ``other`` to
    ``reference``: ``apply_permutation(other, spec, perms)`` is then as close
    to ``reference`` as coordinate descent finds (exactly equal when
    ``other`` is a hidden-unit permutation of ``reference``)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("weight_matching needs SciPy: pip install 'ferrox[align]'") from None

    if max_iter < 1:
        raise ValueError(f"max_iter: expected a positive integer, got {max_iter}")
    sizes = _check(reference, other, spec)
    moves = spec.tensors()
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    names = sorted(sizes)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for perm in rng.permutation(names):
            n = sizes[perm]
            gain = torch.zeros(n, n, dtype=torch.float64)
            for name, axis in spec.axes[perm]:
                a = reference[name].double().movedim(axis, 0).reshape(n, -1)
                b = _permuted(other[name].double(), moves[name], perms, skip=perm).movedim(axis, 0).reshape(n, -1)
                gain += a @ b.T
            _, cols = linear_sum_assignment(gain.numpy(), maximize=True)
            new = torch.from_numpy(cols).long()
            # Accept only a strict improvement, so ties cannot make it cycle.
            old_score = gain[torch.arange(n), perms[perm]].sum()
            new_score = gain[torch.arange(n), new].sum()
            if new_score > old_score + 1e-12 * max(1.0, float(old_score.abs())):
                perms[perm] = new
                changed = True
        if not changed:
            break
    return perms


def apply_permutation(state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec,
                      perms: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A new state dict with every tensor of the spec permuted; others (and
    dtypes) unchanged."""
    moves = spec.tensors()
    missing = set(spec.axes) - set(perms)
    if missing:
        raise ValueError(f"perms: no permutation for {sorted(missing)}")
    out = {}
    for name, t in state_dict.items():
        if name in moves:
            for perm, axis in moves[name]:
                p = perms[perm]
                if p.numel() != t.shape[axis] or not torch.equal(torch.sort(p).values, torch.arange(p.numel())):
                    raise ValueError(f"perms[{perm!r}]: expected a permutation of {t.shape[axis]} indices "
                                     f"(tensor {name!r} axis {axis}), got {p.numel()} values")
            out[name] = _permuted(t, moves[name], perms)
        else:
            out[name] = t
    return out


def invert(perms: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse permutations (undo ``apply_permutation``)."""
    return {k: torch.argsort(p) for k, p in perms.items()}
