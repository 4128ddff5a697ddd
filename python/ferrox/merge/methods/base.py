"""What every merge method declares: its parameters (with mergekit's defaults
and ferrox's ranges), how a base model takes part, and how many inputs it
merges. ``config.py`` validates a YAML config from these declarations alone;
``checkpoints.py`` and ``tensor.py`` run a method through ``merge``.

Methods of generalized task arithmetic run in the Rust core (``in_core``);
every other method is a per-tensor torch function (``TensorMethod``): its
inputs come cast to float32, its result is float32 and the caller casts it
to the output dtype. A ``TensorMethod`` may also name a fused version in the
Rust core (``native``: slerp, model_stock), which a streamed CPU checkpoint
merge runs from the files in the inputs' own dtype into the output dtype; the
torch function stays the reference it is tested against. No torch import here: a streamed CPU merge
by the core never loads it.
"""

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

F32_MAX = 3.4028234663852886e38


class _Required:
    def __repr__(self):
        return "REQUIRED"


#: A parameter without a default: the config must set it.
REQUIRED = _Required()

#: How a method's base model takes part. "origin": task vectors are taken
#: from it and it is not one of the inputs (GTA with a base). "input": an
#: ordinary input (linear, karcher; mergekit's BasePolicy.IGNORED).
#: "required"/"optional": an input the method treats as the base.
BASE_POLICIES = ("origin", "input", "required", "optional")


def _f32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: what the core's sum would be
        return math.copysign(math.inf, x)


def _f32_sum(values) -> float:
    """A sum as the Rust core and torch fold it (float32, in order)."""
    total = 0.0
    for v in values:
        total = _f32(total + _f32(v))
    return total


def first_nonfinite(x) -> Optional[int]:
    """The flat index of the first NaN or ±inf of a float tensor, or None:
    the Rust core's scan (exponent bits, no conversion) for CPU tensors,
    torch's ``isfinite`` elsewhere."""
    if x.device.type == "cpu" and str(x.dtype) in _NATIVE_DTYPES:
        from ... import _core

        return _core.first_nonfinite(x)
    import torch

    bad = ~torch.isfinite(x)
    return int(bad.reshape(-1).nonzero()[0]) if bool(bad.any()) else None


#: torch dtypes the Rust core reads and writes
_NATIVE_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


def _kind(value) -> str:
    return "a string" if isinstance(value, str) else type(value).__name__


def check_number(where: str, key: str, value) -> float:
    """A finite real number (YAML int or float; not a bool or a string) within float32's range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {value!r} ({_kind(value)})")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    if abs(v) > F32_MAX:  # the merge computes in float32: this would be inf there
        raise ValueError(f"{where}: {key} must be a finite number within float32's range, got {value!r}")
    return v


def check_flag(where: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r} ({_kind(value)})")
    return value


def check_integer(where: str, key: str, value, lo: int, hi: int) -> int:
    """An integer in [lo, hi) (a YAML int, not a bool or a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an integer, got {value!r} ({_kind(value)})")
    if not lo <= value < hi:
        upper = "2**64" if hi == 2**64 else str(hi)
        raise ValueError(f"{where}: {key} must be in [{lo}, {upper}), got {value}")
    return value


def check_choice(where: str, key: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{where}: {key} must be one of {sorted(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Param:
    """One declared parameter. ``per_model`` ones are set per input model (or
    globally for all of them); the others once, under the top-level
    ``parameters``. Bounds are inclusive and ferrox's: mergekit checks only
    types, and a value outside them has no meaning for the method."""

    name: str
    kind: str  # "number", "fraction", "flag", "integer", "choice"
    default: Any = REQUIRED
    per_model: bool = False
    lo: Optional[float] = None
    hi: Optional[float] = None
    choices: Tuple[str, ...] = ()
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, where: str, value):
        """The value, checked; a ``ValueError`` naming ``where`` and the parameter otherwise."""
        key = self.name
        if self.kind == "flag":
            return check_flag(where, key, value)
        if self.kind == "choice":
            return check_choice(where, key, value, self.choices)
        if self.kind == "integer":
            lo = 0 if self.lo is None else int(self.lo)
            hi = 2**64 if self.hi is None else int(self.hi) + 1
            return check_integer(where, key, value, lo, hi)
        v = check_number(where, key, value)
        if self.kind == "fraction":
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{where}: {key} must be a fraction in [0, 1], got {value!r}")
            return v
        if self.lo is not None and v < self.lo or self.hi is not None and v > self.hi:
            lo = "-inf" if self.lo is None else f"{self.lo:g}"
            hi = "inf" if self.hi is None else f"{self.hi:g}"
            raise ValueError(f"{where}: {key} must be in [{lo}, {hi}], got {value!r}")
        return v


class MergeMethod:
    """A merge method: a name, a reference, declared parameters, a base
    policy and input counts. Subclasses: ``GeneralizedTaskArithmetic`` (run by
    the Rust core) and ``TensorMethod`` (a torch function per tensor)."""

    name: str
    reference: str
    #: run by the Rust core (generalized task arithmetic)
    in_core: bool = False

    @property
    def params(self) -> Tuple[Param, ...]:
        raise NotImplementedError

    @property
    def base_policy(self) -> str:
        raise NotImplementedError

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)

    @property
    def global_params(self) -> Tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    def check_inputs(self, n_inputs: int, has_base: bool) -> None:
        """Raises ``ValueError`` when the method cannot merge this many inputs."""

    def check_params(self, shared: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]) -> None:
        """Cross-parameter checks once every value is resolved (``ValueError``)."""

    def defaults(self) -> Dict[str, Any]:
        return {p.name: p.default for p in self.global_params if not p.required}


@dataclass(frozen=True)
class Inputs:
    """One tensor's inputs as a method sees them: float32 tensors in
    mergekit's model order, which of them is the base, and the per-model
    parameters of the others (one dict per non-base input, in order)."""

    tensors: Tuple[Any, ...]
    base_index: Optional[int]
    per_model: Tuple[Mapping[str, Any], ...] = ()
    #: the output tensor's name (seeds the random masks of della)
    tensor_name: str = ""
    #: a run-wide torch.Generator (della's ``rng: mergekit``), else None
    generator: Any = None

    @property
    def base(self):
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def non_base(self) -> List[Any]:
        return [t for i, t in enumerate(self.tensors) if i != self.base_index]

    def values(self, name: str) -> List[Any]:
        """One per-model parameter of every non-base input, in order."""
        return [p[name] for p in self.per_model]


@dataclass(frozen=True)
class TensorMethod(MergeMethod):
    """A method computed per tensor in torch, in float32 (mergekit computes
    these in the inputs' dtype; ferrox casts the inputs as mergekit does and
    then computes in float32, which in a float32 merge is mergekit's
    arithmetic exactly). ``kernel(inputs: Inputs, **shared) -> Tensor``."""

    name: str
    reference: str
    kernel: Callable = field(repr=False)
    declared: Tuple[Param, ...] = ()
    base: str = "optional"
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    min_non_base: int = 0
    max_non_base: Optional[int] = None
    #: what the inputs are, for messages ("base_model and one other model")
    shape_of_inputs: str = ""
    #: cross-parameter check ``check(shared, per_model)``; raises ValueError
    extra_check: Optional[Callable] = field(default=None, repr=False)
    #: the Rust core's fused version of ``kernel`` (methods with a required
    #: base): ``native(shape, **shared) -> dict``, the keyword arguments of
    #: ``_core.interp_tensor`` / ``interp_tensor_files`` (method, t, row_len, ...)
    native: Optional[Callable] = field(default=None, repr=False)

    def __post_init__(self):
        if self.base not in BASE_POLICIES[1:]:
            raise ValueError(f"base: expected one of {BASE_POLICIES[1:]}, got {self.base!r}")

    @property
    def params(self) -> Tuple[Param, ...]:
        return self.declared

    @property
    def base_policy(self) -> str:
        return self.base

    @property
    def needs_base(self) -> bool:
        """The config must name a base_model."""
        return self.base == "required"

    @property
    def model_params(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.params if p.per_model)

    def check_inputs(self, n_inputs: int, has_base: bool) -> None:
        has_base = has_base and self.base != "input"
        if self.base == "required" and not has_base:
            raise ValueError(f"merge_method {self.name!r} needs base_model")
        non_base = n_inputs - int(has_base)
        for what, n, lo, hi in (("inputs", n_inputs, self.min_inputs, self.max_inputs),
                                ("models besides the base model", non_base, self.min_non_base, self.max_non_base)):
            if n < lo or (hi is not None and n > hi):
                want = f"exactly {lo}" if lo == hi else f"at least {lo}" if n < lo else f"at most {hi}"
                hint = f" ({self.shape_of_inputs})" if self.shape_of_inputs else ""
                raise ValueError(f"merge_method {self.name!r} merges {want} {what}{hint}, got {n}")

    def check_params(self, shared, per_model) -> None:
        if self.extra_check is not None:
            self.extra_check(shared, per_model)

    def resolve(self, shared: Optional[Mapping[str, Any]] = None, where: str = "parameters") -> Dict[str, Any]:
        """Shared parameters checked, defaults filled in; unknown names refused."""
        shared = dict(shared or {})
        known = {p.name: p for p in self.global_params}
        for key in shared:
            if key not in known:
                raise ValueError(f"{where}: unknown parameter {key!r} for {self.name} (known: {sorted(known)})")
        out = {}
        for p in self.global_params:
            if p.name in shared and shared[p.name] is not None:
                out[p.name] = p.check(where, shared[p.name])
            elif p.required:
                raise ValueError(f"{where}: parameter {p.name!r} is required for {self.name}")
            else:
                out[p.name] = p.default
        return out

    def resolve_model(self, values: Mapping[str, Any], where: str) -> Dict[str, Any]:
        """One non-base input's per-model parameters, checked, defaults filled in."""
        out = {}
        for p in self.params:
            if not p.per_model:
                continue
            if p.name in values and values[p.name] is not None:
                out[p.name] = p.check(where, values[p.name])
            elif p.required:
                raise ValueError(f"{where}: parameter {p.name!r} is required for {self.name}")
            else:
                out[p.name] = p.default
        return out

    def native_args(self, shape, shared: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The core's arguments for one tensor of ``shape`` (``shared``
        resolved), or None when the method has no fused version."""
        if self.native is None or self.base != "required":
            return None
        return self.native(tuple(shape), **shared)

    def merge(self, tensors: Sequence[Any], base_index: Optional[int] = None, shared=None,
              per_model: Optional[Sequence[Mapping[str, Any]]] = None, tensor_name: str = "", generator=None,
              out_dtype=None):
        """One tensor's merge: ``tensors`` in mergekit's model order (any float
        dtype; cast to float32 for the torch kernel), ``base_index`` the base's
        position, ``shared``/``per_model`` resolved parameters (checked again
        here). Returns a tensor of the inputs' shape in ``out_dtype`` (float32
        when None): the torch kernel's f32 result rounded once. (The fused
        core version, ``native``, serves streamed CPU checkpoint merges; this
        stays the reference, bitwise mergekit's in float32.)"""
        import torch

        tensors = list(tensors)
        if self.base == "input":
            base_index = None
        self.check_inputs(len(tensors), base_index is not None)
        shape = tensors[0].shape
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise ValueError(f"tensors[{i}]: {self.name} merges float tensors, got {t.dtype}")
            if t.shape != shape:
                raise ValueError(f"tensors[{i}]: shape {list(t.shape)} differs from tensors[0]'s {list(shape)}")
        shared = self.resolve(shared)
        n_other = len(tensors) - int(base_index is not None)
        per_model = list(per_model) if per_model is not None else [{} for _ in range(n_other)]
        if len(per_model) != n_other:
            raise ValueError(f"per_model: expected {n_other} entries (one per model besides the base), "
                             f"got {len(per_model)}")
        per_model = [self.resolve_model(v, f"models[{i}]") for i, v in enumerate(per_model)]
        self.check_params(shared, per_model)
        out_dtype = torch.float32 if out_dtype is None else out_dtype
        f32 = tuple(t.to(torch.float32) for t in tensors)
        out = self.kernel(Inputs(f32, base_index, tuple(per_model), tensor_name, generator), **shared)
        return out.to(torch.float32).reshape(shape).to(out_dtype)
