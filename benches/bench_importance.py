"""Multilinear-extension data importance against ragbooster (the paper's own
Rust + PyO3 package, from PyPI).

- ``epoch``: 10^7 corpus items, 20k validation queries, M = 100 retrieved
  items each, K = 10 (``--quick``: 10^6 items, 2k queries). One epoch of
  ``learn_importance`` (lr 0.1 from v = 0.5) per side: ferrox's array form
  (int64/float64 numpy arrays, inputs validated every call), ragbooster's
  ``learn_importance(list_of_dicts, K, 0.1, 1, n_jobs, None)`` with n_jobs =
  the CPUs here (its conversion of the Python lists is part of its call; its
  API has no other input). Checked before timing: the two results agree to
  1e-12.
- ``full``: 10^8 items, 10^6 queries, M = 100, K = 10, 10 epochs, ferrox only
  (``--quick``: 10^7 items, 10^5 queries). ragbooster's row repeats the
  ``epoch`` case for scale; the paper reports "less than ten minutes" for a
  corpus of 10^8 items.

Synthetic retrievals: query q's ids are ``base * M + perm_q`` with ``base``
uniform in [0, N/M) and ``perm_q`` a random permutation of 0..M-1 (distinct
ids within a query, uniform over the corpus); utilities are 0 or 1 (right
or wrong answer), each with probability 1/2. (ragbooster sizes its boundary
tensor by the distinct *integer parts* of the utilities, so fractional
utilities with several distinct values make it panic; its rounding to 0.01
leaves 0/1 unchanged.)

ragbooster is not a test dependency: ``pip install --no-deps ragbooster``
for this bench. Its ``__init__`` imports transformers, so its compiled
module is loaded directly from the installed package folder.
"""

import glob
import importlib.util
import os

import numpy as np

from ferrox.importance import learn_importance

NAME = "importance"
MAIN_COMPARATOR = "ragbooster"
CASES = ["epoch", "full"]
FOR_SCALE = {"full": {"ragbooster": "epoch"}}
SCALE_NOTE = "ragbooster: the epoch case, 1 epoch"
M, K, LR = 100, 10, 0.1


_LOADED = {}


def _ragbooster():
    if "rb" in _LOADED:  # a PyO3 module initialises once per process
        return _LOADED["rb"]
    spec = importlib.util.find_spec("ragbooster")  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_importance needs ragbooster: pip install --no-deps ragbooster")
    folder = list(spec.submodule_search_locations)[0]
    so = glob.glob(os.path.join(folder, "ragbooster*.so"))
    if not so:
        raise SystemExit(f"no compiled ragbooster module in {folder}")
    mod_spec = importlib.util.spec_from_file_location("ragbooster.ragbooster", so[0])
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    _LOADED["rb"] = mod
    return mod


def _retrievals(n, q, seed):
    rng = np.random.default_rng(seed)
    ids = np.empty((q, M), dtype=np.int64)
    util = np.empty((q, M), dtype=np.float64)
    step = 100_000  # rows per chunk: bounded temporaries at 10^6 queries
    for a in range(0, q, step):
        b = min(q, a + step)
        perm = np.argsort(rng.random((b - a, M)), axis=1)
        ids[a:b] = rng.integers(0, n // M, (b - a, M)) * M + perm
        util[a:b] = rng.integers(0, 2, (b - a, M))
    return ids, util


def setup(case, quick):
    if case == "epoch":
        n, q = (10**6, 2_000) if quick else (10**7, 20_000)
        ids, util = _retrievals(n, q, 0)
        # ragbooster's corpus is max id + 1: pin it to n with the last id.
        if n - 1 not in ids[0]:
            ids[0, 0] = n - 1
        _ragbooster()  # imported before the memory baseline
        dicts = [{"retrieved": r, "utility_contributions": u} for r, u in zip(ids.tolist(), util.tolist())]
        return {"ids": ids, "util": util, "n": n, "epochs": 1, "dicts": dicts}
    n, q = (10**7, 10**5) if quick else (10**8, 10**6)
    ids, util = _retrievals(n, q, 1)
    return {"ids": ids, "util": util, "n": n, "epochs": 10}


def _ferrox(d):
    return learn_importance((d["ids"], d["util"]), K, LR, d["epochs"], num_items=d["n"])


def _ragbooster_side(d):
    rb = _ragbooster()
    return np.asarray(rb.learn_importance(d["dicts"], K, LR, d["epochs"], os.cpu_count() or 1, None))


SIDES = {"ferrox": _ferrox, "ragbooster": _ragbooster_side}


def check(results, case, inputs):
    f = results["ferrox"]
    assert f.shape == (inputs["n"],) and np.isfinite(f).all() and (f >= 0).all() and (f <= 1).all()
    moved = np.abs(f - 0.5).max()
    assert moved > 0, "one epoch moved nothing"
    if "ragbooster" in results:
        r = results["ragbooster"]
        assert r.shape == f.shape, (r.shape, f.shape)
        err = np.abs(f - r).max()
        assert err <= 1e-12, f"ferrox and ragbooster differ by {err} (largest step {moved})"
