"""JLCM-style grouping of rows (output neurons): rows with similar value
distributions share a codebook.

Each row r of W [out, in] is described by three statistics (Rust core):
s1 = log std_r, s2 = max|w_r| / std_r (how far its largest weight sits
out), s3 = log kurtosis_r (m4 / m2², tail weight). Each statistic is
standardized over the rows (z-score) and weighted (s1 by 2, s2 and s3 by
0.5: the scale matters most for sharing a codebook, the shape refines it),
the rows are clustered into G groups by k-means in that 3-D space (seeded,
deterministic), the groups are
ordered by their mean s1 (smallest scale first) and rows are reordered so
each group is contiguous, keeping the original row order inside a group.
"""

from typing import Tuple

from .. import _checks, _core


def _feature_weights():
    import torch

    return torch.tensor([2.0, 0.5, 0.5])


def row_statistics(w):
    """float32 [out, 3]: per row (std, max|w| / std, kurtosis); zeros for a
    constant row."""
    import torch

    _checks.tensor("w", w)
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D weight [out, in], got shape {list(w.shape)}")
    out = torch.empty(w.shape[0], 3, dtype=torch.float32)
    _core.codebook_row_stats(w.detach().cpu(), out)
    return out


def features(w):
    """The standardized grouping features [out, 3] (see the module doc)."""
    import torch

    s = row_statistics(w).double()
    tiny = torch.finfo(torch.float32).tiny
    f = torch.stack([s[:, 0].clamp_min(tiny).log(), s[:, 1], s[:, 2].clamp_min(tiny).log()], dim=1)
    mean, std = f.mean(0), f.std(0, unbiased=False)
    z = (f - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return (z * _feature_weights().to(z.dtype)).float()


def group_rows(w, groups: int, *, seed: int = 0) -> Tuple["object", "object"]:
    """(perm int32 [out], group_offsets int32 [G+1]) for ``groups`` groups
    (at most out): permuted row r is original row perm[r]; groups are
    contiguous ranges of permuted rows. One group gives the identity."""
    import torch

    _checks.count("groups", groups, 1, 1 << 20)
    rows = w.shape[0]
    g = min(groups, rows)
    if g <= 1:
        return torch.arange(rows, dtype=torch.int32), torch.tensor([0, rows], dtype=torch.int32)
    f = features(w)
    centers = torch.empty(g, 3, dtype=torch.float32)
    _core.codebook_kmeans_vec(f, 3, g, centers, None, seed, 50, 0.0)
    # Nearest centre, ties to the lower index (argmin returns the first).
    labels = torch.cdist(f.double(), centers.double()).argmin(1)
    means = torch.zeros(g, dtype=torch.float64).index_add_(0, labels, f[:, 0].double())
    counts = torch.bincount(labels, minlength=g)
    means = torch.where(counts > 0, means / counts.clamp_min(1), torch.full_like(means, float("inf")))
    rank = torch.empty(g, dtype=torch.long)
    order = sorted(range(g), key=lambda i: (means[i].item(), i))
    rank[torch.tensor(order)] = torch.arange(g)
    key = rank[labels] * rows + torch.arange(rows)
    perm = torch.argsort(key).to(torch.int32)
    offsets = torch.zeros(g + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.bincount(rank[labels], minlength=g), 0).to(torch.int32)
    return perm, offsets
