"""Online adaptation benchmark: KITTI 00-03 source model, 04-05 as one stream under domain shifts.

    v/bin/python bench/tta.py [--model CKPT] [--out bench/out/tta] [--corruptions ...] [--methods ...]

Without --model it trains one (or reuses bench/out/tta/source.safetensors) with `pl3d train` on
sequences 00-03 (30 epochs, 30 min limit). Then, for every corruption, it replays 04 + 05 as one
stream (lockstep, 1 adaptation step per frame unless --steps-per-frame) with source, tent, pl,
full and the ablations of full, and prints:
  1. fused / 2D / 3D mIoU (in view, %) per method x corruption, with the mean over corruptions;
  2. pseudo-label density / precision (%) of the base and refined labels.
Everything lands in OUT (results.json, results.md, per-run report folders, one mIoU-over-frames
plot per corruption).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pl3d_ros.config import Config
from pl3d_ros.eval.plots import plot_series
from pl3d_ros.eval.replay import ReplayOptions, replay

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/semantickitti-mini/sequences"
CORRUPTIONS = "beam_missing:3,fog:3,cross_sensor:3,night:3,motion_blur:3"
#: label -> (method, disabled components of full)
RUNS = {
    "source": ("source", []),
    "tent": ("tent", []),
    "pl": ("pl", []),
    "full": ("full", []),
    "full w/o MLA+GAPP": ("full", ["mla", "gapp"]),
    "full w/o connectivity": ("full", ["connectivity"]),
    "full w/o negative": ("full", ["negative"]),
    "full w/o ERDA": ("full", ["erda"]),
}


def source_model(out: Path, minutes: float) -> Path:
    ckpt = out / "source.safetensors"
    if ckpt.is_file():
        print(f"reusing {ckpt}")
        return ckpt
    cmd = [sys.executable, "-m", "pl3d_ros.cli", "train", "--data", *(str(DATA / s) for s in ("00", "01", "02", "03")),
           "--val", str(DATA / "04"), str(DATA / "05"), "--out", str(ckpt), "--epochs", "30",
           "--time-limit", str(minutes), "--seed", "0"]
    print("training:", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="source checkpoint (default: train or reuse OUT/source.safetensors)")
    ap.add_argument("--out", default=str(REPO / "bench/out/tta"))
    ap.add_argument("--corruptions", default=CORRUPTIONS, help="comma list; 'none' = clean")
    ap.add_argument("--methods", default=",".join(RUNS), help=f"comma list of {list(RUNS)}")
    ap.add_argument("--steps-per-frame", type=int, default=1)
    ap.add_argument("--frames", type=int, default=None, help="limit frames of the stream (default all)")
    ap.add_argument("--train-minutes", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.model) if args.model else source_model(out, args.train_minutes)
    corruptions = [c for c in args.corruptions.split(",") if c]
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(labels) - set(RUNS)
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; choose from {list(RUNS)}")
    stream = [DATA / "04", DATA / "05"]
    results: dict[str, dict[str, dict]] = {}
    t0 = time.perf_counter()
    for corr in corruptions:
        series = {}
        for label in labels:
            method, disable = RUNS[label]
            cfg = Config().replace(**{"adapt.method": method, "adapt.disable": list(disable),
                                      "adapt.steps_per_frame": args.steps_per_frame,
                                      "runtime.threads": args.threads})
            run_dir = out / corr.replace(":", "") / label.replace(" ", "_").replace("/", "").replace("+", "")
            opts = ReplayOptions(corrupt="" if corr == "none" else corr, seed=args.seed,
                                 max_frames=args.frames, write_bag=False, label=label, config=cfg)
            t = time.perf_counter()
            m = replay(stream, ckpt, run_dir, opts)
            results.setdefault(label, {})[corr] = {
                "miou": m["miou"], "pseudo_labels": m["pseudo_labels"], "adapt_steps": m["adapt_steps"],
                "weight_swaps": m["weight_swaps"], "adapter_errors": m["adapter_errors"],
                "wall_s": m["wall_s"], "frames": m["frames"]}
            series[label] = m["miou_running"]
            print(f"[{time.perf_counter() - t0:7.0f} s] {corr:<16} {label:<24} fused {m['miou']['fused']:5.1f} "
                  f"2D {m['miou']['2d']:5.1f} 3D {m['miou']['3d']:5.1f}  ({time.perf_counter() - t:.0f} s)",
                  flush=True)
        plot_series(series, out / f"miou_over_frames_{corr.replace(':', '')}.png",
                    ylabel="running fused mIoU, in view (%)", title=f"KITTI 04+05, {corr}")
    table = format_tables(results, corruptions, labels)
    print(table)
    total = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps({"checkpoint": str(ckpt), "corruptions": corruptions,
                                                   "steps_per_frame": args.steps_per_frame,
                                                   "wall_s": round(total, 1), "results": results}, indent=2))
    (out / "results.md").write_text(table + f"\n\nwall time {total / 60:.1f} min\n")
    print(f"total {total / 60:.1f} min; wrote {out / 'results.md'}")


def format_tables(results: dict, corruptions: list[str], labels: list[str]) -> str:
    head = "| method | " + " | ".join(corruptions) + " | mean |"
    lines = ["fused / 2D / 3D mIoU (%, in-view points)", "", head, "|" + "---|" * (len(corruptions) + 2)]
    for label in labels:
        cells, means = [], []
        for c in corruptions:
            m = results[label][c]["miou"]
            cells.append(f"{m['fused']:.1f} / {m['2d']:.1f} / {m['3d']:.1f}")
            means.append([m["fused"], m["2d"], m["3d"]])
        mean = np.nanmean(np.array(means, dtype=float), axis=0)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean[0]:.1f} / {mean[1]:.1f} / {mean[2]:.1f} |")
    lines += ["", "pseudo-labels, mean over corruptions (%): density / precision", "",
              "| method | base | refined | filtered (trained on) |", "|---|---|---|---|"]
    for label in labels:
        stages = {}
        for stage in ("base", "refined", "filtered"):
            vals = [results[label][c]["pseudo_labels"].get(stage) for c in corruptions]
            vals = [v for v in vals if v]
            if vals:
                d = np.mean([v["density"] for v in vals])
                p = [v["precision"] for v in vals if v["precision"] is not None]
                stages[stage] = f"{d:.1f} / {np.mean(p):.1f}" if p else f"{d:.1f} / -"
        if stages:
            lines.append(f"| {label} | " + " | ".join(stages.get(s, "-") for s in ("base", "refined", "filtered")) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
