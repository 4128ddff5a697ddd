"""Unlearning by datamodel matching and the KLoM metric (Georgiev, Rinberg,
Park, Garg, Ilyas, Madry, Neel, "Attribute-to-Delete: Machine Unlearning
via Datamodel Matching", 2024).

Unlearning a forget set F should leave a model whose outputs cannot be told
apart from those of a model retrained without F. Datamodel matching (DMM)
turns that into data attribution:

1. predict the retrained model's outputs from attribution scores,
   ``f̂(x) = f(x) − Σ_{i∈F} β_i(x)`` (:func:`datamodel_targets`; β are
   regression datamodels from :func:`fit_datamodels`, or TRAK scores from
   ``TRAKer.score``, both with the convention that β_i(x) > 0 means example
   i raises output x);
2. fine-tune the model to match those outputs on forget and retain points
   (:func:`dmm_unlearn`; given a retrained oracle's outputs instead it is
   "oracle matching").

KLoM ("KL of margins", as EasyDUB defines it) measures the result: for
each evaluation point, the margins ``logit_y − logsumexp(other logits)``
(:func:`margins`) of N unlearned models and of N oracles (retrained
without F, different seeds) are two samples; KLoM of the point is the KL
divergence ``KL(unlearned ‖ oracle)`` of their histograms, and a set of
points is summarised by a high percentile (95th) of that.
"""

import numpy as np
import torch

__all__ = ["margins", "klom_scores", "klom", "fit_datamodels", "datamodel_targets", "dmm_unlearn"]


def margins(logits, labels):
    """``logit_y − logsumexp(other logits)`` over the last dim; ``logits``
    [..., n, C], ``labels`` int [n] (leading dims broadcast: a stack of
    models gives [models, n])."""
    labels = torch.as_tensor(labels, device=logits.device)
    mine = torch.nn.functional.one_hot(labels.long(), logits.shape[-1]).bool()
    correct = (logits * mine).sum(-1)
    return correct - torch.logsumexp(logits.masked_fill(mine, float("-inf")), dim=-1)


def _samples(name, x):
    a = np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 1:
        raise ValueError(f"{name}: expected margins [models, points], got shape {list(a.shape)}")
    if np.isnan(a).any():
        raise ValueError(f"{name}: contains NaN")
    return a


def klom_scores(unlearned_margins, oracle_margins, *, bins=20, clip=100.0, eps=1e-5):
    """Per-point KLoM, float64 [points]. ``unlearned_margins`` [N, points]
    and ``oracle_margins`` [N', points] (numpy or torch; the numbers of
    models may differ). Per point: both samples are clipped to
    [−clip, clip]; ``bins`` equal-width bins span the two samples' common
    range (``np.histogram``'s bins: half-open, the last one closed; a point
    where every margin is equal puts all of them in one bin); ``p``, ``q``
    are the unlearned and oracle bin frequencies, and
    ``KLoM = Σ_{p_b>0} p_b · log(p_b / max(q_b, eps))`` (``eps`` keeps a bin
    the oracles never reach finite)."""
    u = _samples("unlearned_margins", unlearned_margins)
    o = _samples("oracle_margins", oracle_margins)
    if u.shape[1] != o.shape[1]:
        raise ValueError(f"oracle_margins: {o.shape[1]} points, but unlearned_margins has {u.shape[1]}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins: expected a positive int, got {bins!r}")
    if not clip > 0 or not eps > 0:
        raise ValueError(f"clip and eps: expected numbers > 0, got clip={clip!r} eps={eps!r}")
    u, o = np.clip(u, -clip, clip), np.clip(o, -clip, clip)
    lo = np.minimum(u.min(0), o.min(0))
    hi = np.maximum(u.max(0), o.max(0))
    hi = np.where(hi > lo, hi, lo + 1.0)
    # The interior edges, computed as np.histogram computes them (linspace),
    # so a margin on an edge lands in the same bin as there.
    inner = np.linspace(lo, hi, bins + 1, axis=1)[:, 1:-1]  # [points, bins - 1]

    def freq(x):
        b = (x.T[:, :, None] >= inner[:, None, :]).sum(-1)  # [points, models] bin index
        counts = np.zeros((x.shape[1], bins))
        np.add.at(counts, (np.arange(x.shape[1])[:, None], b), 1.0)
        return counts / x.shape[0]

    p, q = freq(u), freq(o)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / np.maximum(q, eps)), 0.0)
    return terms.sum(1)


def klom(unlearned_margins, oracle_margins, *, q=0.95, bins=20, clip=100.0, eps=1e-5):
    """The ``q`` quantile (default 0.95: EasyDUB's 95th percentile; numpy's
    linear interpolation) of :func:`klom_scores` over the points."""
    if not 0 <= q <= 1:
        raise ValueError(f"q: expected a quantile in [0, 1], got {q!r}")
    return float(np.quantile(klom_scores(unlearned_margins, oracle_margins, bins=bins, clip=clip, eps=eps), q))


def fit_datamodels(masks, outputs, ridge=1e-3):
    """Linear datamodels by ridge regression: ``masks`` [S, n_train] (1
    where training example i was in the set model s was trained on),
    ``outputs`` [S, n_eval] (model s's output on each eval point). Returns
    β float64 [n_train, n_eval] (numpy) minimising
    ``Σ_s (outputs[s] − b − masks[s]·β)² + ridge·S·‖β‖²`` with a free
    intercept b: β_i(x) is how much including example i raises output x.
    Solved by a Cholesky factorisation of the centred Gram matrix."""
    a = np.asarray(masks.detach().cpu() if isinstance(masks, torch.Tensor) else masks, dtype=np.float64)
    y = np.asarray(outputs.detach().cpu().double() if isinstance(outputs, torch.Tensor) else outputs, dtype=np.float64)
    if a.ndim != 2 or y.ndim != 2 or a.shape[0] != y.shape[0]:
        raise ValueError(f"masks, outputs: expected [S, n_train] and [S, n_eval], got {list(a.shape)} and {list(y.shape)}")
    if not ridge > 0:
        raise ValueError(f"ridge: expected a number > 0, got {ridge!r}")
    a = a - a.mean(0)
    y = y - y.mean(0)
    gram = torch.from_numpy(a.T @ a)
    gram.diagonal().add_(ridge * a.shape[0])
    chol = torch.linalg.cholesky(gram)
    return torch.cholesky_solve(torch.from_numpy(a.T @ y), chol).numpy()


def datamodel_targets(scores, forget_idx, full_outputs):
    """Predicted outputs of the model retrained without the forget set:
    ``full_outputs − Σ_{i∈forget_idx} scores[i]``. ``scores`` [n_train,
    n_eval] (datamodels or TRAK τ), ``full_outputs`` [..., n_eval] (one
    model's outputs or a stack [models, n_eval]). Returns float32 torch
    [..., n_eval] on ``full_outputs``' device (if torch)."""
    s = torch.as_tensor(np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64))
    if s.dim() != 2:
        raise ValueError(f"scores: expected [n_train, n_eval], got shape {list(s.shape)}")
    idx = torch.as_tensor(forget_idx).reshape(-1)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"forget_idx: expected integer indices, got dtype {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= s.shape[0]):
        raise ValueError(f"forget_idx: expected indices in [0, {s.shape[0]}), got {int(idx.min())}..{int(idx.max())}")
    if idx.unique().numel() != idx.numel():
        raise ValueError("forget_idx: an index appears twice")
    full = torch.as_tensor(full_outputs)
    if full.shape[-1] != s.shape[1]:
        raise ValueError(f"full_outputs: last dim {full.shape[-1]} does not match the {s.shape[1]} eval points of scores")
    shift = s[idx.long()].sum(0).float().to(full.device)
    return full.float() - shift


def _batch_margins(model, x, y):
    return margins(model(x), y)


def dmm_unlearn(model, inputs, targets, *, output_fn=_batch_margins, steps=100, lr=1e-2, batch_size=None,
                optimizer=None, seed=0):
    """Fine-tune ``model`` in place so that ``output_fn(model, *batch)``
    matches ``targets`` (mean squared error), the matching step of DMM
    (targets from :func:`datamodel_targets`; an oracle's outputs give oracle
    matching). ``inputs``: a tensor or a tuple of tensors whose first dim
    indexes the n points (forget and retain points mixed); ``targets``
    [n, ...] is what ``output_fn`` returns for them (default: the margins
    of a classifier, ``inputs = (x, y)``). Batches of ``batch_size`` points
    (None: all) are drawn without replacement, reshuffled every epoch from
    ``seed``. ``optimizer``: ``fn(params) -> Optimizer`` (default Adam with
    ``lr``). Returns the losses."""
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    n = inputs[0].shape[0]
    for i, t in enumerate(inputs):
        if t.shape[0] != n:
            raise ValueError(f"inputs[{i}]: {t.shape[0]} rows, but inputs[0] has {n}")
    targets = torch.as_tensor(targets)
    if targets.shape[0] != n:
        raise ValueError(f"targets: {targets.shape[0]} rows for {n} points")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    bs = n if batch_size is None else int(batch_size)
    if not 1 <= bs <= n:
        raise ValueError(f"batch_size: expected 1..{n}, got {batch_size!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    for _ in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + bs]
        pos += bs
        batch = tuple(t[idx.to(t.device)] for t in inputs)
        pred = output_fn(model, *batch)
        want = targets[idx.to(targets.device)].to(pred.device, pred.dtype)
        if pred.shape != want.shape:
            raise ValueError(f"output_fn: returned shape {list(pred.shape)}, targets give {list(want.shape)}")
        loss = torch.nn.functional.mse_loss(pred, want)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
