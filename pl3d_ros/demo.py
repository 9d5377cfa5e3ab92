"""``pl3d demo``: the whole mission on a fresh machine, with no dataset, no ROS and no GPU.

1. Simulates a short drive in a shifted target domain (cached after the first run).
2. Replays it with the bundled source model, once without adaptation (``source``) and once with
   the full online adaptation (``full``), lockstep, seeded.
3. Prints a small table and leaves the replay report folders (labeled MCAP, plots, pictures,
   index.html) under --out, and OUT/index.html (= OUT/report.md) with both methods' pictures of
   the same frames side by side and the combined mIoU plot.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEMO_PRESET = "mixed"  # other sensor rig + suburban layout + dusk: every modality shifts
DEMO_FRAMES = 30
DEMO_SEED = 7


def cache_dir() -> Path:
    """$PL3D_CACHE, else $XDG_CACHE_HOME/pl3d_ros, else ~/.cache/pl3d_ros."""
    if os.environ.get("PL3D_CACHE"):
        return Path(os.environ["PL3D_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache") / "pl3d_ros"


def demo_bag(preset: str, frames: int, seed: int, refresh: bool = False) -> Path:
    """The simulated target-domain bag, generated once and reused."""
    from tqdm import tqdm

    from pl3d_ros.sim.sequence import write_bag

    path = cache_dir() / "demo" / f"{preset}-n{frames}-s{seed}"
    if path.exists() and not refresh:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    bar = tqdm(total=frames, desc=f"simulating '{preset}'", unit="frame", file=sys.stderr, dynamic_ncols=True)
    write_bag(preset, frames, path, seed=seed, progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    return path


def run_demo(out: str | Path, *, preset: str = DEMO_PRESET, frames: int = DEMO_FRAMES, seed: int = DEMO_SEED,
             model: str | Path | None = None, methods: tuple[str, ...] = ("source", "full"),
             threads: int = 0, refresh: bool = False) -> dict[str, Any]:
    """Run the demo; returns {method: metrics} and writes OUT/<method>/ reports + OUT/summary.json."""
    from tqdm import tqdm

    from pl3d_ros.config import Config
    from pl3d_ros.eval.plots import plot_series
    from pl3d_ros.eval.replay import ReplayOptions, replay
    from pl3d_ros.weights import default_model_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bag = demo_bag(preset, frames, seed, refresh)
    ckpt = Path(model) if model else default_model_path()
    results: dict[str, Any] = {}
    for method in methods:
        bar = tqdm(total=frames, desc=f"replay {method}", unit="frame", file=sys.stderr, dynamic_ncols=True)

        def progress(done: int, info: dict, bar=bar) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(miou=f"{info['miou']:.1f}")

        cfg = Config().replace(**{"adapt.method": method, "runtime.threads": threads})
        # max_frames = the drive's length: the pictures' middle frame is then the true middle
        results[method] = replay(bag, ckpt, out / method, ReplayOptions(seed=seed, max_frames=frames, config=cfg),
                                 progress)
        bar.close()
    plot_series({m: r["miou_running"] for m, r in results.items()}, out / "miou_over_frames.png",
                ylabel="running fused mIoU, in view (%)", title=f"demo: sim '{preset}' preset, {frames} frames")
    summary = {"preset": preset, "frames": frames, "seed": seed, "checkpoint": str(ckpt), "bag": str(bag),
               "wall_s": round(time.perf_counter() - t0, 1),
               "methods": {m: {"miou": r["miou"], "miou_all_points": r["miou_all_points"],
                               "pseudo_labels": r["pseudo_labels"], "adapt_steps": r["adapt_steps"],
                               "weight_swaps": r["weight_swaps"], "latency_ms": r["latency_ms"]}
                           for m, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_demo_index(out, summary, {m: r["pictures"] for m, r in results.items()})
    return summary


def demo_markdown(summary: dict[str, Any], pictures: dict[str, list[dict[str, Any]]]) -> str:
    """The demo's top page: the table, the combined plot, and each method's pictures of the same
    frames side by side (paths relative to OUT)."""
    methods = list(summary["methods"])
    lines = [f"# pl3d demo: simulated '{summary['preset']}' drive, {summary['frames']} frames", "",
             f"- model: `{summary['checkpoint']}`; lockstep, 1 adaptation step per frame, seed {summary['seed']}",
             "- reports of each method: " + ", ".join(f"[{m}]({m}/index.html)" for m in methods),
             f"- wall time: {summary['wall_s']} s", "",
             "| method | fused | 2D | 3D | fused, all points | inference p50 (ms) |", "|---|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        lines.append(f"| {m} | {r['miou']['fused']} | {r['miou']['2d']} | {r['miou']['3d']} | "
                     f"{r['miou_all_points']['fused']} | {r['latency_ms']['total']['p50']} |")
    lines += ["", "mIoU in %, in-view points unless noted.", "", "![running mIoU](miou_over_frames.png)", ""]
    by_seq = [{p["seq"]: p for p in pictures.get(m, [])} for m in methods]
    common = sorted(set.intersection(*(set(d) for d in by_seq))) if by_seq else []
    if common:
        lines += [f"## Pictures: {' vs '.join(methods)}", "",
                  "The same frames; each method's picture shows the prediction scored for that frame (made "
                  "before the method adapted on it). Camera: predicted class colours above or beside ground "
                  "truth; bird's-eye view: every point, +-40 m, 10 m grid, white lines the camera's field of "
                  "view; errors: grey correct, red wrong, slate no ground-truth class. The first frame is "
                  "labelled before any adaptation, so both methods' pictures of it agree. Click a picture "
                  "for full size.", ""]
        for seq in common:
            lines += [f"### Frame {seq} ({by_seq[0][seq]['role']})", "",
                      "| " + " | ".join(methods) + " |", "|" + "---|" * len(methods)]
            for kind in by_seq[0][seq]["files"]:
                lines.append("| " + " | ".join(f"![{m} {kind}]({m}/{d[seq]['files'][kind]})"
                                               for m, d in zip(methods, by_seq)) + " |")
            lines.append("")
    return "\n".join(lines)


def write_demo_index(out: Path, summary: dict[str, Any], pictures: dict[str, list[dict[str, Any]]]) -> Path:
    """OUT/report.md and OUT/index.html (see ``demo_markdown``)."""
    from pl3d_ros.eval.html_report import write_index

    text = demo_markdown(summary, pictures)
    (out / "report.md").write_text(text)
    return write_index(out, text, f"pl3d demo: {summary['preset']}")


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"pl3d demo: simulated '{summary['preset']}' drive, {summary['frames']} frames, "
             f"bundled source model; lockstep, 1 adaptation step per frame",
             f"{'method':<8} {'fused':>7} {'2D':>7} {'3D':>7} {'all pts':>8} {'PL density':>11} "
             f"{'PL precision':>13} {'infer ms':>9} {'adapt ms':>9}"]
    for m, r in summary["methods"].items():
        pl = r["pseudo_labels"].get("filtered") or r["pseudo_labels"].get("base") or {}
        adapt = r["latency_ms"].get("adaptation", {}).get("p50")
        dens = f"{pl['density']:.1f}%" if pl else "-"
        prec = f"{pl['precision']:.1f}%" if pl and pl.get("precision") is not None else "-"
        lines.append(f"{m:<8} {r['miou']['fused']:>7.1f} {r['miou']['2d']:>7.1f} {r['miou']['3d']:>7.1f} "
                     f"{r['miou_all_points']['fused']:>8.1f} {dens:>11} {prec:>13} "
                     f"{r['latency_ms']['total']['p50']:>9.1f} {adapt if adapt is not None else '-':>9}")
    if {"source", "full"} <= set(summary["methods"]):
        gain = summary["methods"]["full"]["miou"]["fused"] - summary["methods"]["source"]["miou"]["fused"]
        lines.append(f"adaptation changed fused mIoU (in view) by {gain:+.1f} points")
    lines.append(f"mIoU in %, in-view points unless 'all pts'; took {summary['wall_s']:.0f} s")
    return "\n".join(lines)
