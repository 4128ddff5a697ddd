"""DELLA (``della``: with TIES sign election; ``della_linear``: without):
generalized task arithmetic whose sparsifier is MagPrune. Within each row
(a 1-D tensor is one row), the delta with the r-th smallest magnitude of n
is kept with probability

    p_r = (density − ε) + 2ε · (r − 1) / (n − 1)

(larger deltas kept more often, mean ``density``); the kept values are
rescaled (``rescale``, mergekit's default) so the delta's L1 norm is kept:
mergekit 0.1.5 rescales by Σ|τ| / Σ|kept|, not by 1/p, and so does ferrox.

As mergekit 0.1.5 (the same torch operations in its order, so a float32
merge gives its bits for the same random draws). Where the draws come from
is ``rng``:

- ``tensor`` (default): each tensor has its own generator, seeded from
  ``seed`` and the tensor's name (``mask_seed``), so a tensor's masks do not
  depend on which other tensors are merged or in what order (``merge_tensors``
  on one tensor gives the checkpoint merge's bits).
- ``mergekit``: mergekit's draws. mergekit (``--random-seed S``) seeds
  torch's global generator with S once and draws every mask from it, tensor
  after tensor in its executor's order, which sorts tensors by name
  (``graph.build_schedule``: lexicographic by the task's tensor name). ferrox
  then seeds one generator with ``seed`` and merges della tensors in name
  order, which gives mergekit's output bit for bit in float32 (tested on
  whole runs). ``merge_tensors`` without a generator draws from torch's
  global one, as mergekit does.

Torch methods rather than the Rust core: MagPrune's rank-dependent
Bernoulli masks and the order of mergekit's float32 operations are what
parity needs, and torch gives both directly.
"""

import hashlib

from .base import REQUIRED, Param, TensorMethod


def mask_seed(seed: int, tensor_name: str) -> int:
    """The 64-bit seed of one tensor's generator (every model's mask of that
    tensor is drawn from it, in model order)."""
    digest = hashlib.blake2b(f"della\0{seed}\0{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def generator_for(seed: int, tensor_name: str, device=None):
    import torch

    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(mask_seed(seed, tensor_name))
    return g


def l1_rescaled(tensor, mask, rescale: bool, eps: float = 1e-7):
    """``tensor * mask``, times Σ|tensor| / Σ|kept| when ``rescale`` (left
    unscaled when either norm is below ``eps``, as mergekit)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magprune_probabilities(delta, density: float, epsilon: float):
    """Each element's keep probability (rows along dim 1; a 1-D tensor is one row)."""
    import torch

    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    n = x.shape[1]
    ranks = torch.argsort(torch.argsort(x.abs(), dim=1, descending=False), dim=1).to(torch.float32) + 1
    if n > 1:
        lo = ranks.min(dim=1, keepdim=True).values
        hi = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    else:  # one element per row: mergekit's 0/0; its lowest probability, the row has no ranking
        rank_norm = torch.zeros_like(ranks)
    return (density - epsilon) + rank_norm * 2 * epsilon


def magprune(delta, density: float, epsilon: float, rescale: bool, generator):
    """DELLA's MagPrune of one delta (float32)."""
    import torch

    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    probs = magprune_probabilities(delta, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator).to(torch.float32)
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    return l1_rescaled(x, mask, rescale).reshape(delta.shape)


def sign_consensus(deltas):
    """TIES's sign election ("sum"): True where an input's sign is the sign
    of the deltas' sum (0 counts as positive), as mergekit's ``get_mask``."""
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return sign == majority


def _della_kernel(consensus: bool):
    def kernel(inputs, normalize, rescale, int8_mask, seed, rng, **shared):
        import torch

        lam = shared["lambda"]
        base = inputs.base
        others = inputs.non_base
        if not others:
            return base
        if rng == "mergekit":
            g = inputs.generator  # None: torch's global generator, mergekit's
        else:
            g = generator_for(seed, inputs.tensor_name, base.device if base.is_cuda else None)
        deltas = base.new_empty((len(others), *base.shape))
        for i, (x, p) in enumerate(zip(others, inputs.per_model)):
            deltas[i] = magprune(x - base, p["density"], p["epsilon"], rescale, g)
        weights = torch.tensor(inputs.values("weight"), dtype=deltas.dtype, device=deltas.device)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        if consensus:
            mask = sign_consensus(deltas)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lam != 1:
            mixed *= lam
        return base + mixed

    return kernel


def check_epsilon(shared, per_model) -> None:
    """mergekit's rule: where 0 < density < 1, density ± epsilon must lie in (0, 1)."""
    for i, p in enumerate(per_model):
        d, e = p["density"], p["epsilon"]
        if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise ValueError(f"models[{i}]: della needs density - epsilon > 0 and density + epsilon < 1 "
                             f"(keep probabilities in (0, 1)), got density {d:g}, epsilon {e:g}")


def _params(normalize: bool):
    return (
        Param("weight", "number", REQUIRED, per_model=True, doc="the model's coefficient"),
        Param("density", "fraction", 1.0, per_model=True, doc="mean kept fraction"),
        Param("epsilon", "fraction", 0.15, per_model=True,
              doc="spread of keep probabilities: density ± epsilon from the smallest to the largest |delta|"),
        Param("normalize", "flag", normalize, doc="divide by the sum of the (sign-elected) weights"),
        Param("rescale", "flag", True, doc="rescale kept deltas to the dropped delta's L1 norm"),
        Param("lambda", "number", 1.0, doc="scale of the merged task vector"),
        Param("int8_mask", "flag", False, doc="mergekit's mask dtype switch (no numerical effect)"),
        Param("seed", "integer", 0, doc="seed of the masks (each tensor's generator: seed and tensor name)"),
        Param("rng", "choice", "tensor", choices=("tensor", "mergekit"),
              doc="masks from a generator per tensor, or mergekit's: one generator seeded with seed, tensors "
                  "in name order"),
    )


METHODS = [
    TensorMethod("della", "https://arxiv.org/abs/2406.11617", _della_kernel(True), _params(True),
                 base="required", min_inputs=1, shape_of_inputs="base_model and the models",
                 extra_check=check_epsilon),
    TensorMethod("della_linear", "https://arxiv.org/abs/2406.11617", _della_kernel(False), _params(False),
                 base="required", min_inputs=1, shape_of_inputs="base_model and the models",
                 extra_check=check_epsilon),
]
