"""The ``pl3d`` command: one entry point, one subcommand per job.

Each subcommand is a thin wrapper: argument parsing and printing here, the work in the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pl3d_ros import __version__, registry

log = logging.getLogger("pl3d")


def _progress(desc: str, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)
        if done >= _total:
            bar.close()

    return update


def cmd_kitti2bag(args: argparse.Namespace) -> int:
    from pl3d_ros.io.kitti import KittiSequence, sequence_to_bag

    seq = KittiSequence(args.sequence)
    n = len(seq) if args.max_frames is None else min(len(seq), args.max_frames)
    t0 = time.perf_counter()
    written = sequence_to_bag(
        args.sequence, args.output, storage=args.storage, start_ns=int(args.start_time * 1e9),
        distro=args.distro, max_frames=args.max_frames, progress=_progress("kitti2bag", n),
    )
    size = sum(p.stat().st_size for p in Path(args.output).rglob("*") if p.is_file())
    print(f"wrote {written} frames to {args.output} ({args.storage}, {size / 1e6:.1f} MB) "
          f"in {time.perf_counter() - t0:.1f} s; labels: {'yes' if seq.has_labels else 'no'}")
    return 0


def cmd_bag_info(args: argparse.Namespace) -> int:
    from pl3d_ros.io.bag import BagReader

    cfg = _config(args, reading=True)
    o = _read_options(args, cfg)
    reader = BagReader(args.bag, o.topics, slop_s=o.slop_s, T_cam_lidar=o.T_cam_lidar)
    info = reader.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if "sync" in info else 1
    print(f"bag:       {info['path']}")
    print(f"duration:  {info['duration_s']:.3f} s, {info['messages']} messages")
    print(f"{'topic':<28} {'type':<32} {'count':>6} {'rate Hz':>8}")
    for topic, entry in sorted(info["topics"].items()):
        rate = f"{entry['rate_hz']:.2f}" if entry["rate_hz"] else "-"
        print(f"{topic:<28} {entry['type']:<32} {entry['count']:>6} {rate:>8}")
    if "sync" in info:
        s = info["sync"]
        print(f"sync:      cloud {s['cloud']} + image {s['image']} + info {s['camera_info']}, "
              f"slop {s['slop_s']} s")
        print(f"tf frames: {', '.join(info['tf_frames']) or 'none'}")
    else:
        print(f"sync:      impossible: {info['sync_error']}")
    from pl3d_ros.io.sources import describe_skips

    st = info["stats"]
    print(f"synced frames: {info['synced_frames']}, skipped {st['skipped']}"
          + (f" (frames: {describe_skips(st)})" if st["frames_skipped"] or st["truncated"] else ""))
    return 0 if "sync" in info else 1  # a replay of this bag would fail: say so to scripts too


def cmd_export(args: argparse.Namespace) -> int:
    from pl3d_ros.models.checkpoint import load_checkpoint
    from pl3d_ros.runtime.export import write_export

    model, header = load_checkpoint(args.checkpoint)
    onnx_path, json_path = write_export(model, header, args.output)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and {json_path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import torch

    from pl3d_ros.labels import load_class_set
    from pl3d_ros.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from pl3d_ros.models.importer import (compose, import_image, import_range, import_record,
                                          parse_size, same_outputs)
    from pl3d_ros.models.pretrained import PretrainedError

    if not (args.range or args.image):
        raise CheckpointError("nothing to import: give --range DIR and/or --image FILE")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_checkpoint(args.base) if args.base else None
    class_set = load_class_set(args.class_set or (base[1].class_set.name if base else "xmuda10"))
    try:
        size = parse_size(args.image_size) if args.image_size else None
        range_part = import_range(args.range, class_set, args.range_licence) if args.range else None
        image_part = import_image(args.image, class_set, args.image_licence) if args.image else None
    except (PretrainedError, ValueError) as exc:
        raise CheckpointError(str(exc)) from exc
    for part in (range_part, image_part):
        if part is not None:
            print(part.summary)
            for note in part.spec.notes:
                print(f"  note: {note}")
    if base is not None:
        kept = "image" if image_part is None else "range"
        arch = getattr(base[1].model, f"{kept}_arch")
        print(f"{kept}: {arch} branch from {args.base}")
    net, header = compose(class_set, range_part=range_part, image_part=image_part, base=base,
                          image_size=size, training=import_record(args.range, args.image, args.base,
                                                                  base[1] if base else None))
    m, s = header.model, header.sensor
    print(f"network: {m.image_arch} {m.image_width}x{m.image_height} + {m.range_arch} {s.rows}x{s.cols}, "
          f"{class_set.name} ({class_set.num_classes} classes), "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")
    path = save_checkpoint(args.output, net, header)
    reloaded, _ = load_checkpoint(path)
    if not same_outputs(net, reloaded, header):
        raise CheckpointError(f"{path}: the reloaded checkpoint computes something else than the imported network")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); reloaded strictly from its header: same outputs")
    return 0


def cmd_build_engine(args: argparse.Namespace) -> int:
    from pl3d_ros.runtime.tensorrt_backend import build_engine_from_export

    t0 = time.perf_counter()
    path = build_engine_from_export(args.export_dir, args.precision, cache_dir=args.cache_dir,
                                    force=args.force)
    print(f"engine ready: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pl3d_ros.eval.replay import ReplayOptions, replay

    changes = {"adapt.method": args.method, "runtime.backend": args.backend, "runtime.threads": args.threads}
    for flag in ("disable", "enable"):
        if getattr(args, flag):
            changes[f"adapt.{flag}"] = [c.strip() for c in getattr(args, flag).split(",") if c.strip()]
    if args.steps_per_frame:
        changes["adapt.steps_per_frame"] = args.steps_per_frame
    cfg = _config(args, reading=True).replace(**{k: v for k, v in changes.items() if v is not None})
    opts = ReplayOptions(corrupt=args.corrupt or "", mode=args.mode, seed=args.seed, max_frames=args.max_frames,
                         write_bag=not args.no_bag, label=args.label or "", config=cfg,
                         topics=_read_options(args, cfg).topics)
    bar = tqdm(desc=f"replay {cfg.adapt.method}", unit="frame", file=sys.stderr, dynamic_ncols=True,
               total=args.max_frames)

    def progress(done: int, info: dict) -> None:
        bar.update(done - bar.n)
        bar.set_postfix(miou=f"{info['miou']:.1f}")

    metrics = replay(args.input, args.model, args.out, opts, progress)
    bar.close()
    scored = (f"mIoU fused {metrics['miou']['fused']:.1f} / 2D {metrics['miou']['2d']:.1f} / "
              f"3D {metrics['miou']['3d']:.1f} over {metrics['frames_scored']} scored frames"
              if metrics["frames_scored"] else "no ground-truth labels: nothing scored")
    print(f"{metrics['label']} on {metrics['input']} ({metrics['corruption']}, {metrics['mode']}): "
          f"{metrics['frames_processed']} frames labelled; {scored}; "
          f"{metrics['adapt_steps']} adaptation steps, {metrics['weight_swaps']} weight swaps")
    for i in metrics["inputs_read"]:
        if i.get("frames_skipped") or i.get("truncated"):
            print(f"WARNING: {i['input']}: {i.get('frames_skipped', 0)} frame(s) skipped: {i['skip_reasons']}")
    for stage, v in metrics["pseudo_labels"].items():
        print(f"pseudo-labels {stage}: density {v['density']}% (in view {v.get('density_in_view')}%), "
              f"precision {v['precision']}%")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pl3d_ros.eval.bench import load_grid, run_grid

    def names(text: str | None) -> list[str] | None:
        return [n.strip() for n in text.split(",") if n.strip()] if text else None

    try:
        seeds = [int(s) for s in names(args.seeds)] if args.seeds else None
    except ValueError:
        from pl3d_ros.config import ConfigError

        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    grid = load_grid(args.grid).select(methods=names(args.only_methods), streams=names(args.only_streams),
                                       seeds=seeds, max_frames=args.max_frames, model=args.model)
    results = run_grid(grid, args.out, workers=args.workers, address=args.address, cache=args.cache,
                       run=not args.merge_only)
    print((Path(args.out) / "results.md").read_text())
    c = results["counts"]
    print(f"{c['cells']} cells: {c['ran']} ran, {c['resumed']} resumed, {c['failed']} failed, "
          f"{c['missing']} missing; "
          f"results: {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.json'}")
    return 1 if c["failed"] else 0  # scripts see a grid with failed cells


def cmd_sim(args: argparse.Namespace) -> int:
    from pl3d_ros.sim.presets import PRESETS

    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name:<10} {preset.describe}")
        return 0
    if not args.preset or not args.output or not args.frames:
        print("pl3d sim: error: --preset, --frames and -o are required (or --list)", file=sys.stderr)
        return 2
    from pl3d_ros.sim.sequence import write_bag

    t0 = time.perf_counter()
    n = write_bag(args.preset, args.frames, args.output, seed=args.seed, storage=args.storage,
                  progress=_progress(f"sim {args.preset}", args.frames))
    print(f"wrote {n} frames of preset '{args.preset}' to {args.output} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pl3d_ros.demo import DEMO_FRAMES, DEMO_PRESET, format_summary, run_demo

    summary = run_demo(args.out, preset=args.preset or DEMO_PRESET, frames=args.frames or DEMO_FRAMES,
                       model=args.model, threads=args.threads, refresh=args.refresh)
    print(format_summary(summary))
    print(f"reports: {args.out}/source, {args.out}/full (report.md, plots, labeled.mcap); "
          f"{args.out}/miou_over_frames.png")
    return 0


def _config(args: argparse.Namespace, reading: bool = False):
    """The settings of ``--config`` (a params file or nested YAML), else the defaults; with
    ``reading``, ``--slop`` and ``--extrinsics`` override sync.slop_s / frames.static_extrinsics."""
    from pl3d_ros.config import Config

    cfg = Config.from_yaml(args.config) if getattr(args, "config", None) else Config()
    if reading:
        changes = {}
        if getattr(args, "slop", None) is not None:
            changes["sync.slop_s"] = args.slop
        if getattr(args, "extrinsics", None):
            changes["frames.static_extrinsics"] = [v for v in args.extrinsics.replace(",", " ").split()]
        cfg = cfg.replace(**changes) if changes else cfg
    return cfg


def _add_read_options(p: argparse.ArgumentParser) -> None:
    """The options every command that reads bags shares (topics, slop, extrinsics)."""
    p.add_argument("--image-topic", default=None, help="image topic (default /camera/image_raw, else the "
                   "bag's only Image topic); a name given here must be in the bag")
    p.add_argument("--camera-info-topic", default=None, help="CameraInfo topic (default /camera/camera_info)")
    p.add_argument("--cloud-topic", default=None, help="PointCloud2 topic (default /lidar/points)")
    p.add_argument("--slop", type=float, default=None, help="sync.slop_s: largest image-cloud stamp "
                   "difference that pairs, s (default: the --config's, 0.05)")
    p.add_argument("--extrinsics", default=None, help="frames.static_extrinsics: 16 numbers, row-major "
                   "4x4 T_cam_lidar (LiDAR -> camera optical), instead of the bag's TF")


def _read_options(args: argparse.Namespace, cfg):
    """ReadOptions from the command's topic options and the settings' slop and extrinsics."""
    from pl3d_ros.eval.replay import read_options
    from pl3d_ros.io.bag import BagTopics

    return read_options(cfg, BagTopics.given(args.image_topic, args.camera_info_topic, args.cloud_topic))


def _join_paths(paths) -> str:
    return ", ".join(str(p) for p in paths)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from pl3d_ros.app import build_segmenter
    from pl3d_ros.config import Config, ConfigError, ModelConfig, TrainingConfig
    from pl3d_ros.eval.evaluate import evaluate, write_report
    from pl3d_ros.io.sources import load_frames
    from pl3d_ros.labels import load_class_set
    from pl3d_ros.train.augment import AugmentConfig
    from pl3d_ros.train.trainer import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    init = None
    if args.init:
        from pl3d_ros.models.checkpoint import load_checkpoint

        if args.preset or args.config:
            raise ConfigError("--init takes the network and sensor from CKPT: drop --preset / --config")
        init = load_checkpoint(args.init, class_set=args.class_set)
        class_set, model_cfg, sensor = init[1].class_set, init[1].model, init[1].sensor
        print(f"fine-tuning {args.init} ({model_cfg.image_arch} + {model_cfg.range_arch}, {class_set.name})")
    else:
        base = TrainingConfig.from_yaml(args.config) if args.config else TrainingConfig()
        class_set = load_class_set(args.class_set or base.class_set)
        model_cfg = ModelConfig.from_preset(args.preset) if args.preset else base.model
        sensor = base.sensor
    frames = load_frames(args.data, require_labels=True)
    val_frames = load_frames(args.val, require_labels=True) if args.val else []
    print(f"training on {len(frames)} frames from {_join_paths(args.data)}"
          + (f"; validating on {len(val_frames)} frames from {_join_paths(args.val)}" if val_frames else ""))
    run_cfg = Config().replace(**{"runtime.backend": "torch"})

    last: dict = {}  # the latest validation summary; the trainer always validates its last epoch

    def validate(model, header):
        seg = build_segmenter(run_cfg, model, header)
        last["summary"] = evaluate(seg.infer, val_frames, class_set).summary(class_set.names)
        return last["summary"]["miou"]

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      val_every=args.val_every, time_limit_min=args.time_limit,
                      augment=AugmentConfig.none() if args.no_augment else AugmentConfig())
    summary = {"inputs": [str(p) for p in args.data], "frames": len(frames), "class_set": class_set.name}
    if init is not None:
        summary["init"] = {"checkpoint": str(args.init), "training": init[1].training}
    result = train(frames, args.out, class_set, model_cfg, sensor, cfg,
                   validate=validate if val_frames else None, data_summary=summary,
                   resume=args.resume, device=args.device, init=init)
    print(f"wrote {args.out} after {result['history'][-1]['epoch']} epochs "
          f"({result['history'][-1]['elapsed_s']:.0f} s on {result['device']})")
    if val_frames:
        if "summary" not in last:  # --resume of a finished run: no epoch ran here
            from pl3d_ros.models.checkpoint import load_checkpoint

            validate(*load_checkpoint(args.out))
        scores = last["summary"]  # the saved checkpoint's weights: no second pass over the set
        report = Path(args.report or Path(args.out).with_suffix("").as_posix() + "_report")
        write_report(scores, class_set, report, {"checkpoint": str(args.out), "training": result})
        from pl3d_ros.eval.metrics import format_table

        print(format_table(scores, class_set.names))
        print(f"report: {report}/ (metrics.json, iou_table.txt, confusion_*.png)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from pl3d_ros.app import build
    from pl3d_ros.eval.evaluate import evaluate, write_report
    from pl3d_ros.eval.metrics import format_table
    from pl3d_ros.eval.pictures import PictureSampler
    from pl3d_ros.io.sources import load_frames

    changes = {"runtime.backend": args.backend, "runtime.precision": args.precision, "runtime.threads": args.threads}
    cfg = _config(args, reading=True).replace(**{k: v for k, v in changes.items() if v is not None})
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    frames = load_frames(args.data, require_labels=True, options=_read_options(args, cfg))
    app = build(cfg, checkpoint=args.checkpoint, adapt=False, threads=cfg.runtime.threads)
    seg, header = app.segmenter, app.header
    seg.infer(frames[0])  # warm-up: first-run allocations are not the latency a user sees
    bar = _progress("eval", len(frames))
    pictures = PictureSampler(Path(args.out), header.class_set, expected=len(frames))
    scores = evaluate(seg.infer, frames, header.class_set, lambda done: bar(done, len(frames)), pictures.offer)
    summary = scores.summary(header.class_set.names)
    write_report(summary, header.class_set, args.out,
                 {"checkpoint": str(args.checkpoint), "inputs": [str(p) for p in args.data],
                  "backend": seg.backend.describe()}, pictures.close())
    print(format_table(summary, header.class_set.names))
    print("latency (ms): " + ", ".join(f"{k} p50 {v['p50']:.1f} / p90 {v['p90']:.1f}"
                                       for k, v in summary["latency_ms"].items()))
    print(f"wrote {Path(args.out) / 'metrics.json'}; report: {Path(args.out) / 'index.html'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pl3d_ros import params_files

    if args.write:
        for path in params_files.write(args.write):
            print(f"wrote {path}")
        return 0
    if args.check:
        stale = params_files.stale(args.check)
        if stale:
            print(f"stale in {args.check}: {', '.join(stale)}; run `pl3d config --write {args.check}`",
                  file=sys.stderr)
            return 1
        print(f"{args.check}: {params_files.YAML_NAME} and {params_files.SCHEMA_NAME} are up to date")
        return 0
    print(params_files.render_yaml(_config(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pl3d",
        description="Camera+LiDAR 3D semantic segmentation with online source-free adaptation "
                    "for ROS 2. Each subcommand works without ROS installed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pl3d kitti2bag ../shared/data/semantickitti-mini/sequences/00 -o /tmp/s00\n"
               "  pl3d bag-info /tmp/s00\n"
               "Run 'pl3d SUBCOMMAND --help' for each subcommand's options.",
    )
    parser.add_argument("--version", action="version", version=f"pl3d_ros {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")

    p = sub.add_parser(
        "kitti2bag", help="convert a SemanticKITTI sequence folder to a ROS 2 bag",
        description="Write a SemanticKITTI sequence (velodyne/, labels/, image_2/, calib.txt, "
                    "times.txt) as a ROS 2 bag: /camera/image_raw (rgb8), /camera/camera_info "
                    "(K of P2, P = [K|0]), /lidar/points (x y z intensity + raw 'label' uint32), "
                    "/tf_static (velodyne -> camera_color_left_optical, P2's baseline folded in).",
    )
    p.add_argument("sequence", help="sequence folder, e.g. .../sequences/00")
    p.add_argument("-o", "--output", required=True, help="bag folder to create")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="default: mcap")
    p.add_argument("--distro", choices=("humble", "jazzy"), default="humble",
                   help="message definitions to embed (default: humble)")
    p.add_argument("--start-time", type=float, default=1_317_000_000.0,
                   help="stamp of times.txt's 0 s, in seconds since the epoch (ROS treats 0 as unset)")
    p.add_argument("--max-frames", type=int, default=None, help="convert only the first N frames")
    p.set_defaults(func=cmd_kitti2bag)

    p = sub.add_parser(
        "bag-info", help="topics, counts, rates and what a replay would sync",
        description="Read a ROS 2 bag (folder, .mcap or .db3) and report its topics and how many "
                    "camera+LiDAR frames a replay would synchronise.",
    )
    p.add_argument("bag")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--config", default=None, help="settings YAML (its sync.slop_s, frames.static_extrinsics)")
    _add_read_options(p)
    p.set_defaults(func=cmd_bag_info)

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX (+ JSON sidecar)",
        description="Write DIR/model.onnx (opset 17, static shapes, both branches in one graph) "
                    "and DIR/model.json (inputs, outputs, classes, ONNX sha256, checkpoint header).",
    )
    p.add_argument("checkpoint", help="a pl3d_ros .safetensors checkpoint")
    p.add_argument("-o", "--output", required=True, help="folder to write into")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="compose a checkpoint from pretrained networks (lidar-bonnetal folder, ESPNetv2 file)",
        description="Write a two-stream checkpoint whose range branch is a 3D-MiniNet from a "
                    "lidar-bonnetal model folder (arch_cfg.yaml, data_cfg.yaml, backbone, "
                    "segmentation_decoder, segmentation_head) and whose image branch is an EdgeNets "
                    "ESPNetv2 Cityscapes state dict; either one may come from an existing checkpoint "
                    "instead (--from). Weight files are read with torch.load(weights_only=True), must "
                    "be plain tensor state dicts and load strictly; each branch's classes are mapped "
                    "onto the class set (log-sum-exp). The header records sizes, normalisation, class "
                    "maps, the sensor of arch_cfg.yaml, file names + sha256 and a licence note. The "
                    "written file is reloaded and checked to compute the same as the imported network.",
    )
    p.add_argument("--range", metavar="DIR", default=None, help="lidar-bonnetal model folder (3D-MiniNet)")
    p.add_argument("--image", metavar="FILE", default=None, help="ESPNetv2 state dict (EdgeNets, Cityscapes)")
    p.add_argument("--from", dest="base", metavar="CKPT", default=None,
                   help="checkpoint supplying the branch not imported")
    p.add_argument("--class-set", default=None, choices=("xmuda10", "semantickitti19"),
                   help="target classes (default: --from's, else xmuda10)")
    p.add_argument("--image-size", metavar="WxH", default=None,
                   help="image input (resize + centre crop; multiples of 16 for ESPNetv2); default 640x192 "
                        "for an imported image branch (1024x320: ~4 points more 2D mIoU on KITTI, none fused, "
                        "3x the image-branch time), "
                        "else --from's")
    p.add_argument("--range-licence", metavar="TEXT", default=None, help="licence note of the range weights "
                   "(default: from their label space, SemanticKITTI: CC BY-NC-SA 4.0)")
    p.add_argument("--image-licence", metavar="TEXT", default=None, help="licence note of the image weights "
                   "(default: Cityscapes terms, non-commercial)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "build-engine", help="build (or find cached) the TensorRT engine of an export folder",
        description="Build a TensorRT engine from DIR/model.onnx (written by `pl3d export`) with the "
                    "REFIT flag, into the engine cache (key: ONNX sha256, precision, TensorRT version, "
                    "GPU compute capability). Needs an NVIDIA GPU and `pip install '.[trt]'`.",
    )
    p.add_argument("export_dir")
    p.add_argument("--precision", choices=registry.PRECISIONS, default="fp16")
    p.add_argument("--cache-dir", default=None,
                   help="default: $PL3D_ENGINE_CACHE or ~/.cache/pl3d_ros/engines")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid entry exists")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser(
        "train", help="supervised source training on labeled KITTI folders or bags",
        description="Train both branches with class-weighted cross-entropy and augmentations. "
                    "Checkpoints after every epoch (CKPT + CKPT.train-state); --resume continues. "
                    "With --val, reports validation mIoU and writes a report folder at the end.",
    )
    p.add_argument("--data", nargs="+", required=True, help="SemanticKITTI sequence folders or labeled bags")
    p.add_argument("--val", nargs="*", default=[], help="validation inputs (same kinds)")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--preset", default=None,
                   help="model size preset: cpu | gpu (default: the config's model, i.e. cpu)")
    p.add_argument("--config", default=None,
                   help="training settings YAML: class_set, model and sensor sections (pl3d_ros.config."
                        "TrainingConfig; default: built-in)")
    p.add_argument("--class-set", default=None, help="class set (default: the --config's, xmuda10)")
    p.add_argument("--val-every", type=int, default=5, help="validate every N epochs (and at the end)")
    p.add_argument("--time-limit", type=float, default=0.0, help="minutes; stop after the epoch that passes it")
    p.add_argument("--resume", action="store_true", help="continue from --out's training state")
    p.add_argument("--init", metavar="CKPT", default=None,
                   help="fine-tune this checkpoint (e.g. from `pl3d import`; its architecture, sensor and "
                        "class set are kept; consider a smaller --lr such as 1e-4)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--report", default=None, help="report folder (default: CKPT stem + _report)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="mIoU (fused, 2D, 3D) and latency of a checkpoint on labeled data",
        description="Writes DIR/metrics.json (frames, miou, miou_all_points, iou_per_class, "
                    "latency_ms), DIR/iou_table.txt and confusion-matrix PNGs; prints the table.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", choices=registry.BACKENDS.names, default=None,
                   help="runtime.backend (default: the --config's, onnxruntime)")
    p.add_argument("--precision", choices=registry.PRECISIONS, default=None, help="runtime.precision (TensorRT)")
    p.add_argument("--threads", type=int, default=None, help="runtime.threads")
    p.add_argument("--config", default=None, help="settings YAML (a params file or nested sections)")
    _add_read_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "replay", help="run a bag or KITTI folder through segmentation + online adaptation",
        description="Online protocol: frame t is scored with the weights deployed before adapting "
                    "on frame t. Writes DIR/metrics.json, DIR/report.md, PNG plots and a labeled "
                    "MCAP bag (DIR/labeled.mcap).",
    )
    p.add_argument("input", nargs="+", help="ROS 2 bag(s) or SemanticKITTI sequence folder(s), "
                   "played one after the other as one stream")
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--method", choices=registry.METHODS.names, default=None,
                   help="adapt.method (default: the --config's, full)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--corrupt", default="", help="domain shift, e.g. fog:3,night:2 (see pl3d corruptions)")
    p.add_argument("--mode", choices=("lockstep", "realtime"), default="lockstep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disable", default="",
                   help="components of full to switch off, comma-separated: " + ",".join(registry.COMPONENTS))
    p.add_argument("--enable", default="",
                   help="components of full that are off by default to switch on, comma-separated: "
                   + ",".join(registry.OFF_BY_DEFAULT))
    p.add_argument("--steps-per-frame", type=int, default=0, help="lockstep adaptation steps per frame")
    p.add_argument("--config", default=None, help="settings YAML (a params file or nested sections)")
    p.add_argument("--backend", choices=registry.BACKENDS.names, default=None,
                   help="runtime.backend (default: the --config's, onnxruntime)")
    p.add_argument("--threads", type=int, default=None, help="runtime.threads (0: all)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--no-bag", action="store_true", help="skip the labeled output bag")
    p.add_argument("--label", default=None, help="run name in tables and plots")
    _add_read_options(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "bench", help="a grid of methods x streams x seeds, each cell a replay on Ray, merged tables",
        description="Run every cell (stream x method x seed) of GRID.yaml as a replay in a Ray task "
                    "(one CPU each, N at a time), skip cells already done in --out, then merge into "
                    "OUT/results.json, OUT/results.md (mean ± std over seeds, ablations, windows) and "
                    "OUT/plots/. Grid format: pl3d_ros/eval/bench.py; grids: bench/grids/.",
    )
    p.add_argument("grid", help="grid spec YAML, e.g. bench/grids/real.yaml")
    p.add_argument("--out", required=True, help="results folder (cells in OUT/cells/; resumes)")
    p.add_argument("--workers", type=int, default=None, help="cells at once (default: the CPUs; on a "
                   "cluster its CPUs)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else a "
                   "private local instance); inputs, cache and OUT must be on shared storage")
    p.add_argument("--cache", default=None, help="simulated bags (default: $PL3D_CACHE/bench or "
                   "~/.cache/pl3d_ros/bench)")
    p.add_argument("--max-frames", type=int, default=None, help="cap every stream at N frames")
    p.add_argument("--only-methods", default=None, help="comma list of the grid's methods to run")
    p.add_argument("--merge-only", action="store_true",
                   help="run nothing: merge the cells already done under --out (the others count as missing)")
    p.add_argument("--only-streams", default=None, help="comma list of the grid's streams to run")
    p.add_argument("--seeds", default=None, help="comma list of seeds instead of the grid's")
    p.add_argument("--model", default=None, help="checkpoint for every stream instead of the grid's")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "sim", help="simulate a camera+LiDAR drive into a ROS 2 bag",
        description="A procedural street world seen by a 64-beam spinning LiDAR and a camera, with "
                    "per-point ground truth; the bag has the layout of `pl3d kitti2bag`.",
    )
    p.add_argument("--preset", help="domain preset (see --list)")
    p.add_argument("--frames", type=int, help="frames at 10 Hz")
    p.add_argument("-o", "--output", help="bag folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser(
        "demo", help="the whole mission in a few minutes: simulated drive, source vs adapted",
        description="Simulates a short target-domain drive (cached), replays it with the bundled "
                    "source model without and with online adaptation, prints the table and writes "
                    "the replay reports under --out.",
    )
    p.add_argument("--out", default="pl3d_demo", help="report folder (default ./pl3d_demo)")
    p.add_argument("--preset", default=None, help="target preset (default: the demo's)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--model", default=None, help="checkpoint (default: bundled)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--refresh", action="store_true", help="re-simulate instead of using the cache")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "config", help="the node's parameters: print them, or (re)generate config/pl3d.yaml + schema",
        description="Without options: print the params file (of --config's values, else the defaults). "
                    "--write DIR regenerates DIR/pl3d.yaml and DIR/pl3d.schema.json from the settings' "
                    "declarations (pl3d_ros/config.py); --check DIR exits 1 when they are stale.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="DIR", help="regenerate the params file and its JSON schema in DIR")
    g.add_argument("--check", metavar="DIR", help="exit 1 if DIR's files differ from the declarations")
    p.add_argument("--config", default=None, help="settings YAML whose values to print")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("corruptions", help="list the domain-shift corruptions and their severities")
    p.set_defaults(func=lambda args: print(__import__("pl3d_ros.eval.corruptions", fromlist=["x"]).describe()) or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pl3d_ros.frame import FrameError
    from pl3d_ros.io.bag import BagError
    from pl3d_ros.io.kitti import KittiError
    from pl3d_ros.config import ConfigError
    from pl3d_ros.eval.replay import ReplayError
    from pl3d_ros.labels import ClassSetError
    from pl3d_ros.models.checkpoint import CheckpointError
    from pl3d_ros.runtime.base import BackendError

    try:
        return args.func(args)
    except (BagError, KittiError, FrameError, CheckpointError, ConfigError, ClassSetError, BackendError,
            ReplayError, FileNotFoundError) as exc:
        print(f"pl3d {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
