"""TRAK-style gradient projection against ``traker`` (the TRAK authors'
package, from PyPI) on the CPU.

- ``project``: 32 gradients of 2^20 dims (float32) projected to p = 2048
  (``--quick``: 2^18 dims). ferrox: ``ferrox.importance.project`` (implicit
  Rademacher from Philox, nothing stored). traker: ``BasicProjector`` on
  ``cpu`` with its default block_size (100 projection columns generated per
  block, so it never holds the whole matrix either), Rademacher and normal.
  Both generate their random matrix inside the timed call (traker regenerates
  its blocks on every ``project`` call when the matrix is blocked).

Results: benches/results/importance_trak.md.

Checked before timing: each side is a Johnson-Lindenstrauss map of the same
quality — the 95th percentile over the 496 pairs of the 32 gradients of
|<Px,Py> - <x,y>| / (|x||y|) — ferrox's within 1.25x of traker's normal
projection (the pairs are few, so the percentile is noisy; the tests check
1.1x against a dense Gaussian over 3000 pairs).

traker is not a test dependency: ``pip install --no-deps traker`` for this
bench.
"""

import numpy as np
import torch

from ferrox.importance import project

NAME = "importance_trak"
MAIN_COMPARATOR = "traker_rademacher"
CASES = ["project"]
P = 2048
N = 32


def _trak():
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        raise SystemExit("bench_importance_trak needs traker: pip install --no-deps traker")
    return BasicProjector, ProjectionType


def setup(case, quick):
    d = 1 << (18 if quick else 20)
    g = torch.randn(N, d, generator=torch.Generator().manual_seed(0))
    _trak()
    return {"g": g, "d": d}


def _ferrox(inp):
    return project(inp["g"], P, 0)


def _traker(kind):
    def side(inp):
        basic, ptype = _trak()
        proj = basic(inp["d"], P, 0, getattr(ptype, kind), torch.device("cpu"))
        return proj.project(inp["g"], model_id=0)
    return side


SIDES = {"ferrox": _ferrox, "traker_rademacher": _traker("rademacher"), "traker_normal": _traker("normal")}
SLOW_SIDES = ["traker_rademacher", "traker_normal"]


def distortion(pg, g):
    pg, g = pg.double(), g.double()
    i, j = torch.triu_indices(g.shape[0], g.shape[0], 1)
    norms = g.norm(dim=1)
    err = ((pg[i] * pg[j]).sum(1) - (g[i] * g[j]).sum(1)).abs() / (norms[i] * norms[j])
    return float(np.percentile(err.numpy(), 95))


def check(results, case, inputs):
    g = inputs["g"]
    dist = {}
    for side, pg in results.items():
        assert pg.shape == (N, P), (side, pg.shape)
        # traker's entries have variance 1, ferrox's 1/p: compare on ferrox's scale.
        dist[side] = distortion(pg if side == "ferrox" else pg / np.sqrt(P), g)
    print("JL 95th pct distortion:", "  ".join(f"{s} {v:.4f}" for s, v in dist.items()))
    ref = dist.get("traker_normal", dist.get("traker_rademacher"))
    if ref is not None:
        assert dist["ferrox"] <= 1.25 * ref, dist
