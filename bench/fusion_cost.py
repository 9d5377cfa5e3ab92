"""Cost of the fusion rules in inference's postprocess (``inputs.point_predictions``, the compiled
CPU loops): Latte's entropy mixture, the product, and the product with one class that only the
range branch outputs (parking under a Cityscapes image branch), side by side on the same KITTI
frames with the same random logits, interleaved call by call.

    v/bin/python bench/fusion_cost.py [--data KITTI_SEQ] [--frames 3] [--repeats 30] [--threads 1]

Prints the in-view point count and each rule's p50 / p90 (ms) and its p50 against the entropy
rule's. The logits are random (the loops' cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pl3d_ros.config import RangeImageConfig
from pl3d_ros.inputs import load_cpu_kernels, point_predictions, prepare
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.models.points import RANGE_ONLY, SHARED, Fusion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/semantickitti-mini/sequences/04"),
                    help="a KITTI sequence folder (default: ../shared's 04)")
    ap.add_argument("--frames", type=int, default=3, help="frames of it")
    ap.add_argument("--repeats", type=int, default=30, help="calls per rule and frame")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_cpu_kernels()
    classes = 10
    rules = {"entropy": Fusion("entropy"), "product": Fusion("product"),
             "product, 1 range-only class": Fusion("product", (SHARED,) * 5 + (RANGE_ONLY,) + (SHARED,) * 4)}
    times: dict[str, list[float]] = {k: [] for k in rules}
    frames = list(KittiSequence(args.data).frames())[: args.frames]
    gen = torch.Generator().manual_seed(0)
    in_view = []
    for frame in tqdm(frames, desc="frames", unit="frame"):
        inputs = prepare(frame, (640, 192), RangeImageConfig())
        in_view.append(int(inputs.in_view.sum()))
        l2 = torch.randn(1, classes, 192, 640, generator=gen)
        l3 = torch.randn(1, classes, 64, 2048, generator=gen)
        for rule in rules.values():  # warm caches
            point_predictions(inputs, l2, l3, (0.1, -0.2), rule=rule)
        for _ in range(args.repeats):
            for name, rule in rules.items():
                t0 = time.perf_counter()
                point_predictions(inputs, l2, l3, (0.1, -0.2), rule=rule)
                times[name].append((time.perf_counter() - t0) * 1e3)
    base = float(np.median(times["entropy"]))
    print(f"postprocess of {len(frames)} KITTI frames ({int(np.mean(in_view))} in-view points on average), "
          f"{args.repeats} calls per rule and frame, {args.threads} thread(s):")
    for name, values in times.items():
        p50, p90 = np.percentile(values, [50, 90])
        print(f"  {name:30s} p50 {p50:6.2f} ms  p90 {p90:6.2f} ms  x{p50 / base:.2f} of entropy")


if __name__ == "__main__":
    main()
