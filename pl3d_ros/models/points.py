"""From dense branch outputs to per-point values, and the 2D/3D fusion (METHODS.md section 0).

These run in torch for every backend (a runtime's numpy outputs are wrapped with
``torch.from_numpy``, no copy), so training, adaptation and inference share one implementation.
"""

from __future__ import annotations

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
    h, w = size if size is not None else grid.shape[-2:]
    norm = torch.empty_like(uv, dtype=grid.dtype)
    norm[:, 0] = (uv[:, 0] + 0.5) * (2.0 / w) - 1.0  # align_corners=False convention
    norm[:, 1] = (uv[:, 1] + 0.5) * (2.0 / h) - 1.0
    out = F.grid_sample(grid, norm.view(1, 1, -1, 2), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0].transpose(0, 1)


def entropy(p: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(..., C) probabilities -> (...,) Shannon entropy in nats."""
    return -(p * torch.log(p.clamp_min(eps))).sum(-1)


def fuse(prob_2d: torch.Tensor, prob_3d: torch.Tensor, in_view: torch.Tensor,
         bias: torch.Tensor | tuple[float, float] | None = None) -> torch.Tensor:
    """Entropy-weighted fusion of the branches (Latte): (M, C), (N, C), (N,) bool -> (N, C).

    In view, each branch is weighted by exp(-entropy + bias_b) and the weights normalised; out
    of view the 3D branch stands alone. ``bias`` (2,): log-weights of the 2D and 3D branch (the
    shift-aware fusion of ``adapt.fusion``; None or zeros: plain entropy weighting).
    """
    fused = prob_3d.clone()
    p3 = prob_3d[in_view]
    e2, e3 = -entropy(prob_2d), -entropy(p3)
    if bias is not None:
        b = torch.as_tensor(bias, dtype=e2.dtype, device=e2.device)
        e2, e3 = e2 + b[0], e3 + b[1]
    w2 = torch.exp(e2)
    w3 = torch.exp(e3)
    fused[in_view] = (w2[:, None] * prob_2d + w3[:, None] * p3) / (w2 + w3)[:, None]
    return fused
