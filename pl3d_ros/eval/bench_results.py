"""The merge of ``pl3d bench``'s cell folders: the statistics over seeds and streams, the windowed
numbers, results.json's content, results.md's tables and the plots. The grid spec and running
its cells are ``pl3d_ros.eval.bench``, whose ``run_grid`` calls :func:`merge` and
:func:`render_markdown` once the cells are done.

Outputs in OUT: results.json (every cell's key numbers, per (stream, method) mean ± std over
seeds, means over streams, ablations, windows), results.md (the tables), plots/*.png.

Statistics. mean ± std is the mean and the sample standard deviation (ddof 1) over seeds; with one
seed the std is not defined ("n/a"). "mean over streams": for each seed the mean over the kind's
streams (a seed missing a stream is left out), then mean ± std over those seeds. Ablations: for a
method that is ``full`` minus components, full − method, paired by (stream, seed), the same way.
Windows: fused in-view mIoU of each window of frames from the summed per-frame confusion matrices
(confusion_per_frame.npy), mean over seeds, and the minimum over windows of (method − source),
paired by seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: bench imports this module
    from pl3d_ros.eval.bench import Cell, Grid
    from pl3d_ros.eval.streams import StreamSpec

__all__ = ["merge", "render_markdown", "cell_record", "mean_std", "mean_over_streams", "paired_differences",
           "window_ranges", "window_miou", "miou_from_confusion", "MIOU_KEYS"]

#: The headline numbers of a cell: name -> (metrics.json section, key); mIoU in %.
MIOU_KEYS = {"fused": ("miou", "fused"), "2d": ("miou", "2d"), "3d": ("miou", "3d"),
             "fused_all": ("miou_all_points", "fused"), "3d_all": ("miou_all_points", "3d"),
             "fused_present": ("miou_present", "fused")}


# --------------------------------------------------------------------------------------------- math

def _finite(x: Any) -> bool:
    return x is not None and not isinstance(x, bool) and math.isfinite(float(x))


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """{"mean", "std", "n"} of the finite values: sample std (ddof 1), None with fewer than two
    values; mean None when there is none."""
    v = [float(x) for x in values if _finite(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(float(np.mean(v)), 3), "std": round(float(np.std(v, ddof=1)), 3) if len(v) > 1 else None,
            "n": len(v)}


def mean_over_streams(values: Mapping[tuple[str, int], float | None], streams: Sequence[str],
                      seeds: Sequence[int]) -> dict[str, Any]:
    """For each seed the mean over ``streams`` of values[(stream, seed)] (a seed missing any
    stream is left out), then mean ± std over those seeds; "per_seed" holds the seeds' means."""
    per_seed = {}
    for seed in seeds:
        vals = [values.get((s, seed)) for s in streams]
        if vals and all(_finite(v) for v in vals):
            per_seed[seed] = float(np.mean(vals))
    return mean_std(per_seed.values()) | {"per_seed": {str(k): round(v, 3) for k, v in per_seed.items()}}


def paired_differences(a: Mapping[Any, float | None], b: Mapping[Any, float | None]) -> dict[Any, float]:
    """a[k] - b[k] for every key both hold finite values for (pairing by (stream, seed))."""
    return {k: float(a[k]) - float(b[k]) for k in a if k in b and _finite(a[k]) and _finite(b[k])}


def miou_from_confusion(matrix: np.ndarray, present_only: bool = False) -> float:
    """mIoU (%) of a (C, C) confusion matrix (rows ground truth), as ConfusionMatrix.miou
    (present_only: .miou_present, the classes in the ground truth)."""
    from pl3d_ros.eval.metrics import ConfusionMatrix

    m = np.asarray(matrix, np.int64)
    cm = ConfusionMatrix(m.shape[0])
    cm.matrix = m
    return cm.miou_present() if present_only else cm.miou()


def window_ranges(frames: int, window: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of consecutive windows of ``window`` frames; a shorter remainder
    joins the last window (so no window is a handful of noisy frames); one window if fewer."""
    if frames <= 0:
        return []
    n = max(1, frames // window)
    return [(i * window, (i + 1) * window if i < n - 1 else frames) for i in range(n)]


def window_miou(confusion: np.ndarray, window: int) -> list[float]:
    """Fused mIoU (%) of each window of ``window_ranges`` from (F, C, C) per-frame confusions,
    summed over the window's frames (not a mean of per-frame mIoUs)."""
    conf = np.asarray(confusion)
    return [miou_from_confusion(conf[a:b].sum(0)) for a, b in window_ranges(len(conf), window)]


# -------------------------------------------------------------------------------------------- merge

def cell_record(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The key numbers of one cell from its metrics.json (mIoU in %, times in ms and s)."""
    lat = metrics.get("latency_ms") or {}
    miou = {k: (metrics.get(sec) or {}).get(key) for k, (sec, key) in MIOU_KEYS.items()}
    fused_confusion = (metrics.get("confusion") or {}).get("fused")
    if miou["fused_present"] is None and fused_confusion is not None:  # a cell from before the key
        miou["fused_present"] = round(miou_from_confusion(fused_confusion, present_only=True), 2)
    return {
        "frames": metrics.get("frames"), "frames_processed": metrics.get("frames_processed"),
        **miou,
        "pseudo_labels": metrics.get("pseudo_labels") or {},
        "adapt_steps": metrics.get("adapt_steps"), "adapter_errors": metrics.get("adapter_errors"),
        "weight_swaps": metrics.get("weight_swaps"), "wall_s": metrics.get("wall_s"),
        "adaptation_ms": lat.get("adaptation"), "inference_ms": lat.get("total"),
        "corruption": metrics.get("corruption"), "checkpoint": metrics.get("checkpoint"),
    }


def _summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """mean ± std over a (stream, method)'s seeds of every key number."""
    out: dict[str, Any] = {k: mean_std(r[k] for r in records) for k in MIOU_KEYS}
    for key in ("adapt_steps", "wall_s", "frames"):
        out[key] = mean_std(r[key] for r in records)
    for q in ("p50", "p90"):
        out[f"adaptation_ms_{q}"] = mean_std((r["adaptation_ms"] or {}).get(q) for r in records)
    stages = list(dict.fromkeys(s for r in records for s in r["pseudo_labels"]))  # whatever stages they carry
    out["pseudo_labels"] = {st: {k: mean_std((r["pseudo_labels"].get(st) or {}).get(k) for r in records)
                                 for k in ("density", "density_in_view", "precision")} for st in stages}
    return out


def _reference(grid: Grid, method: str, configs: Mapping[str, dict[str, Any]]) -> str | None:
    """The ``full`` method an ablation is measured against: the method whose settings equal
    ``method``'s with adapt.disable and adapt.enable empty (None when ``method`` is no ablation
    or has none)."""
    flat = configs[method]
    if flat["adapt.method"] != "full" or not (flat["adapt.disable"] or flat["adapt.enable"]):
        return None
    want = {**flat, "adapt.disable": [], "adapt.enable": []}
    return next((m for m in grid.methods if m != method and configs[m] == want), None)


def _source_method(configs: Mapping[str, dict[str, Any]]) -> str | None:
    names = [m for m, f in configs.items() if f["adapt.method"] == "source"]
    return "source" if "source" in names else (names[0] if names else None)


def merge(grid: Grid, cells: Sequence[Cell], status: Mapping[str, Mapping[str, Any]], out: str | Path) -> dict[str, Any]:
    """Read every cell folder and merge (see the module docstring); writes the plots."""
    out = Path(out)
    configs = {m: grid.method_config(m).flat() for m in grid.methods}
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    confusions: dict[tuple[str, str, int], np.ndarray] = {}
    running: dict[tuple[str, str, int], list[float]] = {}
    rows = []
    for cell in cells:
        st = dict(status.get(cell.key) or {"status": "missing"})
        row: dict[str, Any] = {"stream": cell.stream, "method": cell.method, "seed": cell.seed, **st,
                               "dir": str(Path(cell.out_dir).relative_to(out)) if Path(cell.out_dir).is_relative_to(out)
                               else cell.out_dir}
        d = Path(cell.out_dir)
        if st["status"] in ("ran", "resumed") and (d / "metrics.json").is_file():
            metrics = json.loads((d / "metrics.json").read_text())
            k = (cell.stream, cell.method, cell.seed)
            records[k] = cell_record(metrics)
            running[k] = metrics.get("miou_running") or []
            if (d / "confusion_per_frame.npy").is_file():
                confusions[k] = np.load(d / "confusion_per_frame.npy")
            row.update(records[k])
        rows.append(row)

    summary = {s.name: {m: _summarise([records[(s.name, m, k)] for k in grid.seeds if (s.name, m, k) in records])
                        for m in grid.methods} for s in grid.streams}

    def value(m: str, key: str) -> dict[tuple[str, int], float | None]:
        return {(s, k): r[key] for (s, mm, k), r in records.items() if mm == m}

    kinds: dict[str, Any] = {}
    ablations: dict[str, Any] = {}
    for kind in ("real", "sim"):
        names = [s.name for s in grid.streams if s.kind == kind]
        if not names:
            continue
        kinds[kind] = {"streams": names, "mean_over_streams": {
            m: {key: mean_over_streams(value(m, key), names, grid.seeds) for key in MIOU_KEYS}
            for m in grid.methods}}
        for m in grid.methods:
            ref = _reference(grid, m, configs)
            if ref is None:
                continue
            # what the changed components add: reference - method for a removed one, method -
            # reference for an added one (positive: the component helps)
            removed, added = list(configs[m]["adapt.disable"]), list(configs[m]["adapt.enable"])
            if removed and added:
                continue  # both ways at once: no single component's effect
            with_c, without_c = (ref, m) if removed else (m, ref)
            effect = paired_differences(value(with_c, "fused"), value(without_c, "fused"))
            ablations.setdefault(kind, {})[m] = {
                "reference": ref, "removed": removed, "added": added,
                "streams": {s: mean_std(v for (ss, _), v in effect.items() if ss == s) for s in names},
                "mean_over_streams": mean_over_streams(effect, names, grid.seeds)}

    windows = _windows(grid, confusions, _source_method(configs))
    plots = _plots(grid, running, windows, out / "plots")
    counts = {"cells": len(cells), **{s: sum(r["status"] == s for r in rows)
                                      for s in ("ran", "resumed", "failed", "missing")}}
    return {"grid": grid.describe(), "out": str(out), "counts": counts, "cells": rows, "summary": summary,
            "kinds": kinds, "ablations": ablations, "windows": windows, "plots": plots,
            "source_method": _source_method(configs)}


def _windows(grid: Grid, confusions: Mapping[tuple[str, str, int], np.ndarray], source: str | None) -> dict[str, Any]:
    """The windowed numbers of each long stream (>= 2 windows of scored frames in every cell)."""
    out: dict[str, Any] = {}
    for s in grid.streams:
        lengths = [len(c) for (ss, _, _), c in confusions.items() if ss == s.name]
        if not lengths or min(lengths) < 2 * grid.window:
            continue
        frames = min(lengths)  # the same in every cell unless a cell read fewer frames
        per: dict[str, dict[int, list[float]]] = {}
        for m in grid.methods:
            per[m] = {k: window_miou(confusions[(s.name, m, k)][:frames], grid.window)
                      for k in grid.seeds if (s.name, m, k) in confusions}
        entry: dict[str, Any] = {"window": grid.window, "frames": frames,
                                 "ranges": [list(r) for r in window_ranges(frames, grid.window)],
                                 "source": source, "methods": {}}
        for m, by_seed in per.items():
            if not by_seed:
                continue
            arr = np.array(list(by_seed.values()), np.float64)  # (seeds, windows)
            e: dict[str, Any] = {"seeds": len(by_seed), "miou": _rounded(np.nanmean(arr, 0)),
                                 "min": _rounded(np.nanmin(arr, 0)), "max": _rounded(np.nanmax(arr, 0))}
            if source and m != source and per.get(source):
                pairs = [np.array(by_seed[k]) - np.array(per[source][k]) for k in by_seed if k in per[source]]
                if pairs:
                    diff = np.array(pairs)  # (paired seeds, windows)
                    mean = np.nanmean(diff, 0)
                    w = int(np.nanargmin(mean))
                    e["minus_source"] = _rounded(mean)
                    e["min_minus_source"] = {"value": round(float(mean[w]), 3), "window": entry["ranges"][w],
                                             **{k: v for k, v in mean_std(diff[:, w]).items() if k != "mean"}}
            entry["methods"][m] = e
        out[s.name] = entry
    return out


def _rounded(a: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(v) else round(float(v), 3) for v in a]


def _plots(grid: Grid, running: Mapping[tuple[str, str, int], list[float]], windows: Mapping[str, Any],
           folder: Path) -> dict[str, list[str]]:
    """Per stream: running fused mIoU per method (mean over seeds, min-max band), and for long
    streams the windowed mIoU; returns stream -> PNG paths relative to OUT."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}
    for s in grid.streams:
        series = {}
        for m in grid.methods:
            runs = [running[(s.name, m, k)] for k in grid.seeds if running.get((s.name, m, k))]
            if runs:
                n = min(len(r) for r in runs)  # equal unless a cell read fewer frames
                arr = np.array([r[:n] for r in runs], np.float64)  # (seeds, frames)
                series[m] = (np.arange(n), np.nanmean(arr, 0), np.nanmin(arr, 0), np.nanmax(arr, 0), len(runs))
        if not series:
            continue
        path = _band_plot(folder / f"{s.name}_running.png", series, s, grid.max_frames, "frame",
                          "running fused mIoU, in view (%)",
                          f"{grid.name}: {s.name} (mean over seeds {list(grid.seeds)}, band min-max)")
        made[s.name] = [f"plots/{path.name}"]
        w = windows.get(s.name)
        if w:
            mid = np.array([(a + b - 1) / 2 for a, b in w["ranges"]])
            series = {m: (mid, _nan(e["miou"]), _nan(e["min"]), _nan(e["max"]), e["seeds"])
                      for m, e in w["methods"].items()}
            path = _band_plot(folder / f"{s.name}_windows.png", series, s, grid.max_frames, "frame (window centre)",
                              f"fused mIoU per {w['window']}-frame window (%)",
                              f"{grid.name}: {s.name}, windowed (mean over seeds, band min-max)", marker="o")
            made[s.name].append(f"plots/{path.name}")
    return made


def _band_plot(path: Path, series: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]],
               stream: StreamSpec, max_frames: int | None, xlabel: str, ylabel: str, title: str,
               marker: str | None = None) -> Path:
    """One line per method: name -> (x, mean, min, max, seeds), a min-max band where seeds > 1,
    a sim stream's domain changes marked."""
    from pl3d_ros.eval.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m, (x, mean, lo, hi, seeds) in series.items():
        (line,) = ax.plot(x, mean, label=m, lw=1.2, marker=marker, ms=3)
        if seeds > 1:
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    _mark_domains(ax, stream, max_frames)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nan(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def _mark_domains(ax, stream: StreamSpec, max_frames: int | None) -> None:
    """Dashed lines where a sim stream enters the next domain, labelled with the preset."""
    if stream.kind != "sim":
        return
    for preset, start, _ in stream.played(max_frames):
        if start:
            ax.axvline(start - 0.5, color="grey", ls="--", lw=0.8)
        ax.text(start, 1.0, f" {preset}", transform=ax.get_xaxis_transform(), va="top", fontsize=7, color="grey")


# ----------------------------------------------------------------------------------------- markdown

def _fmt(ms: Mapping[str, Any] | None, n_expected: int, digits: int = 1, sign: bool = False) -> str:
    """"mean ± std" ("± n/a" with one value; "(n=k)" when fewer than expected; "-" when none)."""
    if not ms or ms.get("mean") is None:
        return "-"
    spec = f"+.{digits}f" if sign else f".{digits}f"
    std = "n/a" if ms["std"] is None else f"{ms['std']:.{digits}f}"
    text = f"{ms['mean']:{spec}} ± {std}"
    return text + (f" (n={ms['n']})" if ms["n"] < n_expected else "")


def _mean(ms: Mapping[str, Any] | None, digits: int = 0) -> str:
    return "-" if not ms or ms.get("mean") is None else f"{ms['mean']:.{digits}f}"


def _pooled(results: Mapping[str, Any], streams: Sequence[str], method: str, key: str) -> dict[str, Any]:
    """mean over every cell of ``method`` on ``streams`` of a record key (times, steps)."""
    def get(r: Mapping[str, Any]) -> Any:
        if key.startswith("adaptation_ms_"):
            return (r.get("adaptation_ms") or {}).get(key.rsplit("_", 1)[1])
        return r.get(key)

    return mean_std(get(r) for r in results["cells"] if r["method"] == method and r["stream"] in streams
                    and r["status"] in ("ran", "resumed"))


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: per stream kind the mIoU tables, ablations, pseudo-labels, windows; plots;
    failed cells."""
    g = results["grid"]
    seeds, methods, n = g["seeds"], list(g["methods"]), len(g["seeds"])
    c = results["counts"]
    lines = [f"# Benchmark `{g['name']}`", ""]
    if g["description"]:
        lines += [g["description"], ""]
    lines += [f"- grid: `{g['file']}`; {c['cells']} cells ({len(g['streams'])} streams x {len(methods)} methods "
              f"x {n} seeds): {c['ran']} ran, {c['resumed']} resumed, {c['failed']} failed"
              + (f", {c['missing']} not run (merge only)" if c.get("missing") else ""),
              f"- seeds {seeds}; mode {g['mode']}; common settings "
              + (", ".join(f"`{k}: {v}`" for k, v in g["settings"].items()) or "none")
              + (f"; max_frames {g['max_frames']}" if g["max_frames"] else ""),
              f"- wall time {results.get('wall_s', '-')} s" + (
                  f"; Ray ({results['ray']['address']}, {results['ray'].get('workers')} workers) "
                  f"started in {results['ray'].get('init_s')} s" if results.get("ray", {}).get("started") else ""),
              "", "mIoU in %, in-view points; each entry is mean ± sample std over the seeds (n/a with one "
              "seed; (n=k) where fewer cells than seeds succeeded). \"mean over streams\": for each seed the "
              "mean over the streams, then mean ± std over the seeds. steps: adaptation steps per cell; "
              "adapt ms: adaptation time per frame (p50 over frames, mean over cells); wall s: per cell.", ""]
    for kind, kd in results["kinds"].items():
        streams = kd["streams"]
        lines += [f"## {kind} streams", ""]
        head = "| method | " + " | ".join(streams) + " | mean over streams |"
        sep = "|---" * (len(streams) + 2) + "|"
        lines += ["### fused mIoU", "", head + " steps | adapt ms p50 | replay wall s |", sep + "---|---|---|"]
        for m in methods:
            cells = [_fmt(results["summary"][s][m]["fused"], n) for s in streams]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(kd['mean_over_streams'][m]['fused'], n)} | "
                         f"{_mean(_pooled(results, streams, m, 'adapt_steps'))} | "
                         f"{_mean(_pooled(results, streams, m, 'adaptation_ms_p50'))} | "
                         f"{_mean(_pooled(results, streams, m, 'wall_s'))} |")
        lines += ["", "### fused mIoU over the classes in the ground truth (a class only predicted "
                  "does not enter the mean; eval/metrics.py)", "", head, sep]
        for m in methods:
            cells = [_fmt(results["summary"][s][m]["fused_present"], n) for s in streams]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(kd['mean_over_streams'][m]['fused_present'], n)} |")
        lines += ["", "### 2D / 3D mIoU", "", head, sep]
        for m in methods:
            cells = [f"{_fmt(results['summary'][s][m]['2d'], n)} / {_fmt(results['summary'][s][m]['3d'], n)}"
                     for s in streams]
            mo = kd["mean_over_streams"][m]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(mo['2d'], n)} / {_fmt(mo['3d'], n)} |")
        abl = results["ablations"].get(kind)
        if abl:
            lines += ["", "### ablations: what each component adds (fused; full − method for a removed one, "
                      "method − full for an added one; paired by stream and seed; positive: the component "
                      "helps)", "",
                      "| method | component | " + " | ".join(streams) + " | mean over streams |",
                      "|---|---" + "|---" * (len(streams) + 1) + "|"]
            for m, a in abl.items():
                changed = [f"−{c}" for c in a["removed"]] + [f"+{c}" for c in a.get("added", [])]
                lines.append(f"| {m} (vs {a['reference']}) | {', '.join(changed)} | "
                             + " | ".join(_fmt(a["streams"][s], n, 2, sign=True) for s in streams)
                             + f" | {_fmt(a['mean_over_streams'], n, 2, sign=True)} |")
        lines += _pseudo_label_table(results, streams, methods)
        for s in streams:
            w = results["windows"].get(s)
            if w:
                lines += _window_table(s, w, methods, results.get("source_method"))
        lines.append("")
    failed = [r for r in results["cells"] if r["status"] == "failed"]
    if failed:
        lines += ["## failed cells", "", "| cell | error |", "|---|---|"]
        lines += [f"| {r['stream']}/{r['method']}/seed{r['seed']} | {r['error']} |".replace("\n", " ")
                  for r in failed]
        lines.append("")
    if results["plots"]:
        lines += ["## plots", ""]
        for s, paths in results["plots"].items():
            lines += [f"![{s}: {Path(p).stem}]({p})" for p in paths]
        lines.append("")
    return "\n".join(lines)


def _pseudo_label_table(results: Mapping[str, Any], streams: Sequence[str], methods: Sequence[str]) -> list[str]:
    stages = list(dict.fromkeys(st for r in results["cells"] if r["stream"] in streams
                                for st in (r.get("pseudo_labels") or {})))
    if not stages:
        return []
    lines = ["", "### pseudo-labels: density / in-view density / precision (%, mean over streams and seeds)", "",
             "| method | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for m in methods:
        cells = [r for r in results["cells"] if r["method"] == m and r["stream"] in streams and r.get("pseudo_labels")]
        if not cells:
            continue
        row = []
        for st in stages:
            vals = [mean_std((r["pseudo_labels"].get(st) or {}).get(k) for r in cells)
                    for k in ("density", "density_in_view", "precision")]
            row.append(" / ".join(_mean(v, 1) for v in vals))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines


def _window_table(stream: str, w: Mapping[str, Any], methods: Sequence[str], source: str | None) -> list[str]:
    ranges = [f"{a}-{b - 1}" for a, b in w["ranges"]]
    tail = f"min over windows of (method − {source})" if source else "min over windows of (method − source)"
    lines = ["", f"### {stream}: fused mIoU per {w['window']}-frame window (mean over seeds; "
             f"{w['frames']} scored frames, the remainder joins the last window)", "",
             "| method | " + " | ".join(ranges) + f" | {tail} |", "|---" * (len(ranges) + 2) + "|"]
    for m in methods:
        e = w["methods"].get(m)
        if not e:
            continue
        mm = e.get("min_minus_source")
        last = "-"
        if mm:
            std = "n/a" if mm["std"] is None else f"{mm['std']:.2f}"
            last = f"{mm['value']:+.2f} ± {std} (frames {mm['window'][0]}-{mm['window'][1] - 1})"
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in e["miou"]) + f" | {last} |")
    return lines
