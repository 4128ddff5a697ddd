"""Multilinear-extension (MLE) data importance for retrieval corpora.

The model (Lyu et al., "Improving Retrieval-Augmented Large Language Models
via Data Importance Learning", the method of ``ragbooster``): every corpus
item ``i`` exists independently with probability ``probs[i]``; for each
validation query the model keeps the first ``k`` *existing* items of its
ranked retrieval and scores ``U = (1/k) * sum of their utilities`` (e.g. 1
when the item leads to the right answer, else 0). The objective is the mean
over queries of ``E[U]``, which is multilinear in ``probs``; its gradient
says how much each item helps (> 0) or hurts (< 0).

Retrievals come in three forms:

- ``retrieved`` int [Q, M] corpus ids in rank order with ``utility`` float
  [Q, M]; a shorter row ends with ``-1`` padding (utilities there are ignored);
- CSR: ``retrieved`` and ``utility`` 1-d [nnz] with ``indptr`` int [Q + 1]
  (query q is ``retrieved[indptr[q]:indptr[q+1]]``);
- a list of per-query lists of different lengths (turned into CSR here).

numpy in -> numpy float64 out; when an input is a torch tensor the result is
a torch float64 tensor (on ``probs``' device). The computation is float64,
runs in the Rust core without the GIL, and gives the same bits for any
thread count.
"""

import numpy as np

from .. import _core

__all__ = ["multilinear_gradient", "sampled_gradient", "sample_count", "learn_importance", "group_gradient",
           "prune_lowest", "reweight_scores", "rerank"]


def _is_torch(x):
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _to_numpy(x):
    return x.detach().cpu().numpy() if _is_torch(x) else x


def _ids(name, x):
    a = np.asarray(_to_numpy(x))
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer ids, got dtype {a.dtype}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: id {a.max()} does not fit in int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def _floats(name, x):
    a = np.asarray(_to_numpy(x))
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected real numbers, got dtype {a.dtype}")
    # float64 holds every float32/float16/bool value and ints below 2^53 exactly.
    return np.ascontiguousarray(a, dtype=np.float64)


def _ragged(x):
    """A list of per-query sequences of different lengths?"""
    if not isinstance(x, (list, tuple)) or not x:
        return False
    if not all(isinstance(r, (list, tuple)) or (hasattr(r, "__len__") and np.ndim(r) == 1) for r in x):
        return False
    return len({len(r) for r in x}) > 1


def _retrievals(retrieved, utility, indptr):
    """(ids, utility, indptr or None) as contiguous int64/float64 arrays."""
    if indptr is None and (_ragged(retrieved) or _ragged(utility)):
        if not isinstance(utility, (list, tuple)) or len(utility) != len(retrieved):
            raise ValueError("utility: a ragged retrieved needs one utility list per query, of the same lengths")
        lengths = [len(r) for r in retrieved]
        for q, (r, u) in enumerate(zip(retrieved, utility)):
            if len(u) != len(r):
                raise ValueError(f"utility: query {q} has {len(u)} utilities for {len(r)} retrieved ids")
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = [i for r in retrieved for i in r]
        retrieved = np.asarray(flat) if flat else np.zeros(0, dtype=np.int64)
        utility = np.asarray([v for u in utility for v in u], dtype=np.float64)
    ids = _ids("retrieved", retrieved)
    util = _floats("utility", utility)
    if indptr is not None:
        indptr = _ids("indptr", indptr)
    return ids, util, indptr


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    return int(k)


def _probs(probs):
    p = _floats("probs", probs)
    if p.ndim != 1:
        raise ValueError(f"probs: expected a 1-d array (one probability per corpus item), got shape {p.shape}")
    return p


def _wrap(out, *inputs, device_of=None):
    """numpy unless an input was a torch tensor."""
    if not any(_is_torch(x) for x in inputs):
        return out
    import torch

    t = torch.from_numpy(out)
    return t.to(device_of.device) if _is_torch(device_of) and device_of.device.type != "cpu" else t


def multilinear_gradient(retrieved, utility, k, probs, *, indptr=None):
    """Exact gradient, in ``probs`` (float [N]), of the mean over queries of
    E[(1/k) * sum of the utilities of the top-k existing items].

    ``retrieved``: int [Q, M] corpus ids in rank order (``-1`` pads a row's
    end; no id twice in one query), or 1-d with ``indptr``, or a list of
    lists; ``utility``: float, same layout, used exactly; ``k`` >= 1 (k > M is
    allowed). Returns float64 [N]; items never retrieved get 0. Cost
    O(M * min(k, M)) per query.

    Raises ``ValueError`` naming the argument for ids out of range, a repeated
    id within a query, shapes that disagree, non-finite utilities, or
    probabilities outside [0, 1].
    """
    k = _check_k(k)
    ids, util, ptr = _retrievals(retrieved, utility, indptr)
    p = _probs(probs)
    out = np.empty(p.shape[0], dtype=np.float64)
    _core.mle_gradient(ids, util, ptr, k, p, out)
    return _wrap(out, retrieved, utility, probs, device_of=probs)


def sample_count(utility, k, eps, delta, retrieved=None):
    """Existence patterns per query that ``sampled_gradient`` draws:
    ``ceil(2 * w**2 * ln(2/delta) / eps**2)`` with ``w = (max - min) / k`` over
    the utilities and 0 (Hoeffding's inequality for a mean of values in
    [-w, w]). Pass ``retrieved`` (padded form) to leave out the utilities
    at ``-1`` padding, as ``sampled_gradient`` does."""
    u = _floats("utility", utility)
    if retrieved is not None:
        u = u[_ids("retrieved", retrieved) != -1]
    span = float(max(u.max(initial=0.0), 0.0) - min(u.min(initial=0.0), 0.0))
    return _core.mle_sample_count(span, _check_k(k), float(eps), float(delta))


def sampled_gradient(retrieved, utility, k, probs, eps, delta, seed=0, *, indptr=None):
    """The (eps, delta) Monte-Carlo estimate of ``multilinear_gradient``.

    Each query draws ``sample_count(utility, k, eps, delta)`` existence
    patterns; for a pattern, item j's sample is the change of U when j is
    switched on versus off (its expectation is the exact partial derivative).
    By Hoeffding's inequality every entry of the result is within ``eps`` of
    the exact gradient with probability at least ``1 - delta`` (per entry;
    for all N entries at once pass ``delta / N``). Patterns come from the
    project's Philox generator (stream = query index), so the result depends
    on ``seed`` only, never on the thread count. Same inputs, output and
    errors as ``multilinear_gradient``.
    """
    k = _check_k(k)
    ids, util, ptr = _retrievals(retrieved, utility, indptr)
    p = _probs(probs)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    out = np.empty(p.shape[0], dtype=np.float64)
    _core.mle_sampled_gradient(ids, util, ptr, k, p, float(eps), float(delta), int(seed), out)
    return _wrap(out, retrieved, utility, probs, device_of=probs)


def group_gradient(grad, grouping, num_groups=None):
    """The gradient in one shared weight per group: the sum of its items'
    gradients (``grouping[i]`` = item i's group, in [0, num_groups))."""
    g = _floats("grad", grad)
    groups = _ids("grouping", grouping)
    if groups.shape != g.shape:
        raise ValueError(f"grouping: shape {groups.shape} does not match grad shape {g.shape}")
    if groups.size and groups.min() < 0:
        raise ValueError(f"grouping: group ids must be >= 0, got {groups.min()}")
    n = int(groups.max(initial=-1)) + 1 if num_groups is None else int(num_groups)
    if groups.size and groups.max() >= n:
        raise ValueError(f"grouping: group id {groups.max()} is out of range for num_groups={n}")
    return np.bincount(groups, weights=g, minlength=n)


def _ragbooster_input(retrievals):
    """ragbooster's list of {"retrieved": [ids], "utility_contributions": [u]}
    as CSR arrays."""
    ids, utils, indptr = [], [], [0]
    for q, r in enumerate(retrievals):
        for key in ("retrieved", "utility_contributions"):
            if key not in r:
                raise ValueError(f"retrievals[{q}]: missing key {key!r} (ragbooster's form is "
                                 "{'retrieved': [ids], 'utility_contributions': [utilities]})")
        if len(r["retrieved"]) != len(r["utility_contributions"]):
            raise ValueError(f"retrievals[{q}]: {len(r['utility_contributions'])} utility_contributions for "
                             f"{len(r['retrieved'])} retrieved ids")
        ids.extend(r["retrieved"])
        utils.extend(r["utility_contributions"])
        indptr.append(len(ids))
    return (_ids("retrieved", np.asarray(ids) if ids else np.zeros(0, dtype=np.int64)),
            _floats("utility", np.asarray(utils, dtype=np.float64)), np.asarray(indptr, dtype=np.int64))


def learn_importance(retrievals, k, learning_rate=0.1, num_epochs=10, n_jobs=None, grouping=None, *,
                     probs=None, num_items=None, group_step=None):
    """Projected gradient ascent ``v <- clip(v + learning_rate * grad(v), 0, 1)``
    for ``num_epochs`` epochs from ``v = probs`` (default 0.5 everywhere);
    returns the learned existence probabilities: low = prune or down-weight.

    One function, two input forms (dispatched on the type of ``retrievals``):

    - **ragbooster-compatible**: ``retrievals`` a list of dicts
      ``{"retrieved": [ids], "utility_contributions": [utilities]}``, called as
      ``ragbooster.learn_importance(retrievals, k, learning_rate, num_epochs,
      n_jobs, grouping)``. The corpus has ``max id + 1`` items (ragbooster's
      convention; 1 when nothing is retrieved). Returns a list of floats, as
      ragbooster does. Unlike ragbooster, utilities are used exactly (it
      rounds them to 0.01; pass rounded values to reproduce it).
    - **arrays**: ``retrievals`` a tuple ``(retrieved, utility)`` or
      ``(retrieved, utility, indptr)`` in any layout ``multilinear_gradient``
      takes. The corpus size is ``len(probs)``, else ``num_items``, else
      ``max id + 1``. Returns float64 [N] (numpy, or torch for torch inputs).

    ``grouping``: one group id per corpus item; items of a group share one
    weight. ``group_step="sum"`` (the default for the array form) steps the
    shared weight by the sum of its items' gradients, the gradient of the
    objective in that weight; ``"mean"`` (the default for the dict form, to
    match ragbooster) steps every item, clips it, and sets each item to its
    group's mean. ``n_jobs``: threads for this call (None: ferrox's current
    setting; < 1: all CPUs); the result does not depend on it.
    """
    k = _check_k(k)
    dict_form = isinstance(retrievals, (list, tuple)) and all(isinstance(r, dict) for r in retrievals)
    if dict_form:
        ids, util, ptr = _ragbooster_input(retrievals)
        n = int(ids.max(initial=0)) + 1
        inputs = ()
    elif isinstance(retrievals, tuple) and len(retrievals) in (2, 3):
        ids, util, ptr = _retrievals(*retrievals) if len(retrievals) == 3 else _retrievals(*retrievals, None)
        n = None
        inputs = (*retrievals, probs)
    else:
        raise TypeError("retrievals: expected ragbooster's list of {'retrieved', 'utility_contributions'} dicts "
                        f"or a tuple (retrieved, utility[, indptr]), got {type(retrievals).__name__}")
    if probs is not None:
        v = _probs(probs).copy()
    else:
        if n is None:
            n = int(num_items) if num_items is not None else int(ids.max(initial=-1)) + 1
        v = np.full(n, 0.5)
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, np.integer)) or num_epochs < 0:
        raise ValueError(f"num_epochs: expected a non-negative integer, got {num_epochs!r}")
    lr = float(learning_rate)
    step = group_step if group_step is not None else ("mean" if dict_form else "sum")
    groups = None
    if grouping is not None:
        groups = _ids("grouping", grouping)
        if groups.ndim != 1:
            raise ValueError(f"grouping: expected one group id per corpus item (1-d), got shape {groups.shape}")
    from .._runtime import get_num_threads, set_num_threads

    before = get_num_threads()
    if n_jobs is not None:
        import os

        set_num_threads(int(n_jobs) if n_jobs >= 1 else max(1, len(os.sched_getaffinity(0))))
    try:
        _core.mle_learn(ids, util, ptr, k, lr, int(num_epochs), v, groups, step)
    finally:
        if n_jobs is not None:
            set_num_threads(before)
    if dict_form:
        return v.tolist()
    return _wrap(v, *inputs, device_of=probs)


def prune_lowest(weights, n):
    """Ids of the ``n`` items with the lowest weight (ties: lower id first),
    lowest first: the items to remove from the corpus. int64 [n]."""
    w = _floats("weights", weights)
    if w.ndim != 1:
        raise ValueError(f"weights: expected a 1-d array, got shape {w.shape}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= w.shape[0]:
        raise ValueError(f"n: expected an integer in [0, {w.shape[0]}], got {n!r}")
    if not np.isfinite(w).all():
        raise ValueError("weights: expected finite values")
    return np.argsort(w, kind="stable")[: int(n)].astype(np.int64)


def reweight_scores(scores, retrieved, weights):
    """Retrieval scores times the retrieved items' weights:
    ``scores[q, j] * weights[retrieved[q, j]]`` (float64, the shape of
    ``scores``); ``-1`` padding gives ``-inf`` so it sorts last."""
    s = _floats("scores", scores)
    ids = _ids("retrieved", retrieved)
    w = _floats("weights", weights)
    if s.shape != ids.shape:
        raise ValueError(f"scores: shape {s.shape} does not match retrieved shape {ids.shape}")
    pad = ids == -1
    if ids.size and (ids[~pad].min(initial=0) < 0 or ids.max() >= w.shape[0]):
        bad = ids[(~pad) & ((ids < 0) | (ids >= w.shape[0]))][0]
        raise ValueError(f"retrieved: id {bad} is out of range [0, {w.shape[0]})")
    out = s * w[np.where(pad, 0, ids)]
    out[pad] = -np.inf
    return out


def rerank(retrieved, scores, weights):
    """``retrieved`` reordered per row by ``reweight_scores`` (highest first;
    ties keep the original rank; padding stays at the end): the ranking to
    feed the model."""
    ids = _ids("retrieved", retrieved)
    new = reweight_scores(scores, ids, weights)
    order = np.argsort(-new, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, axis=-1)
