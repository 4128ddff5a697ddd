"""Scalar k-means codebooks of bf16 weights: ferrox.codebook.kmeans vs
faiss-cpu Kmeans (all points: max_points_per_centroid >= n, niter 20) and
scikit-learn KMeans (full data, one k-means++ init, Lloyd), k in {4, 8, 16},
on one 4096x4096 bf16 matrix and a 100.7M-parameter synthetic bf16 model
(24 matrices of 2048x2048, one codebook per matrix). Each side returns the
MSE over all weights; check() requires ferrox's MSE to be no worse than any
comparator's (1e-6 relative slack). faiss and scikit-learn get the weights as
float32 [n, 1] (what they take), converted outside the timed region.

faiss-cpu is a bench-only dependency: ``pip install faiss-cpu``."""

import numpy as np
import torch

from ferrox.codebook import kmeans

NAME = "codebook_kmeans"
CASES = ["matrix k=4", "matrix k=8", "matrix k=16", "model k=8"]
MAIN_COMPARATOR = "faiss"
SLOW_SIDES = {"sklearn"}


def _synthetic(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # Trained-weight-like: Gaussian rows with per-row scales and a few outliers.
    w = torch.randn(shape, generator=g) * (0.02 * torch.rand(shape[0], 1, generator=g) + 0.005)
    w[torch.rand(shape, generator=g) < 1e-4] *= 8
    return w.bfloat16()


def setup(case, quick):
    kind, k = case.split()
    k = int(k[2:])
    if kind == "matrix":
        side = 512 if quick else 4096
        mats = [_synthetic((side, side), 0)]
    else:
        n, side = (4, 512) if quick else (24, 2048)
        mats = [_synthetic((side, side), i) for i in range(n)]
    return {"mats": mats, "f32": [m.float().reshape(-1, 1).numpy() for m in mats], "k": k}


def _mse_of(x, cb):
    """MSE of nearest-codeword assignment (numpy, float64)."""
    cb = np.sort(np.asarray(cb, dtype=np.float64).reshape(-1))
    mids = (cb[:-1] + cb[1:]) / 2
    x = x.reshape(-1).astype(np.float64)
    return float(np.mean((x - cb[np.searchsorted(mids, x, side="left")]) ** 2))


def _ferrox(d):
    sse, n = 0.0, 0
    for m in d["mats"]:
        r = kmeans(m, k=d["k"])
        sse += r.objective
        n += m.numel()
    return sse / n


def _faiss(d):
    import faiss

    sse, n = 0.0, 0
    for x in d["f32"]:
        km = faiss.Kmeans(1, d["k"], niter=20, seed=0, max_points_per_centroid=x.shape[0], verbose=False)
        km.train(x)
        sse += _mse_of(x, km.centroids) * x.shape[0]
        n += x.shape[0]
    return sse / n


def _sklearn(d):
    from sklearn.cluster import KMeans

    sse, n = 0.0, 0
    for x in d["f32"]:
        km = KMeans(n_clusters=d["k"], n_init=1, random_state=0, algorithm="lloyd").fit(x)
        sse += _mse_of(x, km.cluster_centers_) * x.shape[0]
        n += x.shape[0]
    return sse / n


SIDES = {"ferrox": _ferrox, "faiss": _faiss, "sklearn": _sklearn}


def check(results):
    ours = results["ferrox"]
    for side, mse in results.items():
        assert ours <= mse * (1 + 1e-6), f"ferrox MSE {ours:.6g} is worse than {side}'s {mse:.6g}"
