"""``karcher``: the Riemannian (Karcher) mean of the models' directions on
the unit hypersphere, by fixed-point iteration, scaled by their mean norm.
Every input counts equally (mergekit 0.1.5 has no weights here) and a base
model is one more input. Order of operations as mergekit's, so a float32
merge gives its bits."""

from .base import Param, TensorMethod


def karcher_mean(tensors, alphas, max_iter: int = 10, tol: float = 1e-5):
    """Weighted Karcher mean of float32 tensors (``alphas`` sum to 1)."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(tensors, norms)]
    keep = [i for i, n in enumerate(norms) if n.item() > tol]
    if not keep:
        return sum(x * 0 for x in tensors)  # all (near) zero: zero, NaNs of the inputs kept
    total = sum(alphas[i] for i in keep)
    a = [alphas[i] / total for i in keep]
    u = [units[i] for i in keep]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean)
    mean = u[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        # Log map of every direction at the mean, averaged: the step along the sphere.
        step = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            cos = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += ai * (theta / torch.sin(theta)) * (ui - cos * mean)
        step_norm = torch.linalg.vector_norm(step)
        if step_norm.item() < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        norm = torch.linalg.vector_norm(mean)
        if norm.item() > tol:
            mean = mean / norm
    return sum(ai * n for ai, n in zip(alphas, norms)) * mean


def _karcher_kernel(inputs, max_iter, tol):
    n = len(inputs.tensors)
    return karcher_mean(list(inputs.tensors), [1.0 / n] * n, max_iter=max_iter, tol=tol)


METHODS = [
    TensorMethod(
        "karcher", "https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean", _karcher_kernel,
        (Param("max_iter", "integer", 10, lo=0, hi=10**6, doc="fixed-point iterations at most"),
         Param("tol", "number", 1e-5, lo=0.0, doc="stop when the step's norm is below this")),
        base="input", min_inputs=1,
    ),
]
