"""Per-stage latency of the Segmenter: torch eager vs ONNX Runtime (fp32 and int8) on real KITTI
frames, in one run, for one or more models.

    v/bin/python bench/latency.py [--model CKPT | --model preset:cpu ...] [--frames 10] [--threads 2] [--profile]

--model may be given several times; the default is the bundled model (the default settings'
model); ``preset:NAME`` is a randomly initialised network at that preset's size (latency does
not depend on the weights; int8 then calibrates a random network). The backends run the same
frames interleaved (frame by frame, each backend in turn), so a load that comes and goes hits
them alike. Prints p50 / p90 per stage (ms), each stage's share of the p50 total, every
backend's total against torch eager's, and the parity of each backend with torch fp32 (max
|logit diff| and fused-label agreement on the first 5 frames). ``--profile``: cProfile's top
entries of pre- and postprocessing of the default segmenter. TensorRT rows come with the
TensorRT backend (GPU machines only).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
from pathlib import Path

import numpy as np
import torch

from pl3d_ros.app import build_segmenter
from pl3d_ros.config import Config, ModelConfig, RangeImageConfig
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.labels import load_class_set
from pl3d_ros.models.checkpoint import CheckpointHeader, load_checkpoint
from pl3d_ros.models.two_stream import build_model
from pl3d_ros.cpu_budget import one_torch_thread
from pl3d_ros.runtime.base import BackendError

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "pl3d_ros" / "weights" / "sim_source_cpu.safetensors"
STAGES = ("preprocess", "inference", "postprocess", "total")
#: (row name, runtime.backend, runtime.precision); "onnxruntime" is the default settings' row.
ROWS = (("torch", "torch", "fp32"), ("ort-fp32", "onnxruntime", "fp32"), ("onnxruntime", "onnxruntime", "auto"))


def load(spec: str) -> tuple[torch.nn.Module, CheckpointHeader, str]:
    """(network, header, description) of a --model value."""
    if spec.startswith("preset:"):
        cfg = ModelConfig.from_preset(spec[len("preset:"):])
        header = CheckpointHeader(cfg, load_class_set("xmuda10"), RangeImageConfig())
        return build_model(cfg, header.class_set.num_classes), header, f"{spec} (random weights)"
    model, header = load_checkpoint(spec)
    m = header.model
    return model, header, f"{spec} ({m.image_arch} {m.image_width}x{m.image_height} + {m.range_arch})"


def profile(seg, frames: list, top: int = 12) -> None:
    """cProfile's top entries (by own time) of pre- and postprocessing over ``frames``."""
    inputs = [seg.preprocess(f) for f in frames]
    outputs = [seg.run(x) for x in inputs]
    for stage, fn in (("preprocess", lambda: [seg.preprocess(f) for f in frames]),
                      ("postprocess", lambda: [seg.predict(x, o) for x, o in zip(inputs, outputs)])):
        prof = cProfile.Profile()
        with one_torch_thread(seg.device):  # as Segmenter.infer runs them
            prof.enable()
            fn()
            prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
        print(f"\n-- cProfile, {stage}, {len(frames)} frames (own time, s)")
        print("\n".join(line for line in out.getvalue().splitlines()
                        if line.strip() and not line.lstrip().startswith(("Ordered", "List reduced"))))


def measure(spec: str, frames: list, threads: int, with_profile: bool) -> None:
    model, header, desc = load(spec)

    def segmenter(backend: str, precision: str):
        cfg = Config().replace(**{"runtime.backend": backend, "runtime.precision": precision,
                                  "runtime.threads": threads})
        return build_segmenter(cfg, model, header)

    segs = {name: segmenter(backend, precision) for name, backend, precision in ROWS}
    try:
        for precision in ("fp32", "fp16"):
            segs[f"trt-{precision}"] = segmenter("tensorrt", precision)
    except (BackendError, TypeError) as exc:
        print(f"TensorRT rows skipped: {str(exc).splitlines()[0][:160]}")
    times = {name: {s: [] for s in STAGES} for name in segs}
    for seg in segs.values():
        seg.infer(frames[0])  # warm-up
    for frame in frames:  # interleaved: every backend sees the same load
        for name, seg in segs.items():
            for stage, ms in seg.infer(frame).timings_ms.items():
                times[name][stage].append(ms)
    load_avg = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"\n== {desc}: {len(frames)} KITTI frames (seq 00 + 04), {threads} threads, load average {load_avg}")
    for name, seg in segs.items():
        print(f"   {name}: {seg.backend.describe().get('precision', 'fp32')} {seg.backend.name}")
    p50 = {n: {s: float(np.median(v)) for s, v in t.items()} for n, t in times.items()}
    print(f"{'stage':<12}" + "".join(f"{n + ' p50':>17}{'p90':>7}{'share':>7}" for n in times))
    for stage in STAGES:
        row = f"{stage:<12}"
        for name in times:
            v = times[name][stage]
            row += f"{p50[name][stage]:17.1f}{np.percentile(v, 90):7.1f}{100 * p50[name][stage] / p50[name]['total']:6.1f}%"
        print(row)
    row = f"{'pre+post':<12}"
    for name in times:
        pp = p50[name]["preprocess"] + p50[name]["postprocess"]
        row += f"{pp:17.1f}{'':>7}{100 * pp / p50[name]['total']:6.1f}%"
    print(row)
    print("speed-up of the total over torch eager (p50 / p50): " + ", ".join(
        f"{n} {p50['torch']['total'] / p50[n]['total']:.2f}x" for n in times if n != "torch")
        + "; inference alone: " + ", ".join(
        f"{n} {p50['torch']['inference'] / p50[n]['inference']:.2f}x" for n in times if n != "torch"))
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
    if with_profile:
        profile(segs["onnxruntime"], frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None,
                    help="checkpoint or preset:NAME (random weights); repeat for several; default: the bundled model")
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/semantickitti-mini/sequences"))
    ap.add_argument("--frames", type=int, default=10, help="frames per sequence 00 and 04")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="cProfile top entries of pre/postprocessing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = [f for seq in ("00", "04") for f in list(KittiSequence(Path(args.data) / seq).frames())[: args.frames]]
    for spec in args.model or [str(BUNDLED)]:
        measure(spec, frames, args.threads, args.profile)


if __name__ == "__main__":
    main()
