"""lidar-bonnetal's KNN post-processing (RangeNet++, Milioto et al. 2019), own vectorised code.

A point reads its label from its range-image cell; near depth edges that cell often belongs to a
nearer surface (the point lost the cell). KNN instead votes among the S x S cells around the
point's cell: the k whose range is closest to the point's own range (weighted by an inverted
Gaussian of the cell offset), ignoring votes further than ``cutoff`` metres in weighted range.
Semantics follow upstream ``postproc/KNN.py``: empty cells never win, cells beyond the image
border read range 0 and label 0, and class 0 ("unlabeled") never wins the vote.
"""

from __future__ import annotations

import math

import torch

__all__ = ["knn_labels"]


def _inverse_gaussian(search: int, sigma: float) -> torch.Tensor:
    """(S*S,) 1 - normalised Gaussian weights of the window offsets, row-major."""
    coords = torch.arange(search, dtype=torch.float64) - (search - 1) / 2.0
    d2 = coords[:, None] ** 2 + coords[None, :] ** 2
    g = torch.exp(-d2 / (2.0 * sigma * sigma)) / (2.0 * math.pi * sigma * sigma)
    return (1.0 - g / g.sum()).reshape(-1).float()


def knn_labels(cell_range: torch.Tensor, cell_labels: torch.Tensor, point_range: torch.Tensor,
               rows: torch.Tensor, cols: torch.Tensor, num_classes: int, *, knn: int = 7,
               search: int = 7, sigma: float = 1.0, cutoff: float = 2.0) -> torch.Tensor:
    """Per-point labels by a KNN vote in range-image space.

    Args:
        cell_range: (H, W) range of each cell's winning point, <= 0 where the cell is empty.
        cell_labels: (H, W) int64 per-cell class in [0, num_classes).
        point_range: (N,) range of every point (metres).
        rows, cols: (N,) int64 cell of every point.
        num_classes: classes of the network, class 0 being "unlabeled" (it never wins).
        knn, search, sigma, cutoff: upstream's ``post.KNN.params`` (search odd).

    Returns:
        (N,) int64 labels in [1, num_classes).
    """
    if search % 2 == 0:
        raise ValueError(f"search window must be odd, got {search}")
    h, w = cell_range.shape
    pad = (search - 1) // 2
    rng = torch.where(cell_range > 0, cell_range.float(), torch.full_like(cell_range, float("inf"), dtype=torch.float32))
    rng = torch.nn.functional.pad(rng, (pad, pad, pad, pad), value=0.0)  # border: range 0, as unfold
    lab = torch.nn.functional.pad(cell_labels, (pad, pad, pad, pad), value=0)

    offsets = torch.arange(search)
    dr = offsets.repeat_interleave(search)  # row-major window offsets, (S*S,)
    dc = offsets.repeat(search)
    r_idx = rows[None, :] + dr[:, None]  # (S*S, N) in padded coordinates
    c_idx = cols[None, :] + dc[:, None]
    flat = r_idx * (w + 2 * pad) + c_idx
    neigh_range = rng.reshape(-1)[flat]  # (S*S, N)
    neigh_label = lab.reshape(-1)[flat]
    centre = (search * search - 1) // 2
    neigh_range[centre] = point_range.float()  # the point's own cell counts with its own range

    dist = (neigh_range - point_range.float()[None, :]).abs() * _inverse_gaussian(search, sigma)[:, None]
    knn_dist, knn_idx = dist.topk(knn, dim=0, largest=False, sorted=False)  # (k, N)
    votes = neigh_label.gather(0, knn_idx)
    if cutoff > 0:
        votes = torch.where(knn_dist > cutoff, torch.full_like(votes, num_classes), votes)
    counts = torch.zeros(num_classes + 1, votes.shape[1], dtype=torch.float32)
    counts.scatter_add_(0, votes, torch.ones_like(votes, dtype=torch.float32))
    return counts[1:num_classes].argmax(dim=0) + 1
