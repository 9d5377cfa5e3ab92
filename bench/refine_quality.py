"""Pseudo-label refinement quality by mask provider, scale and scan accumulation, on a stream.

    v/bin/python bench/refine_quality.py INPUT [INPUT ...] [--model CKPT] [--corrupt fog:3]
        [--configs felz200,felz400,slic150,...] [--frames N] [--threads 1]

The source model labels every frame (section 0 base pseudo-labels with the running class-wise
thresholds, as the adapter makes them); each configuration then refines the same base labels
(MLA + GAPP) with its masks, frame after frame (accumulation needs the frames in order). Printed
per configuration: in-view density and precision of the base and the refined labels (%, against
ground truth), the ratio refined / base in-view density, the precision change, MLA's pass rate
(kept / all masks) and the refinement time per frame (ms). No adaptation runs: the numbers say
what refinement adds on top of a fixed teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pl3d_ros.adapt.pseudo_labels import PseudoLabeler  # noqa: E402
from pl3d_ros.adapt.refinement import RefinementStage  # noqa: E402
from pl3d_ros.adapt.state import frame_state  # noqa: E402
from pl3d_ros.app import resolve_model  # noqa: E402
from pl3d_ros.config import Config  # noqa: E402
from pl3d_ros.eval.corruptions import apply as apply_corruptions  # noqa: E402
from pl3d_ros.eval.corruptions import parse_spec  # noqa: E402
from pl3d_ros.inputs import forward_points  # noqa: E402
from pl3d_ros.io.sources import open_source  # noqa: E402
from pl3d_ros.models.checkpoint import load_checkpoint  # noqa: E402
from pl3d_ros.models.points import Fusion  # noqa: E402

#: name -> refine.* settings
CONFIGS = {
    "felz200": {"refine.mask_provider": "superpixel", "refine.superpixel_scale": 200.0, "refine.superpixel_min_size": 200},
    "felz400": {"refine.mask_provider": "superpixel", "refine.superpixel_scale": 400.0, "refine.superpixel_min_size": 400},
    "felz800": {"refine.mask_provider": "superpixel", "refine.superpixel_scale": 800.0, "refine.superpixel_min_size": 800},
    "slic150": {"refine.mask_provider": "slic", "refine.slic_segments": 150},
    "slic60": {"refine.mask_provider": "slic", "refine.slic_segments": 60},
    "felz400+acc3": {"refine.mask_provider": "superpixel", "refine.superpixel_scale": 400.0,
                     "refine.superpixel_min_size": 400, "refine.accumulate_scans": 3},
    "felz400+acc6": {"refine.mask_provider": "superpixel", "refine.superpixel_scale": 400.0,
                     "refine.superpixel_min_size": 400, "refine.accumulate_scans": 6},
    "felz200+acc3": {"refine.mask_provider": "superpixel", "refine.superpixel_scale": 200.0,
                     "refine.superpixel_min_size": 200, "refine.accumulate_scans": 3},
    "slic150+acc3": {"refine.mask_provider": "slic", "refine.slic_segments": 150, "refine.accumulate_scans": 3},
}


def _counts(labels: np.ndarray, gt: np.ndarray, view: np.ndarray) -> tuple[int, int, int]:
    """(labelled in view, labelled in view with ground truth, of those correct)."""
    lab = labels[view]
    g = gt[view]
    has = lab >= 0
    ev = has & (g >= 0)
    return int(has.sum()), int(ev.sum()), int((lab[ev] == g[ev]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="KITTI sequence folders or bags, played as one stream")
    ap.add_argument("--model", default="", help="source checkpoint (default: the bundled model)")
    ap.add_argument("--corrupt", default="", help="e.g. fog:3")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, header = load_checkpoint(resolve_model(args.model))
    model.eval()
    cs = header.class_set
    corruptions = parse_spec(args.corrupt, sensor=header.sensor)
    frames = [f for p in args.inputs for f in open_source(p).frames()][: args.frames]
    if corruptions:
        frames = [apply_corruptions(f, corruptions, (0, i)) for i, f in enumerate(frames)]
    cfg0 = Config()
    labeler = PseudoLabeler(cs.num_classes, cfg0.pseudo_labels.median_window_frames, cfg0.pseudo_labels.confidence_cap)
    base, states = [], []
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        st = frame_state(f, header, "cpu", i)
        with torch.no_grad():
            _, _, fused = forward_points(model, st.inputs).probs(st.in_view, rule=Fusion.of(cfg0.runtime.fusion, header))
        base.append(labeler(fused)[0])
        states.append(st)
    print(f"{len(frames)} frames labelled by {resolve_model(args.model).name} in {time.perf_counter() - t0:.0f} s"
          + (f", corruption {args.corrupt}" if args.corrupt else ""), flush=True)
    print(f"{'config':<14}{'base dens':>10}{'base prec':>10}{'ref dens':>9}{'ref prec':>9}{'x dens':>8}"
          f"{'d prec':>8}{'MLA pass':>9}{'ms/frame':>9}")
    for name in [c for c in args.configs.split(",") if c]:
        cfg = Config().replace(**CONFIGS[name])
        stage = RefinementStage(cfg, header.sensor, gapp=True, connectivity=False)
        tot = np.zeros((2, 3), np.int64)
        kept = masks = 0
        t = time.perf_counter()
        for st, b in zip(states, base):
            st = dataclasses.replace(st, masks=None, _pixels=None)
            refined, _, rs = stage.refine(st, b)
            gt = st.gt.numpy() if st.gt is not None else np.full(st.num_points, -1)
            view = st.in_view.numpy()
            tot[0] += _counts(b.numpy(), gt, view)
            tot[1] += _counts(refined.numpy(), gt, view)
            kept += rs.get("masks_kept", 0)
            masks += rs.get("masks_total", 0)
        ms = (time.perf_counter() - t) / len(states) * 1e3
        n_view = sum(int(st.in_view.sum()) for st in states)
        d0, d1 = 100 * tot[0, 0] / n_view, 100 * tot[1, 0] / n_view
        p0, p1 = 100 * tot[0, 2] / max(1, tot[0, 1]), 100 * tot[1, 2] / max(1, tot[1, 1])
        print(f"{name:<14}{d0:10.1f}{p0:10.1f}{d1:9.1f}{p1:9.1f}{d1 / max(d0, 1e-9):8.2f}{p1 - p0:8.1f}"
              f"{100 * kept / max(1, masks):8.1f}%{ms:9.0f}", flush=True)


if __name__ == "__main__":
    main()
