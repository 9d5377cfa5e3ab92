"""Base pseudo-labels (METHODS.md section 0): fused teacher -> argmax + confidence -> class-wise
thresholds min(running median of the class's confidence, cap).

The running window. Keeping every confidence of the last 50 frames would hold ~6 million floats
for KITTI scans; a median of per-frame medians would weight a frame with 10 car points like one
with 10,000. Instead each frame contributes a per-class histogram of its confidences (``bins``
equal bins on [0, 1], default 1000, so the median is resolved to 1e-3) and the window keeps the
last ``window_frames`` histograms plus their running sum: memory window x C x bins int32
(50 x 10 x 1000 x 4 B = 2 MB), update O(C x bins) per frame, and the median is the exact median
of all the window's confidences of that class, to bin resolution.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from pl3d_ros.adapt.losses import IGNORE


class ClasswiseThresholds:
    """Running per-class confidence medians over the last ``window_frames`` frames."""

    def __init__(self, num_classes: int, window_frames: int, cap: float, bins: int = 1000) -> None:
        self.num_classes = int(num_classes)
        self.window_frames = int(window_frames)
        self.cap = float(cap)
        self.bins = int(bins)
        self._frames: deque[np.ndarray] = deque()
        self._sum = np.zeros((self.num_classes, self.bins), dtype=np.int64)

    def __len__(self) -> int:
        """Frames currently in the window."""
        return len(self._frames)

    def reset(self) -> None:
        self._frames.clear()
        self._sum[:] = 0

    def update(self, labels: np.ndarray, confidence: np.ndarray) -> None:
        """Add one frame: labels (N,) int class ids (argmax), confidence (N,) float in [0, 1]."""
        labels = np.asarray(labels, dtype=np.int64)
        b = np.clip((np.asarray(confidence, dtype=np.float64) * self.bins).astype(np.int64), 0, self.bins - 1)
        hist = np.bincount(labels * self.bins + b, minlength=self.num_classes * self.bins)
        hist = hist.reshape(self.num_classes, self.bins).astype(np.int32)
        self._frames.append(hist)
        self._sum += hist
        while len(self._frames) > self.window_frames:
            self._sum -= self._frames.popleft()

    def medians(self) -> np.ndarray:
        """(C,) float64 lower median of each class's confidences in the window, NaN for a class
        with none. Bin-resolved: the lower edge of the bin holding the median (1/bins)."""
        cum = np.cumsum(self._sum, axis=1)
        total = cum[:, -1]
        rank = (total + 1) // 2  # 1-based rank of the lower median
        idx = np.argmax(cum >= rank[:, None], axis=1)
        out = idx / self.bins
        return np.where(total > 0, out, np.nan)

    def thresholds(self) -> np.ndarray:
        """(C,) float64 min(median_c, cap); cap for classes not seen in the window."""
        med = self.medians()
        return np.where(np.isnan(med), self.cap, np.minimum(med, self.cap))


def argmax_confidence(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) fused probabilities -> (labels (N,) int64, confidence (N,) float)."""
    confidence, labels = fused.max(dim=1)
    return labels, confidence


def apply_thresholds(labels: torch.Tensor, confidence: torch.Tensor, thresholds: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Keep a point of class c if its confidence >= thresholds[c]: (N,), (N,), (C,) -> (N,) int64, -1 dropped."""
    thr = torch.as_tensor(thresholds, dtype=confidence.dtype, device=confidence.device)
    keep = confidence >= thr[labels]
    return torch.where(keep, labels, torch.full_like(labels, IGNORE))


class PseudoLabeler:
    """Section 0 online: each call adds the frame to the running window, then thresholds it."""

    def __init__(self, num_classes: int, window_frames: int, cap: float, bins: int = 1000) -> None:
        self.window = ClasswiseThresholds(num_classes, window_frames, cap, bins)

    def reset(self) -> None:
        self.window.reset()

    def __call__(self, fused: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """fused (N, C) teacher probabilities -> (labels (N,) int64 with -1 dropped, thresholds (C,)).

        The current frame is in the window before its thresholds are read (an offline median over
        a dataset includes every frame too).
        """
        labels, confidence = argmax_confidence(fused)
        self.window.update(labels.cpu().numpy(), confidence.float().cpu().numpy())
        thr = self.window.thresholds()
        return apply_thresholds(labels, confidence, thr), thr

    def relabel(self, fused: torch.Tensor) -> torch.Tensor:
        """Labels of a frame seen before (a memory frame) under the current thresholds, without
        adding it to the window again: (N, C) -> (N,) int64, -1 dropped."""
        labels, confidence = argmax_confidence(fused)
        return apply_thresholds(labels, confidence, self.window.thresholds())
