"""Pseudo-label quality bookkeeping: density always, precision where ground truth exists.

Ground truth is only ever read here, for reporting; no training path touches it.

Stages: "base" (section 0), "refined" (after MLA/GAPP, section 1), "filtered" (after the
connectivity filter, section 2), "trained" (the cross-entropy targets after the reliability split,
section 4: what the student is trained on). A method that skips a stage reports the previous
stage's labels for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

STAGES = ("base", "refined", "filtered", "trained")


def label_counts(labels: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor | None,
                 num_classes: int) -> dict[str, np.ndarray]:
    """labels (N,) int pseudo-labels (-1 none); gt (N,) int train ids (-1 unknown) or None.

    -> {"labeled", "evaluated", "correct"}: (C,) int64 per predicted class: points labelled,
    labelled points with ground truth, and those whose label equals the ground truth.
    """
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, np.int64)
    has = lab >= 0
    out = {"labeled": np.bincount(lab[has], minlength=num_classes).astype(np.int64)}
    if gt is None:
        zero = np.zeros(num_classes, np.int64)
        out["evaluated"], out["correct"] = zero, zero.copy()
        return out
    g = np.asarray(gt.cpu() if isinstance(gt, torch.Tensor) else gt, np.int64)
    ev = has & (g >= 0)
    out["evaluated"] = np.bincount(lab[ev], minlength=num_classes).astype(np.int64)
    out["correct"] = np.bincount(lab[ev & (lab == g)], minlength=num_classes).astype(np.int64)
    return out


def summarise(counts: dict[str, np.ndarray], points: int) -> dict[str, float | None]:
    """density = labelled / points; precision = correct / evaluated (None without ground truth)."""
    labeled, evaluated, correct = (int(counts[k].sum()) for k in ("labeled", "evaluated", "correct"))
    return {"density": labeled / points if points else 0.0,
            "precision": correct / evaluated if evaluated else None}


class QualityTotals:
    """Per-frame counts of each stage, summed over a run, plus the last frame's summary."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.reset()

    def reset(self) -> None:
        self.frames = 0
        self.frames_with_gt = 0
        self.points = 0
        self.points_in_view = 0
        self.labeled_in_view = {s: 0 for s in STAGES}
        self.totals = {s: {k: np.zeros(self.num_classes, np.int64) for k in ("labeled", "evaluated", "correct")}
                       for s in STAGES}
        self.last: dict[str, Any] = {}

    def add(self, stages: dict[str, np.ndarray | torch.Tensor], gt: np.ndarray | torch.Tensor | None,
            in_view: np.ndarray | torch.Tensor | None = None) -> dict[str, Any]:
        """stages: {"base": labels, "refined": ..., "filtered": ...} (missing stages repeat the
        previous one) for one frame -> the frame's summary {"<stage>_density", "<stage>_precision"}.
        ``in_view`` (N,) bool also counts density among the points the camera sees, which is
        where mask refinement can act."""
        view = None if in_view is None else np.asarray(in_view.cpu() if isinstance(in_view, torch.Tensor)
                                                        else in_view, bool)
        n = None
        summary: dict[str, Any] = {}
        prev = None
        for s in STAGES:
            lab = stages.get(s, prev)
            if lab is None:
                continue
            prev = lab
            n = int(lab.shape[0])
            c = label_counts(lab, gt, self.num_classes)
            for k, v in c.items():
                self.totals[s][k] += v
            sm = summarise(c, n)
            if view is not None:
                lab_np = np.asarray(lab.cpu() if isinstance(lab, torch.Tensor) else lab)
                self.labeled_in_view[s] += int(np.count_nonzero(lab_np[view] >= 0))
            summary[f"{s}_density"] = sm["density"]
            summary[f"{s}_precision"] = sm["precision"]
        if n is not None:
            self.frames += 1
            self.frames_with_gt += int(gt is not None)
            self.points += n
            self.points_in_view += int(view.sum()) if view is not None else 0
        self.last = summary
        return summary

    def report(self) -> dict[str, Any]:
        """Totals over every frame added: per stage density, precision and per-class counts."""
        out: dict[str, Any] = {"frames": self.frames, "frames_with_gt": self.frames_with_gt, "points": self.points}
        for s in STAGES:
            c = self.totals[s]
            out[s] = {**summarise(c, self.points),
                      "density_in_view": (self.labeled_in_view[s] / self.points_in_view
                                          if self.points_in_view else None),
                      **{k: int(v.sum()) for k, v in c.items()},
                      "per_class": {k: v.tolist() for k, v in c.items()}}
        return out
