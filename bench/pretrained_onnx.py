"""ONNX export of the imported pretrained networks: op types, ONNX Runtime parity, CPU latency.

    PYTHONPATH=$PWD v/bin/python bench/pretrained_onnx.py [--image-size 1024x320] [--runs 10]
        [--out DIR]

For each network (3D-MiniNet at its sensor's range-image size, ESPNetv2 at --image-size) and for
its class map to xmuda10 on the network's logits: exported with opset 17 and static shapes
(torch.onnx.export, the TorchScript exporter as pl3d_ros.runtime.export). Prints the op types, the
max |logit diff| and argmax agreement ORT vs torch on a real KITTI frame (sequence 00, frame 0),
and the median latency of torch and ONNX Runtime (CPU provider) at 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import collections
import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from pl3d_ros.geometry import range_image_channels, range_projection
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.models.class_map import build_class_map
from pl3d_ros.models.espnetv2 import load_espnetv2
from pl3d_ros.models.mininet3d import load_mininet3d

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OPSET = 17


def export(model: nn.Module, example: torch.Tensor, outputs: list[str]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), buf, opset_version=OPSET, input_names=["input"],
                          output_names=outputs, do_constant_folding=True, dynamo=False)
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def session(data: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def check(name: str, model: nn.Module, example: torch.Tensor, runs: int, out_dir: Path | None) -> torch.Tensor:
    """Export, op types, parity, latency; returns the torch output."""
    data = export(model, example, ["logits"])
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.onnx").write_bytes(data)
    graph = onnx.load_from_string(data).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    print(f"\n== {name}: input {tuple(example.shape)}, ONNX {len(data) / 1e6:.1f} MB, {len(graph.node)} nodes")
    print("op types: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    with torch.no_grad():
        out = model(example)
    r = out.numpy()
    g = session(data, 1).run(None, {"input": example.numpy()})[0]
    agree = float(np.mean(r.argmax(1) == g.argmax(1)))
    print(f"parity (output {r.shape}): max |diff| {np.abs(r - g).max():.2e} "
          f"(max |value| {np.abs(r).max():.1f}), argmax agreement {100 * agree:.4f} %")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            t_torch = median_ms(lambda: model(example), runs)
        sess = session(data, threads)
        t_ort = median_ms(lambda: sess.run(None, {"input": example.numpy()}), runs)
        print(f"latency, {threads} thread{'s' if threads > 1 else ''}: torch {t_torch:.0f} ms, "
              f"ONNX Runtime {t_ort:.0f} ms (median of {runs})")
    torch.set_num_threads(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--range-model", default=str(SHARED / "pretrained/3dmininet-tiny-semantickitti"))
    ap.add_argument("--image-model", default=str(SHARED / "pretrained/espnetv2-cityscapes/espnetv2_s_2.0_city_1024x512.pth"))
    ap.add_argument("--data", default=str(SHARED / "data/semantickitti-mini/sequences/00"))
    ap.add_argument("--image-size", default="1024x320", help="W x H of the image network input")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", help="also write the .onnx files here")
    ap.add_argument("--only", choices=["range", "image"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    out_dir = Path(args.out) if args.out else None
    seq = KittiSequence(args.data)
    points, _, rgb = seq.read(0)

    if args.only in (None, "range"):
        net = load_mininet3d(args.range_model)
        proj = range_projection(points, net.spec.range_image_config())
        example = torch.from_numpy(range_image_channels(points, proj))[None]
        logits = check("mininet3d", net, example, args.runs, out_dir)
        check("class map semantickitti->xmuda10", build_class_map("semantickitti", "xmuda10"), logits,
              args.runs, None)

    if args.only in (None, "image"):
        w, h = (int(v) for v in args.image_size.split("x"))
        from PIL import Image

        resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR), np.float32) / 255.0
        example = torch.from_numpy(resized).permute(2, 0, 1)[None].contiguous()
        net = load_espnetv2(args.image_model)
        logits = check("espnetv2", net, example, args.runs, out_dir)
        cmap = build_class_map("cityscapes", "xmuda10")
        check("class map cityscapes->xmuda10", cmap, logits, args.runs, None)
        # in the pipeline the map can also run on the logits sampled at the ~19k in-view points
        with torch.no_grad():
            t_pts = median_ms(lambda: cmap(logits[0, :, :60, :320].reshape(20, -1).t().contiguous()), args.runs)
        print(f"class map on (19200, 20) point logits, torch 1 thread: {t_pts:.1f} ms")

if __name__ == "__main__":
    main()
