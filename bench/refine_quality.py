"""Pseudo-label refinement quality by mask provider, scale and scan accumulation, over shifts and seeds.

    v/bin/python bench/refine_quality.py INPUT [INPUT ...] [--model CKPT]
        [--shifts fog:3,snow:3,...] [--seeds 0,1,2] [--configs felz200,felz400,...]
        [--frames N] [--threads 1] [--out DIR]

The source model labels every frame (the base pseudo-labels: the running class-wise thresholds
of METHODS.md section 0, as the adapter makes them, on today's default fusion); each
configuration then refines the same base labels (MLA + GAPP) with its masks, frame after frame
(accumulation needs the frames in order). No adaptation runs: the numbers say what refinement adds
on top of a fixed teacher. A seed is the corruption's random draw, as in ``pl3d bench``.

Printed per shift and configuration (pooled over the stream's frames, in view, against ground
truth): the base and refined density (% of the in-view points) and precision (%), the ratio
refined / base density, the precision change (points), MLA's pass rate (kept / all masks), the
refinement time per frame (ms) and two yardsticks:

- ``ceil``: the ratio if every in-view point were labelled (1 / base density) and the precision
  change that would cost (every unlabelled point takes the model's argmax);
- ``conf``: the precision change of adding as many points as the refinement added, but the
  unlabelled ones the model is most confident about (one threshold over the stream): what the
  masks add beyond lowering the base rule's thresholds. Refinement earns its place where its
  precision change is above ``conf``'s.

And per stream, at the base rule's own density (the "no less density" of the trained-label
target): the precision change of labelling the points the model is most confident about (one
threshold over the stream instead of the class-wise ones), and with ``--temporal K`` of the same
with each point's fused probabilities averaged (in log space) with those of its nearest point
(within 0.3 m) in each of the last K scans, brought in through odometry (``Frame.pose``; a
frame without a pose, or a stamp that goes back, starts over).

Then the mean over the shifts, mean +- std over the seeds. With ``--out``, ``results.json`` and
``frontier.png`` (precision change against density ratio: each configuration, and the curve of
adding unlabelled points by confidence) are written there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
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
from pl3d_ros.transforms import invert  # noqa: E402

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

#: The shifts of the reduced real grid (README "Online adaptation").
SHIFTS = "fog:3,snow:3,beam_missing:3,cross_sensor:3,night:3"


@dataclasses.dataclass
class Stream:
    """One corrupted stream's base labels, pooled over its frames (in view only)."""

    states: list
    base: list  # per frame (N,) int64 base labels (torch)
    view_gt: np.ndarray  # (V,) ground truth of every in-view point, -1 none
    view_base: np.ndarray  # (V,) base label, -1 none
    view_argmax: np.ndarray  # (V,) the fused argmax
    view_conf: np.ndarray  # (V,) the fused confidence
    temporal: np.ndarray | None = None  # (V, C) fused probabilities averaged over scans

    def counts(self, labels: np.ndarray) -> tuple[int, int, int]:
        """(V,) labels -> (labelled, labelled with ground truth, correct)."""
        has = labels >= 0
        ev = has & (self.view_gt >= 0)
        return int(has.sum()), int(ev.sum()), int((labels[ev] == self.view_gt[ev]).sum())

    @functools.cached_property
    def free_by_confidence(self) -> np.ndarray:
        """Indices of the unlabelled points, most confident first (sorted once per stream)."""
        free = np.flatnonzero(self.view_base < 0)
        return free[np.argsort(-self.view_conf[free], kind="stable")]

    def by_confidence(self, added: int) -> np.ndarray:
        """(V,) base labels plus the ``added`` unlabelled points the model is most confident
        about, labelled with its argmax."""
        out = self.view_base.copy()
        take = self.free_by_confidence[:max(0, added)]
        out[take] = self.view_argmax[take]
        return out


#: Temporal yardstick: a point of an earlier scan counts for a point now within this distance (m).
TEMPORAL_RADIUS_M = 0.3


def temporal_average(frames: list, fused: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Per frame (N, C) probabilities: the geometric mean of the frame's own fused ones and, for
    each of the last ``k`` scans, those of its nearest point within TEMPORAL_RADIUS_M in this
    frame's LiDAR frame (through the poses); renormalised."""
    from scipy.spatial import cKDTree

    out = []
    for t, f in enumerate(frames):
        logp = np.log(np.clip(fused[t], 1e-6, 1.0))
        acc, cnt = logp.copy(), np.ones(logp.shape[0])
        for j in range(t - 1, max(-1, t - 1 - k), -1):
            g = frames[j]
            if f.pose is None or g.pose is None or g.stamp_ns >= frames[j + 1].stamp_ns:
                break
            rel = invert(f.pose) @ g.pose
            pts = np.asarray(g.points[:, :3], np.float64) @ rel[:3, :3].T + rel[:3, 3]
            d, nn = cKDTree(pts).query(np.asarray(f.points[:, :3], np.float64), distance_upper_bound=TEMPORAL_RADIUS_M)
            ok = np.isfinite(d)
            acc[ok] += np.log(np.clip(fused[j][nn[ok]], 1e-6, 1.0))
            cnt[ok] += 1
        q = acc / cnt[:, None]
        q = np.exp(q - q.max(axis=1, keepdims=True))
        out.append(q / q.sum(axis=1, keepdims=True))
    return out


def top_at_base_density(stream: Stream, labels: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """(V,) ``labels`` kept on as many points as the base rule labels, the ones of highest
    ``confidence`` (V,) (one threshold over the stream), -1 elsewhere."""
    out = np.full(labels.shape[0], -1, np.int64)
    take = np.argsort(-confidence, kind="stable")[:int((stream.view_base >= 0).sum())]
    out[take] = labels[take]
    return out


def label_stream(model, header, frames: list, cfg0: Config, temporal: int = 0) -> Stream:
    """The source model's base pseudo-labels of every frame, in order (the class-wise thresholds
    run over the stream); with ``temporal`` K > 0 also the probabilities averaged over K scans."""
    cs = header.class_set
    labeler = PseudoLabeler(cs.num_classes, cfg0.pseudo_labels.median_window_frames, cfg0.pseudo_labels.confidence_cap)
    rule = Fusion.of(cfg0.runtime.fusion, header)
    states, base, gts, bases, amax, conf, probs = [], [], [], [], [], [], []
    for i, f in enumerate(frames):
        st = frame_state(f, header, "cpu", i)
        with torch.no_grad():
            _, _, fused = forward_points(model, st.inputs).probs(st.in_view, rule=rule)
        b = labeler(fused)[0]
        view = st.in_view.numpy()
        c, y = fused.max(dim=1)
        gt = st.gt.numpy() if st.gt is not None else np.full(st.num_points, -1)
        states.append(st)
        base.append(b)
        gts.append(gt[view])
        bases.append(b.numpy()[view])
        amax.append(y.numpy()[view])
        conf.append(c.numpy()[view])
        if temporal:
            probs.append(fused.numpy())
    cat = np.concatenate
    stream = Stream(states, base, cat(gts), cat(bases), cat(amax), cat(conf))
    if temporal:
        avg = temporal_average(frames, probs, temporal)
        stream.temporal = cat([a[st.in_view.numpy()] for a, st in zip(avg, states)])
    return stream


def refine_stream(stream: Stream, cfg: Config, sensor) -> tuple[np.ndarray, float, float]:
    """-> ((V,) refined labels in view, MLA pass rate %, ms per frame)."""
    stage = RefinementStage(cfg, sensor, gapp=True, connectivity=False)
    out, kept, masks = [], 0, 0
    t = time.perf_counter()
    for st, b in zip(stream.states, stream.base):
        st = dataclasses.replace(st, masks=None, _pixels=None)
        refined, _, rs = stage.refine(st, b)
        out.append(refined.numpy()[st.in_view.numpy()])
        kept += rs.get("masks_kept", 0)
        masks += rs.get("masks_total", 0)
    ms = (time.perf_counter() - t) / max(1, len(stream.states)) * 1e3
    return np.concatenate(out), 100 * kept / max(1, masks), ms


def density_precision(stream: Stream, labels: np.ndarray) -> tuple[float, float]:
    n, ev, ok = stream.counts(labels)
    return 100 * n / max(1, labels.shape[0]), 100 * ok / max(1, ev)


def frontier(stream: Stream, steps: int = 21) -> list[tuple[float, float]]:
    """(density ratio, precision change) of adding 0 .. all unlabelled points by confidence."""
    d0, p0 = density_precision(stream, stream.view_base)
    free = int((stream.view_base < 0).sum())
    pts = []
    for q in np.linspace(0.0, 1.0, steps):
        d, p = density_precision(stream, stream.by_confidence(int(round(q * free))))
        pts.append((d / max(d0, 1e-9), p - p0))
    return pts


def _figures(row: dict, cname: str) -> dict:
    """One stream-and-seed row's figures of configuration ``cname``, or of the ceiling."""
    if cname == "ceiling":
        return {"ratio": row["ceiling_ratio"], "d_prec": row["ceiling_d_prec"]}
    return row["configs"][cname]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(results["shifts"])
    fig, axes = plt.subplots(1, len(shifts), figsize=(3.2 * len(shifts), 3.2), sharey=True, squeeze=False)
    for ax, shift in zip(axes[0], shifts):
        per_seed = results["shifts"][shift]
        curve = np.mean([r["frontier"] for r in per_seed], axis=0)
        ax.plot(curve[:, 0], curve[:, 1], "-", color="0.5", label="add by confidence")
        for name in results["configs"]:
            x = np.mean([r["configs"][name]["ratio"] for r in per_seed])
            y = np.mean([r["configs"][name]["d_prec"] for r in per_seed])
            ax.plot([x], [y], "o", label=name)
        ax.axhline(-2.0, color="r", lw=0.8, ls=":")
        ax.set_title(shift)
        ax.set_xlabel("density / base (in view)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision change (points)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="KITTI sequence folders or bags, played as one stream")
    ap.add_argument("--model", default="", help="source checkpoint (default: the bundled model)")
    ap.add_argument("--shifts", default=SHIFTS, help="comma list of corruptions NAME:SEVERITY, one stream each "
                    "(\"\" = the clean frames)")
    ap.add_argument("--corrupt", default=None, help="one corruption (the older form of --shifts)")
    ap.add_argument("--seeds", default="0", help="comma list of corruption seeds")
    ap.add_argument("--configs", default="felz200,felz200+acc3", help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temporal", type=int, default=0, help="K > 0: the temporal yardstick over the last K scans")
    ap.add_argument("--out", default="", help="folder for results.json and frontier.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, header = load_checkpoint(resolve_model(args.model))
    model.eval()
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    shifts = [args.corrupt] if args.corrupt is not None else args.shifts.split(",")
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    frames = [f for p in args.inputs for f in open_source(p).frames()][: args.frames]
    cfg0 = Config()
    results: dict = {"model": str(resolve_model(args.model)), "fusion": cfg0.runtime.fusion, "seeds": seeds,
                     "configs": configs, "shifts": {}}
    print(f"{len(frames)} frames per stream, {len(shifts)} shifts x {len(seeds)} seeds, model "
          f"{resolve_model(args.model).name}, fusion {cfg0.runtime.fusion}", flush=True)
    head = (f"{'shift':<14}{'seed':>5} {'config':<14}{'base d':>7}{'base p':>7}{'ref d':>7}{'ref p':>7}{'x dens':>7}"
            f"{'d prec':>7}{'conf':>7}{'ceil x':>7}{'ceil p':>7}{'MLA ok':>7}{'ms/fr':>7}")
    print(head, flush=True)
    for shift in shifts:
        name = shift.split(":")[0] if shift else "clean"
        corruptions = parse_spec(shift, sensor=header.sensor) if shift else []
        results["shifts"][name] = []
        for seed in seeds:
            fr = [apply_corruptions(f, corruptions, (seed, i)) for i, f in enumerate(frames)] if corruptions else frames
            stream = label_stream(model, header, fr, cfg0, args.temporal)
            d0, p0 = density_precision(stream, stream.view_base)
            at_base = {"conf": density_precision(
                stream, top_at_base_density(stream, stream.view_argmax, stream.view_conf))[1] - p0}
            if stream.temporal is not None:
                tl, tc = stream.temporal.argmax(axis=1), stream.temporal.max(axis=1)
                at_base["temporal"] = density_precision(stream, top_at_base_density(stream, tl, tc))[1] - p0
            print(f"{name:<14}{seed:>5} at the base density: " + ", ".join(
                f"{k} {v:+.1f}" for k, v in at_base.items()), flush=True)
            dall, pall = density_precision(stream, np.where(stream.view_base >= 0, stream.view_base, stream.view_argmax))
            row = {"seed": seed, "base_density": d0, "base_precision": p0, "ceiling_ratio": dall / max(d0, 1e-9),
                   "ceiling_d_prec": pall - p0, "at_base_density": at_base, "frontier": frontier(stream), "configs": {}}
            for cname in configs:
                refined, mla_ok, ms = refine_stream(stream, Config().replace(**CONFIGS[cname]), header.sensor)
                d1, p1 = density_precision(stream, refined)
                added = int((refined >= 0).sum() - (stream.view_base >= 0).sum())
                _, pc = density_precision(stream, stream.by_confidence(added))
                row["configs"][cname] = {"density": d1, "precision": p1, "ratio": d1 / max(d0, 1e-9), "d_prec": p1 - p0,
                                         "conf_d_prec": pc - p0, "mla_pass": mla_ok, "ms_per_frame": ms}
                print(f"{name:<14}{seed:>5} {cname:<14}{d0:7.1f}{p0:7.1f}{d1:7.1f}{p1:7.1f}{d1 / max(d0, 1e-9):7.2f}"
                      f"{p1 - p0:+7.1f}{pc - p0:+7.1f}{row['ceiling_ratio']:7.2f}{row['ceiling_d_prec']:+7.1f}"
                      f"{mla_ok:6.1f}%{ms:7.0f}", flush=True)
            results["shifts"][name].append(row)
    print(f"\nmean over the {len(shifts)} shifts, mean +- std over the {len(seeds)} seeds:")
    summary = {}
    for cname in [*configs, "ceiling"]:
        keys = ("ratio", "d_prec") if cname == "ceiling" else ("ratio", "d_prec", "conf_d_prec")
        # per seed: the mean over the shifts
        per_seed = {k: [np.mean([_figures(results["shifts"][s][i], cname)[k] for s in results["shifts"]])
                        for i in range(len(seeds))] for k in keys}
        summary[cname] = {k: [float(np.mean(v)), float(np.std(v))] for k, v in per_seed.items()}
        s = summary[cname]
        print(f"  {cname:<14} density x {s['ratio'][0]:.2f} +- {s['ratio'][1]:.2f}, precision "
              f"{s['d_prec'][0]:+.2f} +- {s['d_prec'][1]:.2f} points"
              + ("" if cname == "ceiling" else
                 f" (the same number of points by confidence: {s['conf_d_prec'][0]:+.2f} +- {s['conf_d_prec'][1]:.2f})"))
    for key in results["shifts"][next(iter(results["shifts"]))][0]["at_base_density"]:
        per_seed = [np.mean([results["shifts"][s][i]["at_base_density"][key] for s in results["shifts"]])
                    for i in range(len(seeds))]
        summary[f"at_base_density_{key}"] = [float(np.mean(per_seed)), float(np.std(per_seed))]
        print(f"  at the base rule's density, {key}: precision {np.mean(per_seed):+.2f} +- {np.std(per_seed):.2f} points")
    results["summary"] = summary
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        plot(results, out / "frontier.png")
        print(f"wrote {out / 'results.json'} and {out / 'frontier.png'}")


if __name__ == "__main__":
    main()
