"""What one adaptation step costs: a new frame's work and step against a step on memory frames alone.

    v/bin/python bench/adapt_steps.py [--model CKPT] [--frames 6] [--threads 1] [--enable ce,mla,...]
                                      [--batch-frames 1]

Feeds KITTI frames (sequence 04) to the adapter of ``full`` in lockstep, one step per frame, then
takes as many memory steps (``Adapter.memory_step``: no teacher / source forward, no pseudo-labels
or masks, the memory frames' stored inputs and labels) as there were new frames, all in one run.
Prints p50 / p90 (ms) of: the new frame's work (teacher and source forwards, pseudo-labels,
masks), its step (student forward + backward + EMA + restore), the whole new-frame adaptation,
and a memory step; and their ratios. The adapter runs on ``--threads`` torch threads, as the
node's adaptation thread does (one by default).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from pl3d_ros.adapt import Adapter
from pl3d_ros.app import resolve_model
from pl3d_ros.config import Config
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.models.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def pct(values: list[float]) -> str:
    return f"{np.percentile(values, 50):8.1f} {np.percentile(values, 90):8.1f}" if values else "       -        -"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="checkpoint (default: the bundled model)")
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/semantickitti-mini/sequences/04"))
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--enable", default="", help="adapt.enable: off-by-default components to switch on")
    ap.add_argument("--batch-frames", type=int, default=1, help="adapt.batch_frames")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    enable = [c for c in args.enable.split(",") if c]
    cfg = Config().replace(**{"adapt.method": "full", "adapt.enable": enable, "adapt.batch_frames": args.batch_frames,
                              "adapt.memory_refresh_steps": 0, "runtime.threads": args.threads})
    model, header = load_checkpoint(resolve_model(args.model))
    adapter = Adapter(model, header, cfg, seed=0)
    seq = KittiSequence(args.data)
    frames = [seq.frame(i) for i in range(min(args.frames + 1, len(seq)))]
    adapter.step(frames[0])  # warm-up (first allocations, prototype / threshold initialisation)
    work, step, total, memory = [], [], [], []
    for frame in frames[1:]:
        stats = adapter.step(frame)
        if "error" in stats:
            raise SystemExit(f"adaptation failed: {stats['error']}")
        h = adapter.health()
        work.append(h.frame_work_ms)
        step.append(h.step_ms)
        total.append(stats["ms"])
    for _ in range(len(frames) - 1):
        t = time.perf_counter()
        stats = adapter.memory_step()
        if stats is None or "error" in stats:
            raise SystemExit(f"memory step failed: {stats}")
        memory.append((time.perf_counter() - t) * 1e3)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"full ({', '.join(cfg.adapt.components())}), batch_frames {args.batch_frames}, {len(total)} frames of "
          f"{Path(args.data).name}, {args.threads} torch thread(s), load average {load:.2f}, "
          f"model {args.model or '(bundled)'}")
    print(f"{'':32s}{'p50 ms':>8s} {'p90 ms':>8s}")
    for name, values in (("new frame: frame work", work), ("new frame: step", step),
                         ("new frame: total", total), ("memory step", memory)):
        print(f"{name:32s}{pct(values)}")
    print(f"memory step / new-frame total (p50): {np.median(memory) / np.median(total):.2f}")


if __name__ == "__main__":
    main()
