"""Weight matching: align the hidden units of two models that do not share an
initialisation, so that merging them averages matching units instead of
unrelated ones.

Permuting the hidden units of an MLP layer leaves the function unchanged if
the rows of W_l, the entries of b_l and the columns of W_{l+1} are permuted
together. Two independently trained networks usually differ by such a
relabelling (plus noise), and averaging them without undoing it lands in a
high-loss region. Weight matching (Git Re-Basin: Ainsworth, Hayase &
Srinivasa 2022, https://arxiv.org/abs/2209.04836) picks the permutations of
model B that bring it closest to model A, maximising

    Σ_l ⟨W_l^A, P_l W_l^B P_{l-1}^T⟩_F   (+ the bias terms)

by coordinate descent: with every other permutation fixed the objective is
linear in one P_l, a linear assignment problem solved exactly by SciPy's
``linear_sum_assignment``. Permutations are visited in a seeded random order
and sweeps repeat until none improves (a fixed point). "Analysis of Linear
Mode Connectivity via Permutation-Based Weight Matching" (Ito, Yamada &
Kumagai 2024, https://arxiv.org/abs/2402.04051) shows why it works:
permutations leave singular values unchanged and weight matching mainly
aligns the singular vectors of the largest singular values.

A ``PermutationSpec`` maps each permutation to the (tensor name, axis) pairs
it moves. ``mlp_spec`` builds it for a chain of Linear layers; other layouts
are one dict, e.g. a transformer MLP block whose hidden units are the rows of
``gate_proj``/``up_proj`` and the columns of ``down_proj``::

    PermutationSpec({f"layers.{i}.mlp": [(f"layers.{i}.mlp.gate_proj.weight", 0),
                                         (f"layers.{i}.mlp.up_proj.weight", 0),
                                         (f"layers.{i}.mlp.down_proj.weight", 1)]
                     for i in range(n_layers)})

Use it before any ``ferrox.merge`` method (average, task arithmetic, TIES):

    spec = mlp_spec(model_a.state_dict())        # or a list of (weight, bias) names
    perms = weight_matching(model_a.state_dict(), model_b.state_dict(), spec)
    b_aligned = apply_permutation(model_b.state_dict(), spec, perms)
    merged = {k: (v + b_aligned[k]) / 2 for k, v in model_a.state_dict().items()}

Only SciPy is needed beyond torch (``pip install 'ferrox[align]'``).
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import dtypes

StateDict = Mapping[str, torch.Tensor]
Perms = Mapping[str, torch.Tensor]
_FLOAT_DTYPES = tuple(dtypes.to_torch(d.name) for d in dtypes.DTYPES.values() if d.is_float)  # F64 too: no kernel
# nn.Sequential names its children 0, 1, 2, ...; activations own no tensors.
_SEQUENTIAL_KEY = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class PermutationSpec:
    """``axes[perm]``: the (tensor name, axis) pairs that permutation ``perm``
    reorders. Every pair of one permutation must have the same size."""

    axes: Mapping[str, Sequence[Tuple[str, int]]]

    def __post_init__(self):
        if not isinstance(self.axes, Mapping):
            raise ValueError(f"axes: expected a dict perm name -> [(tensor name, axis)], got {type(self.axes).__name__}")
        frozen = {perm: tuple(_checked_pair(perm, pair) for pair in pairs) for perm, pairs in self.axes.items()}
        empty = [perm for perm, pairs in frozen.items() if not pairs]
        if empty:
            raise ValueError(f"axes: permutation {empty[0]!r} moves no tensor axis")
        object.__setattr__(self, "axes", frozen)


def _checked_pair(perm: str, pair) -> Tuple[str, int]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and isinstance(pair[0], str) and isinstance(pair[1], int) and not isinstance(pair[1], bool)):
        raise ValueError(f"axes[{perm!r}]: expected (tensor name, axis) pairs, got {pair!r}")
    return pair[0], pair[1]


def mlp_spec(layers: Union[StateDict, Sequence[Tuple[str, Optional[str]]]]) -> PermutationSpec:
    """The spec of a chain of Linear layers: hidden layer l's units are the
    rows of W_l, the entries of b_l and the columns of W_{l+1}; the network's
    input and output units stay in place.

    ``layers`` is either the ordered (weight name, bias name or None) pairs,
    or an ``nn.Sequential`` state dict (``0.weight, 0.bias, 2.weight, ...``)
    holding nothing but Linear layers. Permutations are named ``hidden0``,
    ``hidden1``, ... from the input side."""
    pairs = _sequential_linear_layers(layers) if isinstance(layers, Mapping) else list(layers)
    if len(pairs) < 2:
        raise ValueError(f"layers: expected at least 2 Linear layers (one hidden layer), got {len(pairs)}")
    axes = {}
    for depth, ((weight, bias), (next_weight, _)) in enumerate(zip(pairs, pairs[1:])):
        bias_axes = [(bias, 0)] if bias is not None else []
        axes[f"hidden{depth}"] = [(weight, 0), *bias_axes, (next_weight, 1)]
    return PermutationSpec(axes)


def _sequential_linear_layers(state_dict: StateDict) -> List[Tuple[str, Optional[str]]]:
    """(weight, bias) names of an nn.Sequential of Linear layers, in order."""
    layers: Dict[int, Dict[str, str]] = {}
    prefixes = set()
    for name, tensor in state_dict.items():
        match = _SEQUENTIAL_KEY.match(name)
        # Anything else (a LayerNorm's 1-D weight, BatchNorm buffers) would
        # need permuting too; a silent skip would break the aligned model.
        if match is None or (match["kind"] == "weight" and tensor.dim() != 2):
            raise ValueError(f"layers: tensor {name!r} (shape {list(tensor.shape)}) is not a Linear weight or bias "
                             "of an nn.Sequential; describe this layout with a PermutationSpec dict")
        prefixes.add(match["prefix"])
        layers.setdefault(int(match["index"]), {})[match["kind"]] = name
    if len(prefixes) > 1:
        raise ValueError(f"layers: expected one nn.Sequential, got name prefixes {sorted(prefixes)}")
    missing_weight = [names["bias"] for names in layers.values() if "weight" not in names]
    if missing_weight:
        raise ValueError(f"layers: bias {missing_weight[0]!r} has no matching weight")
    return [(layers[i]["weight"], layers[i].get("bias")) for i in sorted(layers)]


@dataclass(frozen=True)
class _Layout:
    """A spec resolved against one state dict's shapes."""

    moves: Dict[str, List[Tuple[str, int]]]  # tensor -> (perm, axis >= 0)
    pairs: Dict[str, List[Tuple[str, int]]]  # perm -> (tensor, axis >= 0)
    sizes: Dict[str, int]  # perm -> number of units


def _resolve(spec: PermutationSpec, state_dict: StateDict, argument: str) -> _Layout:
    moves: Dict[str, List[Tuple[str, int]]] = {}
    pairs: Dict[str, List[Tuple[str, int]]] = {}
    for perm, perm_pairs in spec.axes.items():
        for name, axis in perm_pairs:
            axis = _tensor_axis(state_dict, argument, perm, name, axis)
            clash = [other for other, other_axis in moves.get(name, []) if other_axis == axis]
            if clash:
                raise ValueError(f"spec: tensor {name!r} axis {axis} is moved by both {clash[0]!r} and {perm!r}")
            moves.setdefault(name, []).append((perm, axis))
            pairs.setdefault(perm, []).append((name, axis))
    return _Layout(moves, pairs, {perm: _perm_size(perm, p, state_dict) for perm, p in pairs.items()})


def _tensor_axis(state_dict: StateDict, argument: str, perm: str, name: str, axis: int) -> int:
    """``axis`` of tensor ``name`` made non-negative, after checking that tensor and axis exist."""
    if name not in state_dict:
        raise ValueError(f"{argument}: tensor {name!r} (moved by permutation {perm!r}) is missing")
    shape = list(state_dict[name].shape)
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"spec: permutation {perm!r} moves axis {axis} of tensor {name!r}, "
                         f"expected an axis in [{-len(shape)}, {len(shape)}) for shape {shape}")
    return axis % len(shape)


def _perm_size(perm: str, pairs: List[Tuple[str, int]], state_dict: StateDict) -> int:
    first_name, first_axis = pairs[0]
    size = state_dict[first_name].shape[first_axis]
    for name, axis in pairs[1:]:
        if state_dict[name].shape[axis] != size:
            raise ValueError(f"permutation {perm!r}: tensor {name!r} axis {axis} has size {state_dict[name].shape[axis]}, "
                             f"expected {size} like tensor {first_name!r} axis {first_axis}")
    return size


def _check_same_shapes(reference: StateDict, other: StateDict, layout: _Layout) -> None:
    for name in layout.moves:
        if name not in other:
            perm = layout.moves[name][0][0]
            raise ValueError(f"other_state_dict: tensor {name!r} (moved by permutation {perm!r}) is missing")
        ref_shape, other_shape = list(reference[name].shape), list(other[name].shape)
        if len(ref_shape) != len(other_shape):
            raise ValueError(f"tensor {name!r}: shape {other_shape} in other_state_dict, "
                             f"expected {ref_shape} as in reference_state_dict")
        for axis, (ref_size, other_size) in enumerate(zip(ref_shape, other_shape)):
            if ref_size != other_size:
                raise ValueError(f"tensor {name!r} axis {axis}: size {other_size} in other_state_dict, "
                                 f"expected {ref_size} as in reference_state_dict (shapes {other_shape} vs {ref_shape})")


def _as_float64(tensor: torch.Tensor, name: str, argument: str) -> torch.Tensor:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{argument}: tensor {name!r} has dtype {tensor.dtype}, expected a floating-point tensor")
    # float64 keeps the assignment scores exact enough that ties and real
    # improvements are told apart even for bf16 weights of wide layers.
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def _permute(tensor: torch.Tensor, moves: Sequence[Tuple[str, int]], perms: Perms, skip: str = "") -> torch.Tensor:
    for perm, axis in moves:
        if perm != skip:
            tensor = torch.index_select(tensor, axis, perms[perm].to(tensor.device))
    return tensor


def _similarity(perm: str, layout: _Layout, reference: StateDict, other: StateDict, perms: Perms) -> torch.Tensor:
    """S[i, j]: how well unit j of the other model matches unit i of the
    reference, summed over every axis ``perm`` moves, with all the other
    permutations already applied to the other model."""
    n = layout.sizes[perm]
    scores = torch.zeros(n, n, dtype=torch.float64)
    for name, axis in layout.pairs[perm]:
        units_ref = reference[name].movedim(axis, 0).reshape(n, -1)
        units_other = _permute(other[name], layout.moves[name], perms, skip=perm).movedim(axis, 0).reshape(n, -1)
        scores += units_ref @ units_other.T
    return scores


def _better_assignment(scores: torch.Tensor, current: torch.Tensor) -> Optional[torch.Tensor]:
    """The optimal assignment for ``scores``, or None if it is no better than ``current``."""
    from scipy.optimize import linear_sum_assignment

    _, best_cols = linear_sum_assignment(scores.numpy(), maximize=True)
    best = torch.from_numpy(best_cols).long()
    rows = torch.arange(len(best))
    gain = scores[rows, best].sum() - scores[rows, current].sum()
    # An equally good assignment is not progress (descent could cycle between
    # ties forever); the margin absorbs the rounding of the two sums.
    margin = 1e-12 * len(best) * scores.abs().max()
    return best if gain > margin else None


def weight_matching(reference_state_dict: StateDict, other_state_dict: StateDict,
                    spec: Union[PermutationSpec, Mapping[str, Sequence[Tuple[str, int]]]],
                    max_iter: int = 100, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Permutations (perm name -> int64 index tensor) aligning the other model
    to the reference: ``apply_permutation(other_state_dict, spec, perms)`` is
    the relabelling of the other model closest to the reference that
    coordinate descent finds, and equals the reference exactly when the other
    model is a hidden-unit permutation of it.

    Stops at a fixed point (a sweep over all permutations, in an order drawn
    from ``seed``, changes none) or after ``max_iter`` sweeps. The fixed point
    is a local optimum: with layers of only a few units a planted permutation
    can be missed, and another ``seed`` may score higher. Tensors may be
    float16, bfloat16, float32 or float64, on any device; scores are computed
    in float64 on the CPU."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise ImportError("weight_matching needs SciPy: pip install 'ferrox[align]'") from None
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected a positive integer, got {max_iter!r}")
    spec = spec if isinstance(spec, PermutationSpec) else PermutationSpec(spec)
    layout = _resolve(spec, reference_state_dict, "reference_state_dict")
    _check_same_shapes(reference_state_dict, other_state_dict, layout)
    reference = {name: _as_float64(reference_state_dict[name], name, "reference_state_dict") for name in layout.moves}
    other = {name: _as_float64(other_state_dict[name], name, "other_state_dict") for name in layout.moves}

    perms = {perm: torch.arange(size) for perm, size in layout.sizes.items()}
    movable = sorted(perm for perm, size in layout.sizes.items() if size > 1)  # one unit has one order
    order_rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        improved = False
        for perm in map(str, order_rng.permutation(movable)):
            better = _better_assignment(_similarity(perm, layout, reference, other, perms), perms[perm])
            if better is not None:
                perms[perm] = better
                improved = True
        if not improved:
            break
    return perms


def _check_perms(perms: Perms, sizes: Mapping[str, int]) -> None:
    missing, unknown = sorted(set(sizes) - set(perms)), sorted(set(perms) - set(sizes))
    if missing or unknown:
        raise ValueError(f"perms: expected exactly the spec's permutations {sorted(sizes)}, "
                         f"missing {missing}, unknown {unknown}")
    for perm, size in sizes.items():
        index = perms[perm]
        is_permutation = (isinstance(index, torch.Tensor) and index.dim() == 1 and not index.is_floating_point()
                          and index.numel() == size
                          and torch.equal(torch.sort(index.cpu().long()).values, torch.arange(size)))
        if not is_permutation:
            got = f"shape {list(index.shape)}, dtype {index.dtype}" if isinstance(index, torch.Tensor) else type(index).__name__
            raise ValueError(f"perms[{perm!r}]: expected a 1-D integer tensor holding each of 0..{size - 1} once, got {got}")


def apply_permutation(state_dict: StateDict, spec: Union[PermutationSpec, Mapping[str, Sequence[Tuple[str, int]]]],
                      perms: Perms) -> Dict[str, torch.Tensor]:
    """A new state dict whose spec tensors are permuted along their spec axes
    (``index_select``, so dtype and device are kept); every other tensor is
    passed through unchanged."""
    spec = spec if isinstance(spec, PermutationSpec) else PermutationSpec(spec)
    layout = _resolve(spec, state_dict, "state_dict")
    _check_perms(perms, layout.sizes)
    return {name: _permute(tensor, layout.moves.get(name, ()), perms) for name, tensor in state_dict.items()}


def invert_permutations(perms: Perms) -> Dict[str, torch.Tensor]:
    """The inverse permutations: applying them undoes ``apply_permutation(.., perms)``."""
    return {perm: torch.argsort(index) for perm, index in perms.items()}
