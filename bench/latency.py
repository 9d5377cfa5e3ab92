"""Per-stage latency of the Segmenter: torch vs ONNX Runtime on real KITTI frames, in one run.

    v/bin/python bench/latency.py [--model CKPT] [--preset cpu] [--frames 10] [--threads 2]

Without --model the network is randomly initialised at the preset's size: latency does not depend
on the weights. Prints p50 / p90 per stage (ms) and the ORT/torch ratio. TensorRT rows come with
the TensorRT backend (GPU machines only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pl3d_ros.app import build_segmenter
from pl3d_ros.config import Config, ModelConfig, RangeImageConfig
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.labels import load_class_set
from pl3d_ros.models.checkpoint import CheckpointHeader, load_checkpoint
from pl3d_ros.models.two_stream import build_model
from pl3d_ros.runtime.base import BackendError

REPO = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "inference", "postprocess", "total")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint; default: random weights at --preset size")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/semantickitti-mini/sequences"))
    ap.add_argument("--frames", type=int, default=10, help="frames per sequence 00 and 04")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model, header = load_checkpoint(args.model)
    else:
        cfg = ModelConfig.from_preset(args.preset)
        header = CheckpointHeader(cfg, load_class_set("xmuda10"), RangeImageConfig())
        model = build_model(cfg, header.class_set.num_classes)
    frames = [f for seq in ("00", "04") for f in list(KittiSequence(Path(args.data) / seq).frames())[: args.frames]]
    def segmenter(backend: str, precision: str = "fp32"):
        cfg = Config().replace(**{"runtime.backend": backend, "runtime.precision": precision,
                                  "runtime.threads": args.threads})
        return build_segmenter(cfg, model, header)

    segs = {"torch": segmenter("torch"), "onnxruntime": segmenter("onnxruntime")}
    try:
        for precision in ("fp32", "fp16"):
            segs[f"trt-{precision}"] = segmenter("tensorrt", precision)
    except (BackendError, TypeError) as exc:
        print(f"TensorRT rows skipped: {exc}")
    backends = {name: seg.backend for name, seg in segs.items()}
    results: dict[str, dict[str, list[float]]] = {}
    for name, seg in segs.items():
        seg.infer(frames[0])  # warm-up
        times = {s: [] for s in STAGES}
        for frame in frames:
            for stage, ms in seg.infer(frame).timings_ms.items():
                times[stage].append(ms)
        results[name] = times
    parity = {}
    if len(backends) > 2:  # TensorRT present: logits and labels vs torch fp32 on the first frames
        ref_seg = segs["torch"]
        for name in (n for n in backends if n.startswith("trt")):
            seg = segs[name]
            diffs, agree = [], []
            for frame in frames[:5]:
                feed = ref_seg.preprocess(frame).arrays()
                a, b = backends["torch"].run(feed), backends[name].run(feed)
                diffs.append(max(float(np.abs(a[k] - b[k]).max()) for k in a))
                agree.append(float((seg.infer(frame).labels == ref_seg.infer(frame).labels).mean()))
            parity[name] = (max(diffs), min(agree))
    print(f"{len(frames)} KITTI frames (seq 00 + 04), preset {header.model.preset}, "
          f"{args.threads} threads, weights: {'checkpoint' if args.model else 'random'}")
    print(f"{'stage':<12}" + "".join(f"{n + ' p50':>18}{n + ' p90':>18}" for n in results) + f"{'ort/torch':>11}")
    for stage in STAGES:
        row = f"{stage:<12}"
        for name in results:
            v = results[name][stage]
            row += f"{np.median(v):18.1f}{np.percentile(v, 90):18.1f}"
        ratio = np.median(results["onnxruntime"][stage]) / np.median(results["torch"][stage])
        print(row + f"{ratio:11.2f}")
    for name, (diff, agree) in parity.items():
        print(f"parity {name} vs torch fp32: max |logit diff| {diff:.4f}, label agreement {100 * agree:.2f}%")


if __name__ == "__main__":
    main()
