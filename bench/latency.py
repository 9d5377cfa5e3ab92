"""Per-stage latency of the Segmenter: torch vs ONNX Runtime on real KITTI frames, in one run,
for one or more models.

    v/bin/python bench/latency.py [--model CKPT | --model preset:cpu ...] [--frames 10] [--threads 2]

--model may be given several times; ``preset:NAME`` is a randomly initialised network at that
preset's size (latency does not depend on the weights), the default ``preset:cpu``. Prints p50 /
p90 per stage (ms) and the ORT/torch ratio per model, and the parity of each backend with torch
(max |logit diff| over both outputs and fused-label agreement on the first 5 frames). TensorRT
rows come with the TensorRT backend (GPU machines only).
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


def load(spec: str) -> tuple[torch.nn.Module, CheckpointHeader, str]:
    """(network, header, description) of a --model value."""
    if spec.startswith("preset:"):
        cfg = ModelConfig.from_preset(spec[len("preset:"):])
        header = CheckpointHeader(cfg, load_class_set("xmuda10"), RangeImageConfig())
        return build_model(cfg, header.class_set.num_classes), header, f"{spec} (random weights)"
    model, header = load_checkpoint(spec)
    m = header.model
    return model, header, f"{spec} ({m.image_arch} {m.image_width}x{m.image_height} + {m.range_arch})"


def measure(spec: str, frames: list, threads: int) -> None:
    model, header, desc = load(spec)

    def segmenter(backend: str, precision: str = "fp32"):
        cfg = Config().replace(**{"runtime.backend": backend, "runtime.precision": precision,
                                  "runtime.threads": threads})
        return build_segmenter(cfg, model, header)

    segs = {"torch": segmenter("torch"), "onnxruntime": segmenter("onnxruntime")}
    try:
        for precision in ("fp32", "fp16"):
            segs[f"trt-{precision}"] = segmenter("tensorrt", precision)
    except (BackendError, TypeError) as exc:
        print(f"TensorRT rows skipped: {exc}")
    results: dict[str, dict[str, list[float]]] = {}
    for name, seg in segs.items():
        seg.infer(frames[0])  # warm-up
        times = {s: [] for s in STAGES}
        for frame in frames:
            for stage, ms in seg.infer(frame).timings_ms.items():
                times[stage].append(ms)
        results[name] = times
    print(f"\n== {desc}: {len(frames)} KITTI frames (seq 00 + 04), {threads} threads")
    print(f"{'stage':<12}" + "".join(f"{n + ' p50':>18}{n + ' p90':>18}" for n in results) + f"{'ort/torch':>11}")
    for stage in STAGES:
        row = f"{stage:<12}"
        for name in results:
            v = results[name][stage]
            row += f"{np.median(v):18.1f}{np.percentile(v, 90):18.1f}"
        ratio = np.median(results["onnxruntime"][stage]) / np.median(results["torch"][stage])
        print(row + f"{ratio:11.2f}")
    ref = segs["torch"]
    for name in (n for n in segs if n != "torch"):  # logits and labels vs torch fp32
        diffs, agree = [], []
        for frame in frames[:5]:
            feed = ref.preprocess(frame).arrays()
            a, b = ref.backend.run(feed), segs[name].backend.run(feed)
            diffs.append(max(float(np.abs(a[k] - b[k]).max()) for k in a))
            agree.append(float((segs[name].infer(frame).labels == ref.infer(frame).labels).mean()))
        print(f"parity {name} vs torch fp32 ({len(diffs)} frames): max |logit diff| {max(diffs):.2e}, "
              f"fused-label agreement min {100 * min(agree):.3f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None,
                    help="checkpoint or preset:NAME (random weights); repeat for several; default preset:cpu")
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/semantickitti-mini/sequences"))
    ap.add_argument("--frames", type=int, default=10, help="frames per sequence 00 and 04")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = [f for seq in ("00", "04") for f in list(KittiSequence(Path(args.data) / seq).frames())[: args.frames]]
    for spec in args.model or ["preset:cpu"]:
        measure(spec, frames, args.threads)


if __name__ == "__main__":
    main()
