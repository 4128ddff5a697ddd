"""Curvature-aware and memory-light optimizers, drop-in ``torch.optim``
subclasses whose elementwise state updates run in the Rust/CUDA core.

All share ``ferrox.optim._base.Optimizer``: tensor-only ``state_dict`` (loads
with ``torch.load(weights_only=True)``) for bit-exact resume, ``stats``
counters, ``nonfinite="skip"|"raise"`` handling of NaN/Inf gradients and
``ValueError`` naming a bad hyperparameter. The Hessian-based ones
(``SophiaH``, ``AdaHessian``) share one calling convention: ``step(closure)``
with a closure that zeroes grads, computes the loss and calls
``loss.backward(create_graph=True)``. Names are imported on first use.
"""

from .._lazy import exports

_WHERE = {
    "Optimizer": "_base",
    "MKOR": "mkor",
    "SophiaH": "sophia", "SophiaG": "sophia",
    "AdaHessian": "adahessian",
    "MeZO": "mezo", "MeZOLog": "mezo",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
