"""The registry of merge methods: one object per method, with named fields
(``MergeMethod``: name, reference, declared parameters with mergekit's
defaults, base policy, input counts), one module per method family as
mergekit has:

- ``generalized``: linear, task_arithmetic, ties, dare_*, breadcrumbs*,
  run by the Rust core (``GeneralizedTaskArithmetic``, ``in_core``);
- ``slerp``: slerp, nuslerp, multislerp; ``karcher``; ``nearswap``;
  ``model_stock``; ``della`` (della, della_linear); ``sce``; ``passthrough``
  (with ``slices``): per-tensor torch functions (``TensorMethod``).

The CLI, the config loader and the docs all read ``METHODS``. A new method
is a ``TensorMethod`` (its kernel, its ``Param``s, its base policy and input
counts) passed to ``register``.
"""

from typing import Dict

from . import della, generalized, karcher, model_stock, nearswap, passthrough, sce, slerp
from .base import REQUIRED, Inputs, MergeMethod, Param, TensorMethod  # noqa: F401
from .generalized import MODEL_DEFAULTS, GeneralizedTaskArithmetic  # noqa: F401

METHODS: Dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Adds a method to ``METHODS`` (a name is registered once)."""
    if not isinstance(method, MergeMethod):
        raise TypeError(f"method: expected a MergeMethod, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"method: {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _family in (generalized, slerp, karcher, nearswap, model_stock, della, sce, passthrough):
    for _m in _family.METHODS:
        register(_m)

#: The methods of generalized task arithmetic (run by the Rust core).
GENERALIZED: Dict[str, GeneralizedTaskArithmetic] = {n: m for n, m in METHODS.items() if m.in_core}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"merge_method: unknown method {name!r}; ferrox supports {sorted(METHODS)}") from None
