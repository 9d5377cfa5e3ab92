"""Scoring a segmenter on labeled frames (``pl3d eval``, training validation) and writing the report."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pl3d_ros.eval.metrics import SegmentationScores, format_table
from pl3d_ros.frame import Frame, Prediction
from pl3d_ros.labels import ClassSet


def score_prediction(scores: SegmentationScores, frame: Frame, pred: Prediction, class_set: ClassSet) -> np.ndarray:
    """Add one frame's fused / 2D / 3D predictions to ``scores`` (frame.labels are raw ids);
    returns the frame's (N,) train-id ground truth."""
    gt = class_set.to_train_ids(frame.labels)
    scores.update(gt, pred.in_view, pred.labels, pred.probs_2d.argmax(1), pred.probs_3d.argmax(1),
                  pred.timings_ms)
    return gt


def evaluate(infer: Callable[[Frame], Prediction], frames: Iterable[Frame], class_set: ClassSet,
             progress: Callable[[int], None] | None = None) -> SegmentationScores:
    """Run ``infer`` on every labeled frame and accumulate the scores."""
    scores = SegmentationScores(class_set.num_classes)
    for i, frame in enumerate(frames):
        if frame.labels is None:
            raise ValueError(f"frame {frame.seq} has no ground-truth labels to score against")
        score_prediction(scores, frame, infer(frame), class_set)
        if progress:
            progress(i + 1)
    return scores


def write_report(summary: dict[str, Any], class_set: ClassSet, out_dir: str | Path,
                 extra: dict[str, Any] | None = None) -> Path:
    """DIR/metrics.json, DIR/iou_table.txt and a confusion-matrix PNG per prediction kind."""
    from pl3d_ros.eval.plots import plot_confusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {**(extra or {}), **summary}
    (out / "metrics.json").write_text(json.dumps(data, indent=2))
    (out / "iou_table.txt").write_text(format_table(summary, class_set.names) + "\n")
    for kind, matrix in summary["confusion"].items():
        plot_confusion(np.asarray(matrix), class_set.names, out / f"confusion_{kind}.png",
                       title=f"{kind} prediction, in-view points (row-normalised)")
    return out / "metrics.json"
