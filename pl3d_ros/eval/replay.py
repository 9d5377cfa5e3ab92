"""Replay a recording through the segmenter and an adaptation method, as a deployed node sees it.

Protocol (online): the prediction scored for frame t is made with the weights deployed *before*
the model adapts on frame t. ``lockstep`` runs inference then ``steps_per_frame`` adaptation steps
on one thread, frame after frame: reproducible with a seed. ``realtime`` runs the node's runner
(inference thread + adaptation thread) with frames fed at their recorded rate, so slow adaptation
means fewer steps and dropped inference frames count as they would on a robot.

Unlabelled inputs (the normal case on a robot) are labelled, timed and their pseudo-labels
measured; nothing is scored, and the report says so. No usable frame at all raises ReplayError.

Writes into the output folder:
    metrics.json    the keys of ``pl3d eval`` (``frames``: the scored ones) + method, corruption,
                    mode, adapt_steps, weight_swaps, pseudo_labels {"base"|"refined"|"filtered":
                    {density, precision}} (%), frames_processed / frames_scored, and per input
                    what was read and skipped by reason (inputs_read, frames_skipped)
    report.md       per-class tables and the run's settings, the plots and pictures embedded
    index.html      report.md as one self-contained page (eval/html_report.py)
    miou_over_frames.png, confusion_fused.png, latency_hist.png
    pictures/       frame_<seq>_{camera,bev,errors}.png of the first, a middle and the last frame
                    (eval/pictures.py), drawn from the prediction scored for that frame
    confusion_per_frame.npy   (F, C, C) int64 fused in-view confusion of each scored frame
    labeled.mcap/   a ROS 2 bag: camera, CameraInfo, /tf_static, the segmentation cloud
                    (x y z intensity label confidence) and the visualization cloud (+ rgb)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pl3d_ros.config import Config
from pl3d_ros.eval.corruptions import apply as apply_corruptions
from pl3d_ros.eval.corruptions import parse_spec
from pl3d_ros.eval.evaluate import latency_markdown, score_prediction, scores_markdown
from pl3d_ros.eval.html_report import figures_markdown, write_index
from pl3d_ros.eval.metrics import ConfusionMatrix, SegmentationScores, percentiles
from pl3d_ros.eval.pictures import PictureSampler, expected_count, pictures_markdown
from pl3d_ros.frame import Frame, Prediction
from pl3d_ros.io.bag import BagTopics
from pl3d_ros.io.sources import ReadOptions, describe_skips, frames_skipped, open_source

log = logging.getLogger(__name__)

SEGMENTATION_TOPIC = "/pl3d/output/pointcloud/segmentation"
VISUALIZATION_TOPIC = "/pl3d/output/pointcloud/visualization"
REPLAY_PLOTS = ("miou_over_frames.png", "confusion_fused.png", "latency_hist.png")


@dataclass
class ReplayOptions:
    """How to replay (what to run is ``config``: adapt.method and its settings, runtime.backend,
    runtime.threads, ...). corrupt: e.g. "fog:3,night:2"; mode: lockstep | realtime; seed: the
    corruptions' and the adapter's; label: the run's name in tables and plots (default: the
    method)."""

    corrupt: str = ""
    mode: str = "lockstep"
    seed: int = 0
    max_frames: int | None = None
    write_bag: bool = True
    plots: bool = True
    pictures: bool = True  # camera / bird's-eye / error PNGs of a few frames (eval/pictures.py)
    label: str = ""
    config: Config = field(default_factory=Config)
    topics: BagTopics = field(default_factory=BagTopics)  # slop and extrinsics: config sync / frames


class ReplayError(RuntimeError):
    """Nothing could be replayed (no usable frame in the inputs)."""


def read_options(cfg: Config, topics: BagTopics | None = None) -> ReadOptions:
    """Reading options from the settings: ``sync.slop_s``, ``frames.static_extrinsics``,
    ``frames.odom_frame``."""
    ext = cfg.frames.static_extrinsics
    return ReadOptions(topics or BagTopics(), cfg.sync.slop_s,
                       np.asarray(ext, np.float64).reshape(4, 4) if ext else None, cfg.frames.odom_frame)


class LabeledBagWriter:
    """The replay's output bag: what RViz or Foxglove shows for a labeled stream."""

    def __init__(self, path: Path, class_set) -> None:
        from pl3d_ros.io.bag import BagWriter

        self.class_set = class_set
        self.writer = BagWriter(path, overwrite=True)
        self.writer.__enter__()
        self._tf_written = False

    def write(self, frame: Frame, pred: Prediction) -> None:
        from pl3d_ros.io import ros_msgs
        from pl3d_ros.io.frames import output_arrays
        from pl3d_ros.transforms import invert

        w, f = self.writer, self.writer.factory
        lidar = frame.lidar_frame_id or "velodyne"
        camera = frame.camera.frame_id or "camera_optical"
        if not self._tf_written:
            w.write_static_transform(frame.stamp_ns, lidar, camera, invert(frame.camera.T_cam_lidar))
            self._tf_written = True
        w.write_frame(frame.stamp_ns, frame.points, frame.image, frame.camera, lidar, camera)
        header = ros_msgs.make_header(f, frame.stamp_ns, lidar)
        seg, vis = output_arrays(frame, pred, self.class_set)
        w.write(SEGMENTATION_TOPIC, ros_msgs.make_cloud(f, header, seg), frame.stamp_ns)
        w.write(VISUALIZATION_TOPIC, ros_msgs.make_cloud(f, header, vis), frame.stamp_ns)

    def close(self, ok: bool = True) -> None:
        self.writer.__exit__(None if ok else RuntimeError, None, None)


def _pseudo_label_summary(totals: dict[str, Any] | None) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for stage in ("base", "refined", "filtered", "trained"):
        s = (totals or {}).get(stage)
        if not s:
            continue
        out[stage] = {"density": round(100 * s["density"], 2),
                      "precision": None if s["precision"] is None else round(100 * s["precision"], 2),
                      "density_in_view": (None if s.get("density_in_view") is None
                                          else round(100 * s["density_in_view"], 2))}
    return out


def replay(inputs: str | Path | list[str | Path], checkpoint: str | Path, out_dir: str | Path,
           opts: ReplayOptions, progress: Callable[[int, dict[str, float]], None] | None = None
           ) -> dict[str, Any]:
    """Run one method over the inputs, played one after the other as one stream (see the module
    docstring); returns the metrics dict."""
    import torch

    from pl3d_ros.app import build

    if opts.mode not in ("lockstep", "realtime"):
        raise ValueError(f"mode must be lockstep or realtime, got {opts.mode!r}")
    cfg = opts.config.validate()
    method = cfg.adapt.method
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    reading = read_options(cfg, opts.topics)
    sources = [open_source(p, reading) for p in inputs]  # fail early on a bad path, before the model loads
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    torch.manual_seed(opts.seed)
    # Lockstep runs everything on this thread: the backend takes runtime.threads as given;
    # realtime splits the CPU as the node does (the thread budget).
    app = build(cfg, checkpoint=checkpoint, seed=opts.seed,
                threads=cfg.runtime.threads if opts.mode == "lockstep" else None)
    header, seg, adapter, backend = app.header, app.segmenter, app.adapter, app.segmenter.backend
    class_set = header.class_set
    corruptions = parse_spec(opts.corrupt, sensor=header.sensor)

    scores = SegmentationScores(class_set.num_classes)
    latency: dict[str, list[float]] = {}  # every frame's, scored or not
    counts = {"processed": 0, "scored": 0}
    per_frame: list[float] = []
    frame_confusion: list[np.ndarray] = []  # (C, C) fused, in view, per scored frame (window mIoU)
    running: list[float] = []
    adapt_ms: list[float] = []
    bag = LabeledBagWriter(out / "labeled.mcap", class_set) if opts.write_bag else None
    input_name = " + ".join(str(p) for p in inputs)
    # Realtime mode draws at the end: record runs on the inference thread there.
    sampler = PictureSampler(out, class_set, expected_count([s.length for s in sources], opts.max_frames),
                             draw_now=opts.mode == "lockstep") if opts.pictures else None

    def frames():
        t, last_ns = 0, None
        for src in sources:
            shift = None
            for frame in src.frames():
                if opts.max_frames is not None and t >= opts.max_frames:
                    return
                # One stream: when the next input starts at or before the end of the previous one
                # (two KITTI sequences both start at 0 s), shift it to follow 0.1 s later.
                if shift is None:
                    shift = 0 if last_ns is None or frame.stamp_ns > last_ns else \
                        last_ns + 100_000_000 - frame.stamp_ns
                frame.stamp_ns += shift
                frame.seq = t
                last_ns = frame.stamp_ns
                yield apply_corruptions(frame, corruptions, (opts.seed, t)) if corruptions else frame
                t += 1

    def record(frame: Frame, pred: Prediction) -> None:
        counts["processed"] += 1
        gt = None
        for stage, ms in pred.timings_ms.items():
            latency.setdefault(stage, []).append(float(ms))
        if frame.labels is not None:
            counts["scored"] += 1
            gt = score_prediction(scores, frame, pred, class_set)
            cm = ConfusionMatrix(class_set.num_classes)
            cm.update(pred.labels[pred.in_view], gt[pred.in_view])
            per_frame.append(cm.miou())
            frame_confusion.append(cm.matrix.copy())
            running.append(scores.in_view["fused"].miou())
        if bag:
            bag.write(frame, pred)
        if progress:
            progress(counts["processed"], {"miou": running[-1] if running else float("nan")})
        if sampler:
            sampler.offer(frame, pred, gt)

    t_start = time.perf_counter()
    ok = False
    try:
        if opts.mode == "lockstep":
            for frame in frames():
                pred = seg.infer(frame)  # deployed weights, before adapting on this frame
                record(frame, pred)
                if adapter is not None:
                    t0 = time.perf_counter()
                    adapter.step(frame, pred.inputs)
                    adapt_ms.append((time.perf_counter() - t0) * 1e3)
                del pred
            runner_health: dict[str, Any] = {}
        else:
            runner_health = _run_realtime(app, frames(), record)
        ok = True
    finally:
        if bag:
            bag.close(ok)
        app.close()
    wall_s = time.perf_counter() - t_start

    inputs_read = [{"input": str(src.path), "kind": src.kind, **src.stats,
                    "skip_reasons": describe_skips(src.stats)} for src in sources]
    if counts["processed"] == 0:
        raise ReplayError("no frame could be used: " + "; ".join(
            f"{i['input']}: {i['skip_reasons']}" for i in inputs_read))
    if counts["scored"] == 0:
        log.warning("the inputs carry no ground-truth labels: frames were labelled and timed, nothing was scored")
    health = adapter.health() if adapter is not None else None
    pictures = sampler.close() if sampler else []
    summary = scores.summary(class_set.names)
    summary["latency_ms"] = {s: {k: round(v, 2) for k, v in percentiles(vals).items()} for s, vals in latency.items()}
    if adapt_ms:
        summary["latency_ms"]["adaptation"] = {k: round(float(np.percentile(adapt_ms, q)), 2)
                                               for k, q in (("p50", 50), ("p90", 90))}
    metrics = {
        "input": input_name, "checkpoint": str(app.checkpoint), "method": method,
        "label": opts.label or method, "corruption": opts.corrupt or "none", "mode": opts.mode,
        "seed": opts.seed, "backend": backend.describe(),
        "steps_per_frame": cfg.adapt.steps_per_frame if opts.mode == "lockstep" else None,
        "disabled_components": list(cfg.adapt.disable) if method == "full" else [],
        "components": cfg.adapt.components(),
        "adapt_steps": health.steps if health else 0, "weight_swaps": int(backend.swaps),
        "adapter_errors": health.errors if health else 0,
        "restores": {"collapse": health.collapse_restores if health else 0,
                     "domain_change": health.domain_resets if health else 0},
        "source_switches": health.source_switches if health else 0,
        "pseudo_labels": _pseudo_label_summary(adapter.pseudo_label_totals() if adapter else None),
        "frames_processed": counts["processed"], "frames_scored": counts["scored"],
        "inputs_read": inputs_read,
        "frames_skipped": sum(frames_skipped(i) for i in inputs_read),
        "wall_s": round(wall_s, 1),
        **summary,
        "miou_per_frame": [round(v, 2) for v in per_frame],
        "miou_running": [round(v, 2) for v in running],
        "pictures": pictures,
    }
    if runner_health:
        metrics["runner"] = runner_health
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if frame_confusion:  # mIoU over any window of frames is computed from these (pl3d bench)
        np.save(out / "confusion_per_frame.npy", np.stack(frame_confusion).astype(np.int64))
    if opts.plots:
        from pl3d_ros.eval.plots import plot_confusion, plot_latency, plot_series

        if per_frame:
            plot_series({metrics["label"]: running}, out / "miou_over_frames.png",
                        ylabel="running fused mIoU, in view (%)",
                        title=f"{metrics['label']} ({metrics['corruption']})")
            plot_confusion(np.asarray(summary["confusion"]["fused"]), class_set.names, out / "confusion_fused.png")
        plot_latency(latency | ({"adaptation": adapt_ms} if adapt_ms else {}), out / "latency_hist.png")
    report = (markdown_report(metrics, class_set.names) + "\n" + figures_markdown(out, REPLAY_PLOTS)
              + pictures_markdown(pictures))
    (out / "report.md").write_text(report)
    write_index(out, report, f"Replay: {metrics['label']} on {input_name}")
    return metrics


def _run_realtime(app, frames, record) -> dict[str, Any]:
    """Feed frames at their recorded rate into the node's runner (inference + adaptation threads,
    same thread budget, priorities and weight deployer as the node); frames that arrive while
    inference is busy replace the waiting one and are counted as dropped, as on a robot."""
    from pl3d_ros.runner import Runner, RunnerSettings

    runner = Runner(app.segmenter, record, app.adapter, deployer=app.deployer,
                    settings=RunnerSettings.from_config(app.cfg, app.adapter is not None))
    runner.start()
    try:
        t0_wall, t0_stamp = None, None
        for frame in frames:
            if t0_wall is None:
                t0_wall, t0_stamp = time.perf_counter(), frame.stamp_ns
            delay = (frame.stamp_ns - t0_stamp) * 1e-9 - (time.perf_counter() - t0_wall)
            if delay > 0:
                time.sleep(delay)
            runner.submit(frame)
        deadline = time.perf_counter() + 60.0
        while time.perf_counter() < deadline:  # let the last frame through inference
            h = runner.health()
            if h.pending == 0 and h.in_flight == 0:
                break
            time.sleep(0.05)
    finally:
        runner.stop(timeout_s=10.0)
    return runner.health().to_dict()


def markdown_report(metrics: dict[str, Any], names: list[str] | tuple[str, ...]) -> str:
    """The human-readable page of one replay."""
    lines = [f"# Replay: {metrics['label']} on {metrics['input']}", "",
             f"- checkpoint: `{metrics['checkpoint']}`",
             f"- method: {metrics['method']}" + (f" (components: {', '.join(metrics['components'])})"
                                                 if metrics.get("components") else ""),
             f"- corruption: {metrics['corruption']}; mode: {metrics['mode']}"
             + (f", {metrics['steps_per_frame']} adaptation step(s) per frame" if metrics["steps_per_frame"] else ""),
             f"- frames: {metrics['frames_processed']} labelled, {metrics['frames_scored']} scored"
             + ("" if metrics["frames_scored"] else " (the inputs carry no ground-truth labels: nothing was scored)")
             + f"; adaptation steps: {metrics['adapt_steps']}, "
             f"weight swaps: {metrics['weight_swaps']}, adapter errors: {metrics['adapter_errors']}",
             "- inputs: " + "; ".join(f"`{i['input']}` {i['frames']} frames, {frames_skipped(i)} skipped"
                                      + (f" ({i['skip_reasons']})" if frames_skipped(i) or i.get("truncated") else "")
                                      for i in metrics["inputs_read"]),
             f"- wall time: {metrics['wall_s']} s", "", *scores_markdown(metrics, names)]
    if metrics["pseudo_labels"]:
        lines += ["## Pseudo-labels (%)", "", "| stage | density | density in view | precision |",
                  "|---|---|---|---|"]
        for stage, v in metrics["pseudo_labels"].items():
            lines.append(f"| {stage} | {v['density']} | {v.get('density_in_view') or '-'} | "
                         f"{v['precision'] if v['precision'] is not None else '-'} |")
        lines.append("")
    lines += latency_markdown(metrics["latency_ms"])
    lines += ["", "Labeled bag: `labeled.mcap/` (play it with `ros2 bag play` and open RViz or Foxglove).", ""]
    return "\n".join(lines)
