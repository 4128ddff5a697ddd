"""mergekit's parameter settings, resolved per tensor: a scalar; a gradient
list (``t: [0, 0.5, 1]``) interpolated over a model's layers; or filters
(``- filter: self_attn`` / ``value: 0.3``, a last ``- value: 0.5`` as the
fallback), whose values may themselves be gradients.

The rules are mergekit 0.1.5's (``config.evaluate_setting``, ``plan.py``):

- layer ``i`` of ``n`` has ``t = i / (n - 1)`` (``t = 1`` when ``n == 1``);
  tensors outside the layers (embeddings, final norm, lm_head) have
  ``t = 0``. With ``slices``, ``i``/``n`` count within the slice.
- a numeric gradient of ``k`` values at ``t``: ``s = t (k - 1)``,
  ``i0 = floor(s)``, ``i1 = min(k - 1, i0 + 1)``, value
  ``(1 - f) v[i0] + f v[i1]`` with ``f = s - i0`` (in double precision);
  flags and choices take ``v[floor(t (k - 1))]``.
- filters are tried in order; one matches when it is absent, ``"*"``, or a
  substring of the tensor's name (for a per-model parameter, the name of
  that model's input tensor). No match: the next scope's setting is used
  (the model's own parameters, then the global ones, then the default).
"""

import re
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .methods.base import Param, _kind

#: A transformer layer's tensors (``model.layers.3.mlp...``): the index is the group.
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

CONDITION_KEYS = {"filter", "value"}


def layer_index(tensor_name: str) -> Optional[int]:
    m = LAYER_RE.search(tensor_name)
    return None if m is None else int(m.group(1))


def layer_t(index: int, n_layers: int) -> float:
    """mergekit's gradient position of layer ``index`` among ``n_layers``."""
    return index / (n_layers - 1) if n_layers > 1 else 1.0


@dataclass(frozen=True)
class Setting:
    """One parameter's setting: ``kind`` "const" (``value`` the checked
    scalar), "gradient" (``value`` a tuple of checked scalars) or "filters"
    (``value`` a tuple of ``(filter or None, Setting)``)."""

    kind: str
    value: Any
    param: Param

    @property
    def constant(self) -> bool:
        return self.kind == "const"

    @property
    def varies_with_t(self) -> bool:
        if self.kind == "gradient":
            return len(self.value) > 1
        if self.kind == "filters":
            return any(s.varies_with_t for _, s in self.value)
        return False

    def evaluate(self, tensor_name: str, t: float):
        """The value for one tensor, or None when no filter matches."""
        if self.kind == "const":
            return self.value
        if self.kind == "gradient":
            return _interpolate(self.param, self.value, t)
        for flt, setting in self.value:
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return setting.evaluate(tensor_name, t)
        return None

    def raw(self):
        """The setting as YAML would write it (provenance)."""
        if self.kind == "const":
            return self.value
        if self.kind == "gradient":
            return list(self.value)
        return [{**({"filter": f} if f is not None else {}), "value": s.raw()} for f, s in self.value]


def _interpolate(param: Param, values: Tuple, t: float):
    k = len(values)
    if param.kind not in ("number", "fraction"):
        return values[int(t * (k - 1))]
    scaled = t * (k - 1)
    i0 = int(scaled)
    i1 = min(k - 1, i0 + 1)
    frac = scaled - i0
    v = (1 - frac) * values[i0] + frac * values[i1]
    if param.kind == "fraction":  # a convex combination of fractions, but rounding may step past 1
        v = min(1.0, max(0.0, v))
    return v


def parse_setting(where: str, key: str, raw, param: Param, in_filter: bool = False) -> Setting:
    """A checked setting; ``ValueError`` naming ``where`` and ``key`` when malformed."""
    if isinstance(raw, dict):
        raw = [raw]
        is_conditions = True
    else:
        is_conditions = isinstance(raw, list) and any(isinstance(e, dict) for e in raw)
    if is_conditions:
        if in_filter:
            raise ValueError(f"{where}: {key}: a filter's value must be a scalar or a gradient list, "
                             f"not another filter")
        out = []
        for j, cond in enumerate(raw):
            at = f"{where}: {key}[{j}]"
            if not isinstance(cond, dict):
                raise ValueError(f"{at}: expected a mapping with 'value' (and 'filter'), got {cond!r} "
                                 f"({_kind(cond)}); a filter list holds only such mappings")
            unknown = set(cond) - CONDITION_KEYS
            if unknown:
                raise ValueError(f"{at}: unknown key {sorted(unknown, key=str)[0]!r} (a filter entry has "
                                 f"'filter' and 'value')")
            if "value" not in cond:
                raise ValueError(f"{at}: a filter entry needs a 'value'")
            flt = cond.get("filter")
            if flt is not None and (not isinstance(flt, str) or not flt):
                raise ValueError(f"{at}: filter must be a non-empty string (a substring of tensor names), "
                                 f"got {flt!r}")
            out.append((flt, parse_setting(where, f"{key}[{j}].value", cond["value"], param, in_filter=True)))
        return Setting("filters", tuple(out), param)
    if isinstance(raw, list):
        if not raw:
            raise ValueError(f"{where}: {key}: an empty gradient list has no value")
        if param.kind == "integer":
            raise ValueError(f"{where}: {key} is an integer; a gradient list would interpolate it to "
                             f"non-integers (give one value, or filters)")
        values = []
        for j, v in enumerate(raw):
            if isinstance(v, list):
                raise ValueError(f"{where}: {key}[{j}]: a gradient list holds scalars, got a nested list")
            values.append(param.check(where, v) if not isinstance(v, (list, dict)) else v)
        return Setting("gradient", tuple(values), param)
    return Setting("const", param.check(where, raw), param)
