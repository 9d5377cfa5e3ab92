"""Scoring a segmenter on labeled frames (``pl3d eval``, training validation) and writing the report
(metrics.json, iou_table.txt, confusion PNGs, report.md and index.html with pictures of a few frames)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
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
    scores.update(gt, pred.in_view, pred.labels, pred.labels_2d, pred.labels_3d,
                  pred.timings_ms)
    return gt


def evaluate(infer: Callable[[Frame], Prediction], frames: Iterable[Frame], class_set: ClassSet,
             progress: Callable[[int], None] | None = None,
             on_frame: Callable[[Frame, Prediction, np.ndarray], None] | None = None) -> SegmentationScores:
    """Run ``infer`` on every labeled frame and accumulate the scores; ``on_frame`` gets each
    frame, its prediction and its (N,) train-id ground truth (e.g. ``PictureSampler.offer``)."""
    scores = SegmentationScores(class_set.num_classes)
    for i, frame in enumerate(frames):
        if frame.labels is None:
            raise ValueError(f"frame {frame.seq} has no ground-truth labels to score against")
        pred = infer(frame)
        gt = score_prediction(scores, frame, pred, class_set)
        if on_frame:
            on_frame(frame, pred, gt)
        if progress:
            progress(i + 1)
    return scores


def scores_markdown(summary: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Report lines of a scores summary: the mIoU table and the per-class IoU table."""
    return ["## mIoU (%)", "", "| | fused | 2D | 3D |", "|---|---|---|---|",
            f"| in view | {summary['miou']['fused']} | {summary['miou']['2d']} | {summary['miou']['3d']} |",
            f"| all points | {summary['miou_all_points']['fused']} | - | {summary['miou_all_points']['3d']} |",
            "", "## IoU per class, in view (%)", "", "```", format_table(summary, names), "```", ""]


def latency_markdown(latency_ms: dict[str, dict[str, float]]) -> list[str]:
    """Report lines of per-stage latency percentiles (ms)."""
    return (["## Latency (ms)", "", "| stage | p50 | p90 |", "|---|---|---|"]
            + [f"| {k} | {v['p50']} | {v['p90']} |" for k, v in latency_ms.items()])


def write_report(summary: dict[str, Any], class_set: ClassSet, out_dir: str | Path,
                 extra: dict[str, Any] | None = None, pictures: Sequence[dict[str, Any]] = ()) -> Path:
    """DIR/metrics.json, DIR/iou_table.txt, a confusion-matrix PNG per prediction kind, and
    DIR/report.md + DIR/index.html showing them with ``pictures`` (``PictureSampler.close()``:
    files already in DIR/pictures/)."""
    from pl3d_ros.eval.html_report import figures_markdown, write_index
    from pl3d_ros.eval.pictures import pictures_markdown
    from pl3d_ros.eval.plots import plot_confusion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {**(extra or {}), **summary, **({"pictures": list(pictures)} if pictures else {})}
    (out / "metrics.json").write_text(json.dumps(data, indent=2))
    (out / "iou_table.txt").write_text(format_table(summary, class_set.names) + "\n")
    plots = []
    for kind, matrix in summary["confusion"].items():
        plots.append(f"confusion_{kind}.png")
        plot_confusion(np.asarray(matrix), class_set.names, out / plots[-1],
                       title=f"{kind} prediction, in-view points (row-normalised)")
    title = f"Eval: {(extra or {}).get('checkpoint', 'model')}"
    lines = [f"# {title}", ""]
    lines += [f"- {key}: `{', '.join(map(str, v)) if isinstance(v, list) else v}`"
              for key, v in (extra or {}).items() if key in ("checkpoint", "inputs")]
    backend = (extra or {}).get("backend")
    if isinstance(backend, dict):
        lines.append(f"- backend: {backend.get('backend')}")
    lines += [f"- frames: {summary['frames']} scored, {summary['points_scored']:,} in-view points", ""]
    lines += scores_markdown(summary, class_set.names) + latency_markdown(summary["latency_ms"]) + [""]
    report = "\n".join(lines) + figures_markdown(out, plots, "Confusion matrices") + pictures_markdown(pictures)
    (out / "report.md").write_text(report)
    write_index(out, report, title)
    return out / "metrics.json"
