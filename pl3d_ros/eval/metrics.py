"""Confusion matrices, IoU and latency percentiles: the numbers every evaluation reports.

IoU of class c = TP / (TP + FP + FN) over all points scored; the mean IoU averages the classes
whose union is non-empty (a class that is neither present nor predicted has no IoU, as in the
xMUDA and SemanticKITTI evaluators). Points whose ground truth is the ignore id are not scored.

On a short stream that convention is noisy: a class absent from the ground truth that a method
predicts at a handful of points enters the mean with IoU 0. On 20 frames of fog (KITTI 04 + 05,
338k points in view), 11 points called bike or person took one run's mIoU from 35.8 to 28.6
while its other classes were better. ``miou_present`` averages only the classes that occur in
the ground truth; the stray points still cost, as false negatives of their true class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

IGNORE = 255


class ConfusionMatrix:
    """Accumulates a (C, C) matrix, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore: int = IGNORE) -> None:
        self.num_classes = int(num_classes)
        self.ignore = ignore
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """pred, gt: (N,) integer train ids; gt == ignore is skipped, pred out of range is an error."""
        pred = np.asarray(pred).ravel().astype(np.int64)
        gt = np.asarray(gt).ravel().astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in length")
        keep = (gt != self.ignore) & (gt >= 0)
        pred, gt = pred[keep], gt[keep]
        if gt.size and (gt.max() >= self.num_classes or pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"ids outside [0, {self.num_classes}) in prediction or ground truth")
        self.matrix += np.bincount(gt * self.num_classes + pred,
                                   minlength=self.num_classes ** 2).reshape(self.matrix.shape)

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """(C,) IoU in [0, 1]; NaN for classes neither present nor predicted."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self) -> float:
        """Mean IoU in % over classes with a non-empty union (NaN when nothing was scored)."""
        iou = self.iou()
        return float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan")

    def miou_present(self) -> float:
        """Mean IoU in % over the classes that occur in the ground truth (NaN when none)."""
        present = self.matrix.sum(1) > 0
        return float(self.iou()[present].mean() * 100) if present.any() else float("nan")

    def iou_dict(self, names: Sequence[str]) -> dict[str, float | None]:
        """{class: IoU in %} with None for classes that have no IoU (JSON-friendly)."""
        return {n: (None if np.isnan(v) else round(float(v) * 100, 2)) for n, v in zip(names, self.iou())}


def percentiles(values: Iterable[float], qs: Sequence[int] = (50, 90)) -> dict[str, float]:
    """{"p50": ..., "p90": ...} of the values (NaN when empty)."""
    arr = np.asarray(list(values), np.float64)
    return {f"p{q}": (float(np.percentile(arr, q)) if arr.size else float("nan")) for q in qs}


@dataclass
class SegmentationScores:
    """Confusion matrices of the fused, 2D and 3D predictions, over in-view points and all points.

    ``2d`` exists only in view (the image branch sees nothing else).
    """

    num_classes: int
    in_view: dict[str, ConfusionMatrix] = field(init=False)
    all_points: dict[str, ConfusionMatrix] = field(init=False)
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    frames: int = 0

    def __post_init__(self) -> None:
        self.in_view = {k: ConfusionMatrix(self.num_classes) for k in ("fused", "2d", "3d")}
        self.all_points = {k: ConfusionMatrix(self.num_classes) for k in ("fused", "3d")}

    def update(self, gt: np.ndarray, in_view: np.ndarray, fused: np.ndarray, pred_2d: np.ndarray,
               pred_3d: np.ndarray, timings_ms: dict[str, float] | None = None) -> None:
        """gt, fused, pred_3d, in_view: (N,); pred_2d: (M,) for the M in-view points."""
        gt_v = gt[in_view]
        self.in_view["fused"].update(fused[in_view], gt_v)
        self.in_view["2d"].update(pred_2d, gt_v)
        self.in_view["3d"].update(pred_3d[in_view], gt_v)
        self.all_points["fused"].update(fused, gt)
        self.all_points["3d"].update(pred_3d, gt)
        for stage, ms in (timings_ms or {}).items():
            self.latency_ms[stage].append(float(ms))
        self.frames += 1

    def summary(self, names: Sequence[str]) -> dict:
        """The metrics.json contract of ``pl3d eval`` (mIoU and IoU in %, latency in ms)."""
        return {
            "frames": self.frames,
            "points_scored": self.in_view["fused"].total,
            "miou": {k: round(m.miou(), 2) for k, m in self.in_view.items()},
            "miou_all_points": {k: round(m.miou(), 2) for k, m in self.all_points.items()},
            "miou_present": {k: round(m.miou_present(), 2) for k, m in self.in_view.items()},
            "iou_per_class": {k: m.iou_dict(names) for k, m in self.in_view.items()},
            "iou_per_class_all_points": {k: m.iou_dict(names) for k, m in self.all_points.items()},
            "confusion": {k: m.matrix.tolist() for k, m in self.in_view.items()},
            "latency_ms": {s: {k: round(v, 2) for k, v in percentiles(vals).items()}
                           for s, vals in self.latency_ms.items()},
        }


def format_table(summary: dict, names: Sequence[str]) -> str:
    """A plain-text per-class IoU table (in-view points) plus the mIoU rows."""
    cols = list(summary["iou_per_class"])
    lines = [f"{'class':<16}" + "".join(f"{c:>9}" for c in cols)]
    for n in names:
        cells = [summary["iou_per_class"][c][n] for c in cols]
        lines.append(f"{n:<16}" + "".join(f"{'-' if v is None else f'{v:.1f}':>9}" for v in cells))
    lines.append(f"{'mIoU (in view)':<16}" + "".join(f"{summary['miou'][c]:>9.1f}" for c in cols))
    all_pts = summary["miou_all_points"]
    lines.append(f"{'mIoU (all pts)':<16}" + "".join(
        f"{all_pts[c]:>9.1f}" if c in all_pts else f"{'':>9}" for c in cols))
    return "\n".join(lines)
