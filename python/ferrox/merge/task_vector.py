"""Task vectors (Ilharco et al., ICLR'23): τ = θ_finetuned − θ_base, with the
arithmetic the paper uses — addition (multi-task), negation (forgetting),
scaling, analogies τ_c + (τ_b − τ_a) — and cosine similarity per tensor and
overall. Deltas are kept in float32 so sums of several vectors do not
accumulate bf16 rounding."""

import math
from typing import Dict, Mapping, Optional

import torch


class TaskVector:
    def __init__(self, deltas: Mapping[str, torch.Tensor]):
        self.deltas: Dict[str, torch.Tensor] = {k: v.float() for k, v in deltas.items()}

    @classmethod
    def from_state_dicts(cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> "TaskVector":
        missing = sorted(set(base) ^ set(finetuned))
        if missing:
            raise ValueError(f"tensor {missing[0]!r} is in only one of the two models")
        out = {}
        for k, b in base.items():
            f = finetuned[k]
            if f.shape != b.shape:
                raise ValueError(f"tensor {k!r}: shape {list(f.shape)} does not match base {list(b.shape)}")
            if b.is_floating_point():
                out[k] = f.float() - b.float()
        return cls(out)

    @classmethod
    def from_checkpoints(cls, base_path, finetuned_path) -> "TaskVector":
        from .checkpoints import load_state_dict

        return cls.from_state_dicts(load_state_dict(base_path), load_state_dict(finetuned_path))

    def _check(self, other: "TaskVector"):
        if self.deltas.keys() != other.deltas.keys():
            diff = sorted(self.deltas.keys() ^ other.deltas.keys())
            raise ValueError(f"task vectors differ in tensors, e.g. {diff[0]!r}")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        self._check(other)
        return TaskVector({k: v + other.deltas[k] for k, v in self.deltas.items()})

    def __radd__(self, other):
        return self if other == 0 else self.__add__(other)  # so sum([...]) works

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self + (-other)

    def __neg__(self) -> "TaskVector":
        return TaskVector({k: -v for k, v in self.deltas.items()})

    def __mul__(self, scale: float) -> "TaskVector":
        return TaskVector({k: v * float(scale) for k, v in self.deltas.items()})

    __rmul__ = __mul__

    @staticmethod
    def analogy(a: "TaskVector", b: "TaskVector", c: "TaskVector") -> "TaskVector":
        """τ_c + (τ_b − τ_a): "a is to b as c is to ?"."""
        return c + (b - a)

    def cosine(self, other: "TaskVector") -> float:
        """Cosine similarity of the two vectors over all tensors."""
        self._check(other)
        dot = sum(float((v.double() * other.deltas[k].double()).sum()) for k, v in self.deltas.items())
        na = math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.deltas.values()))
        nb = math.sqrt(sum(float(v.double().pow(2).sum()) for v in other.deltas.values()))
        return dot / (na * nb) if na and nb else 0.0

    def cosine_per_tensor(self, other: "TaskVector") -> Dict[str, float]:
        self._check(other)
        out = {}
        for k, v in self.deltas.items():
            w = other.deltas[k]
            den = float(v.double().norm() * w.double().norm())
            out[k] = float((v.double() * w.double()).sum()) / den if den else 0.0
        return out

    def sparsify(self, kind: str, **kwargs) -> "TaskVector":
        """Every tensor sparsified by ``ferrox.merge.sparsify`` (``kind``
        "magnitude", "band" or "random"; ``density``, ``gamma``,
        ``granularity``, ``rescale``, ``seed`` as there). DARE masks are
        keyed by the tensor's name, so they do not depend on tensor order."""
        from .tensor import sparsify

        return TaskVector({k: sparsify(v, kind, tensor_name=k, **kwargs) for k, v in self.deltas.items()})

    def apply_to(self, base: Mapping[str, torch.Tensor], scale: float = 1.0) -> Dict[str, torch.Tensor]:
        """θ = θ_base + scale·τ, in each base tensor's dtype."""
        out = {}
        for k, b in base.items():
            d: Optional[torch.Tensor] = self.deltas.get(k)
            out[k] = b if d is None else (b.float() + float(scale) * d).to(b.dtype)
        return out
