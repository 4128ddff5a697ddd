"""DELLA (``della``: with TIES sign election; ``della_linear``: without):
generalized task arithmetic whose sparsifier is MagPrune. Within each row
(rows along dim 1, as mergekit; a 1-D tensor is one row), the delta with the
r-th smallest magnitude of n is kept with probability

    p_r = (density − ε) + 2ε · (r − 1) / (n − 1)        (n = 1: density − ε)

(larger deltas kept more often, mean ``density``); the kept values are
rescaled (``rescale``, mergekit's default) so the delta's L1 norm over the
whole tensor is kept: mergekit 0.1.5 rescales by Σ|τ| / Σ|kept|, not by
1/p, and so does ferrox (left unscaled where either sum is below 1e-7).
Then weights, sign election (della) or a plain sum (della_linear), the
normaliser (the joining weights' sum, 1 where none join; della_linear: the
weights' sum, 1 where it is below 1e-8 in magnitude) and ``lambda``, as
mergekit. Where the draws come from is ``rng``:

- ``tensor`` (default): the Rust core (``ferrox._core.della_merge``). Ranks
  are exact within each row (ties in |τ| ranked by index), p is computed in
  float64, and element i of model m (m-th model besides the base) is kept
  when the Philox4x32-10 uniform of (``mask_seed(seed, tensor name)``,
  stream m, element i) is below its p. These are not torch's generator's
  draws: a tensor's masks depend only on the seed, its name, the model's
  position and the element (not on the other tensors, the merge order, the
  thread count or the device), and ``merge_tensors`` on one tensor gives
  the checkpoint merge's bits. τ is computed in float32 from the float32
  inputs ``TensorMethod`` passes; the L1 sums are float64, the rest float32
  with the rescale folded into the weight, so a float32 merge agrees with
  mergekit's arithmetic on the same masks to a few float32 ulp, not bit for
  bit. CUDA tensors are merged on the CPU and moved back.
- ``mergekit``: mergekit's draws and arithmetic, in torch. mergekit
  (``--random-seed S``) seeds torch's global generator with S once and draws
  every mask from it (``torch.bernoulli``), tensor after tensor in its
  executor's order, which sorts tensors by name (``graph.build_schedule``:
  lexicographic by the task's tensor name). ferrox then seeds one generator
  with ``seed`` and merges della tensors in name order, which gives
  mergekit's output bit for bit in float32 (tested on whole runs).
  ``merge_tensors`` without a generator draws from torch's global one, as
  mergekit does.
"""

import hashlib

from .base import REQUIRED, Param, TensorMethod


def mask_seed(seed: int, tensor_name: str) -> int:
    """The 64-bit Philox key of one tensor's masks (``rng: tensor``; model m
    draws from stream m)."""
    digest = hashlib.blake2b(f"della\0{seed}\0{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


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
    """DELLA's MagPrune of one delta (float32) as mergekit: ``torch.bernoulli``
    draws from ``generator`` (``rng: mergekit``)."""
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


def _rows(t):
    """A float32 CPU tensor whose last dim is ``t``'s dim 1 (the ranked rows), contiguous."""
    import torch

    t = t.detach().to("cpu", torch.float32)
    return (t.movedim(1, -1) if t.dim() > 2 else t).contiguous()


def core_della(inputs, consensus: bool, normalize: bool, rescale: bool, lam: float, seed: int):
    """``rng: tensor``: one tensor's della merge in the Rust core (float32)."""
    import torch

    from ... import _core

    base = inputs.base
    if base.numel() == 0:
        return base.clone()
    b, xs = _rows(base), [_rows(x) for x in inputs.non_base]
    out = torch.empty_like(b)
    _core.della_merge(out, b, xs, inputs.values("weight"), inputs.values("density"), inputs.values("epsilon"),
                      consensus, normalize, rescale, lam, b.shape[-1] if b.dim() >= 2 else 0,
                      mask_seed(seed, inputs.tensor_name))
    if base.dim() > 2:
        out = out.movedim(-1, 1)
    return out.reshape(base.shape).to(base.device)


def core_keep(base, model, density: float, epsilon: float, seed: int, tensor_name: str, index: int, ranks=False):
    """The keep mask (bool, ``base``'s shape) that ``rng: tensor`` draws for
    the ``index``-th model besides the base, and with ``ranks`` each
    element's 0-based rank of |delta| within its row: for tests and
    inspection."""
    import torch

    from ... import _core

    b, x = _rows(base), _rows(model)
    keep = torch.empty(b.shape, dtype=torch.uint8)
    r = torch.empty(b.shape, dtype=torch.int32) if ranks else None
    _core.magprune_keep(keep, b, x, b.shape[-1] if b.dim() >= 2 else 0, density, epsilon,
                        mask_seed(seed, tensor_name), index, r)

    def back(t):
        return (t.movedim(-1, 1) if base.dim() > 2 else t).reshape(base.shape)

    return (back(keep.bool()), back(r)) if ranks else back(keep.bool())


def _della_kernel(consensus: bool):
    def kernel(inputs, normalize, rescale, int8_mask, seed, rng, **shared):
        import torch

        lam = shared["lambda"]
        base = inputs.base
        others = inputs.non_base
        if not others:
            return base
        if rng != "mergekit":
            return core_della(inputs, consensus, normalize, rescale, lam, seed)
        g = inputs.generator  # None: torch's global generator, mergekit's
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
        Param("seed", "integer", 0, doc="seed of the masks (rng tensor: Philox keyed by seed and tensor name)"),
        Param("rng", "choice", "tensor", choices=("tensor", "mergekit"),
              doc="masks from Philox per tensor (Rust core), or mergekit's: torch's generator seeded with seed, "
                  "tensors in name order"),
    )


METHODS = [
    TensorMethod("della", "https://arxiv.org/abs/2406.11617", _della_kernel(True), _params(True),
                 base="required", min_inputs=1, shape_of_inputs="base_model and the models",
                 extra_check=check_epsilon),
    TensorMethod("della_linear", "https://arxiv.org/abs/2406.11617", _della_kernel(False), _params(False),
                 base="required", min_inputs=1, shape_of_inputs="base_model and the models",
                 extra_check=check_epsilon),
]
