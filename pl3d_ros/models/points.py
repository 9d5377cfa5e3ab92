"""From dense branch outputs to per-point values, and the 2D/3D fusion (METHODS.md section 0).

These run in torch for every backend (a runtime's numpy outputs are wrapped with
``torch.from_numpy``, no copy), so training, adaptation and inference share one implementation.
"""

from __future__ import annotations

from concurrent.futures import Executor

import torch
import torch.nn.functional as F


def gather_cells(grid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per-point values of a range-image grid.

    grid: (1, C, H, W); rows, cols: (N,) int64 cell of each point -> (N, C).
    """
    return grid[0][:, rows, cols].transpose(0, 1)


def sample_pixels(grid: torch.Tensor, uv: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear sample of an image grid at continuous pixel coordinates.

    grid: (1, C, h, w); uv: (M, 2) pixels of an image of ``size`` (H, W) (default: the grid's
    own), pixel (0, 0)'s centre at (0, 0) -> (M, C). A grid coarser than that image (features
    at stride 2, say) is sampled at the same places: in align_corners=False coordinates both
    cover the same extent. Samples beyond the outer pixel centres clamp to the border.
    """
    return _sample_pixels_cm(grid, uv, size).transpose(0, 1)


def _sample_pixels_cm(grid: torch.Tensor, uv: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``sample_pixels`` in the class-major layout grid_sample produces: (C, M), contiguous."""
    h, w = size if size is not None else grid.shape[-2:]
    norm = torch.empty_like(uv, dtype=grid.dtype)
    norm[:, 0] = (uv[:, 0] + 0.5) * (2.0 / w) - 1.0  # align_corners=False convention
    norm[:, 1] = (uv[:, 1] + 0.5) * (2.0 / h) - 1.0
    out = F.grid_sample(grid, norm.view(1, 1, -1, 2), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0]


def entropy(p: torch.Tensor, eps: float = 1e-12, dim: int = -1) -> torch.Tensor:
    """(..., C) probabilities -> (...,) Shannon entropy in nats (classes along ``dim``)."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim)


def _fusion(prob_2d: torch.Tensor, prob_3d: torch.Tensor, bias: torch.Tensor | tuple[float, float] | None,
            dim: int) -> torch.Tensor:
    """The in-view fusion of ``fuse`` on matching (M, C) / (C, M) tensors, classes along ``dim``."""
    e2, e3 = -entropy(prob_2d, dim=dim), -entropy(prob_3d, dim=dim)
    if bias is not None:
        b = torch.as_tensor(bias, dtype=e2.dtype, device=e2.device)
        e2, e3 = e2 + b[0], e3 + b[1]
    w2, w3 = torch.exp(e2).unsqueeze(dim), torch.exp(e3).unsqueeze(dim)
    return (w2 * prob_2d + w3 * prob_3d) / (w2 + w3)


def fuse(prob_2d: torch.Tensor, prob_3d: torch.Tensor, in_view: torch.Tensor,
         bias: torch.Tensor | tuple[float, float] | None = None) -> torch.Tensor:
    """Entropy-weighted fusion of the branches (Latte): (M, C), (N, C), (N,) bool -> (N, C).

    In view, each branch is weighted by exp(-entropy + bias_b) and the weights normalised; out
    of view the 3D branch stands alone. ``bias`` (2,): log-weights of the 2D and 3D branch (the
    shift-aware fusion of ``adapt.fusion``; None or zeros: plain entropy weighting).
    """
    fused = prob_3d.clone()
    fused[in_view] = _fusion(prob_2d, prob_3d[in_view], bias, dim=-1)
    return fused


def _probs_2d(logits_2d: torch.Tensor, uv: torch.Tensor, size: tuple[int, int], threads: int = 1) -> torch.Tensor:
    """(C, M) softmax of the 2D logits sampled at uv, on ``threads`` torch threads (0: as set)."""
    if not threads:
        return _sample_pixels_cm(logits_2d, uv, size).softmax(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _sample_pixels_cm(logits_2d, uv, size).softmax(0)
    finally:
        torch.set_num_threads(before)


def max_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, K) -> (max (K,), argmax (K,) int64) over the class axis, the first maximal class on
    ties (as ``torch.max``). torch's max / argmax over a leading axis of a CPU tensor do not
    vectorise (3.4 / 24 ms for 10 x 124k values, loaded machine): ``amax`` does (0.2 ms), and the
    classes that reach it are marked one row at a time, last to first (3 ms for all ten)."""
    top = x.amax(0)
    arg = torch.full((x.shape[1],), x.shape[0] - 1, dtype=torch.int64, device=x.device)
    for c in range(x.shape[0] - 2, -1, -1):
        arg.masked_fill_(x[c] == top, c)
    return top, arg


def predict_points(logits_2d: torch.Tensor, logits_3d: torch.Tensor, uv: torch.Tensor, cells: torch.Tensor,
                   in_view: torch.Tensor, size: tuple[int, int],
                   bias: torch.Tensor | tuple[float, float] | None = None, executor: Executor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference's per-point postprocess in one pass over class-major (C, K) buffers.

    logits_2d (1, C, H, W) sampled bilinearly at uv (M, 2) pixels of an image of ``size`` (H, W)
    (``sample_pixels``); logits_3d (1, C, rows, cols) read at cells
    (N,) int64 = row * cols + col (``gather_cells``); in_view (N,) bool; bias as ``fuse``.

    Returns (prob_2d (C, M), prob_3d (C, N), labels (N,) int64, confidence (N,) float32): each
    branch's softmax and the argmax / max of the entropy-weighted fusion (``fuse``), which is
    formed for the M in-view points only (out of view it is the 3D branch itself). The class
    axis first keeps every step a sweep over contiguous rows: the softmax of a 124k-point scan
    over the (N, C) layout, 10 strided values at a time, took 15-25x longer. ``executor``: the 2D
    branch's sample and softmax run there (one torch thread) while the caller does the 3D one's.
    """
    if executor is not None:
        branch_2d = executor.submit(_probs_2d, logits_2d, uv, size)
    c = logits_3d.shape[1]
    p3 = logits_3d.reshape(c, -1).index_select(1, cells).softmax(0)
    confidence, labels = max_argmax(p3)
    p2 = branch_2d.result() if executor is not None else _probs_2d(logits_2d, uv, size, threads=0)
    view = torch.nonzero(in_view).squeeze(1)
    conf_v, labels_v = max_argmax(_fusion(p2, p3.index_select(1, view), bias, dim=0))
    confidence[view] = conf_v
    labels[view] = labels_v
    return p2, p3, labels, confidence
