"""``pl3d bench``: a grid of methods x streams x seeds, each cell a replay run as a Ray task, merged
into one folder of mean ± std tables and plots.

Grid spec (YAML; ``bench/grids/*.yaml``)::

    name: continual                  # the grid's name (tables, progress)
    description: ...                 # optional, printed atop results.md
    model: ""                        # default source checkpoint of the streams; "" = bundled
    seeds: [0, 1, 2]
    max_frames: null                 # optional cap on every stream
    mode: lockstep                   # or realtime (ReplayOptions.mode)
    window: 50                       # frames per window of the windowed table (long streams)
    settings:                        # dotted overrides common to every method
      adapt.steps_per_frame: 1
    methods:                         # name -> dotted overrides; ablations are more methods
      source: {adapt.method: source}
      full: {adapt.method: full}
      full-mla: {adapt.method: full, adapt.disable: [mla]}
    streams:
      - {name: fog, kind: real, inputs: [../shared/data/.../04, ../shared/data/.../05], corrupt: "fog:3"}
      - {name: continual, kind: sim, domains: [fog, night, sensor], frames_per_domain: 120}
    x-anything: ...                  # keys starting with x- are ignored (YAML anchors live there)

Relative paths resolve against the repository root: the nearest folder above the grid file that
holds setup.py, else the grid file's folder. Every method's settings are validated with
``Config().replace`` and every input, preset, corruption and checkpoint is checked before anything
runs (GridError names the entry). Streams: see ``pl3d_ros.eval.streams``.

Running. Cells (stream x method x seed) are ``replay`` runs (lockstep by default, no output bag),
each a Ray task with one CPU (``runtime.threads`` 1 and one torch thread), at most ``workers`` in
flight. Locally ``ray.init`` starts a private Ray instance with ``workers`` CPUs (default: this
machine's); ``address`` (or RAY_ADDRESS) joins a cluster, whose nodes must see the inputs, the
cache and OUT at the same paths (the numbers a cell returns are written into OUT by the driver too,
so results.json is complete even where OUT is not shared). The simulated bags are Ray tasks too,
made once into the cache before the cells that play them (a cell waits on its bags). ``mode:
realtime`` cells run the node's inference and adaptation threads within that one CPU, beside the
other cells: for realtime figures, run ``pl3d replay --mode realtime`` on an otherwise idle machine.

Resume. Each cell lives in OUT/cells/<stream>/<method>/seed<k>/ with cell.json (what it plays:
inputs, settings, checkpoint, seed, caps). A cell whose metrics.json exists is skipped; one whose
cell.json differs from what the grid asks now is an error (never mixed into the tables). A failed
cell is recorded (error in results.json and the cell's error.txt) and the grid goes on; it runs
again next time.

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
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pl3d_ros.config import Config, ConfigError
from pl3d_ros.eval.streams import (GridError, SimBag, StreamSpec, cache_root, check_name, file_digest, parse_stream,
                                   resolve_model, simulate_bag)

__all__ = ["Grid", "GridError", "Cell", "load_grid", "parse_grid", "run_grid", "run_cell", "merge",
           "render_markdown", "mean_std", "mean_over_streams", "paired_differences", "window_ranges",
           "window_miou", "miou_from_confusion"]

log = logging.getLogger(__name__)

GRID_KEYS = {"name", "description", "model", "seeds", "max_frames", "mode", "window", "settings",
             "methods", "streams"}
MODES = ("lockstep", "realtime")
#: The headline numbers of a cell: name -> (metrics.json section, key); mIoU in %.
MIOU_KEYS = {"fused": ("miou", "fused"), "2d": ("miou", "2d"), "3d": ("miou", "3d"),
             "fused_all": ("miou_all_points", "fused"), "3d_all": ("miou_all_points", "3d")}


# ------------------------------------------------------------------------------------------ the grid

@dataclass(frozen=True)
class Grid:
    """A validated grid spec (see the module docstring). methods: name -> the method's own dotted
    overrides; settings: overrides common to all methods; root: where relative paths resolved."""

    name: str
    path: str
    root: str
    seeds: tuple[int, ...]
    methods: Mapping[str, Mapping[str, Any]]
    settings: Mapping[str, Any]
    streams: tuple[StreamSpec, ...]
    max_frames: int | None = None
    mode: str = "lockstep"
    window: int = 50
    description: str = ""

    def method_settings(self, method: str) -> dict[str, Any]:
        """The dotted overrides a cell of ``method`` runs with (common, then the method's, then
        one thread: each cell holds one CPU)."""
        return {**self.settings, **self.methods[method], "runtime.threads": 1}

    def method_config(self, method: str) -> Config:
        """The validated settings of ``method``."""
        return Config().replace(**self.method_settings(method))

    def stream(self, name: str) -> StreamSpec:
        return next(s for s in self.streams if s.name == name)

    def select(self, *, methods: Sequence[str] | None = None, streams: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None, max_frames: int | None = None,
               model: str | None = None) -> Grid:
        """A sub-grid (``--only-methods``, ``--only-streams``, ``--seeds``, ``--max-frames``,
        ``--model``); unknown names are a GridError. ``model`` replaces every stream's checkpoint."""
        grid = self
        if methods:
            unknown = [m for m in methods if m not in self.methods]
            if unknown:
                raise GridError(f"--only-methods: {unknown} not in the grid's methods {list(self.methods)}")
            grid = replace(grid, methods={m: self.methods[m] for m in self.methods if m in methods})
        if streams:
            names = [s.name for s in self.streams]
            unknown = [s for s in streams if s not in names]
            if unknown:
                raise GridError(f"--only-streams: {unknown} not in the grid's streams {names}")
            grid = replace(grid, streams=tuple(s for s in self.streams if s.name in streams))
        if seeds:
            grid = replace(grid, seeds=_seeds(list(seeds), "--seeds"))
        if max_frames is not None:
            grid = replace(grid, max_frames=_positive(max_frames, "--max-frames"))
        if model is not None:
            ckpt = resolve_model(model, Path.cwd(), "--model")
            grid = replace(grid, streams=tuple(replace(s, model=ckpt) for s in grid.streams))
        return grid

    def cells(self, out: str | Path) -> list[Cell]:
        """Every cell, ordered stream, method, seed, with its folder under ``out``/cells."""
        out = Path(out)
        configs = {m: self.method_config(m).flat() for m in self.methods}
        return [Cell(stream=s.name, method=m, seed=k, kind=s.kind,
                     out_dir=str(out / "cells" / s.name / m / f"seed{k}"),
                     inputs=s.inputs, bags=tuple(s.bags(k, self.max_frames)) if s.kind == "sim" else (),
                     corrupt=s.corrupt, checkpoint=s.model, settings=self.method_settings(m),
                     max_frames=self.max_frames, mode=self.mode,
                     stream_identity=s.identity(k, self.max_frames), config=configs[m])
                for s in self.streams for m in self.methods for k in self.seeds]

    def describe(self) -> dict[str, Any]:
        """The grid as results.json records it."""
        return {"name": self.name, "file": self.path, "root": self.root, "description": self.description,
                "seeds": list(self.seeds), "max_frames": self.max_frames, "mode": self.mode,
                "window": self.window, "settings": dict(self.settings),
                "methods": {m: dict(v) for m, v in self.methods.items()},
                "streams": [{"name": s.name, "kind": s.kind, "corrupt": s.corrupt, "model": s.model or "(bundled)",
                             **({"inputs": list(s.inputs)} if s.kind == "real" else
                                {"domains": list(s.domains), "frames_per_domain": list(s.frames_per_domain)})}
                            for s in self.streams]}


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GridError(f"{what} must be a positive integer, got {value!r}")
    return value


def _seeds(value: Any, what: str) -> tuple[int, ...]:
    seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise GridError(f"{what} must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{what} repeats a seed: {seeds}")
    return tuple(seeds)


def _overrides(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise GridError(f"{what} must be a mapping of dotted settings (e.g. adapt.method: tent), got {value!r}")
    threads = value.get("runtime.threads", 1)
    if threads != 1:
        raise GridError(f"{what}: runtime.threads is 1 in every cell (each cell is a one-CPU Ray task; "
                        f"run more cells at once with --workers), got {threads!r}")
    return dict(value)


def repo_root(path: Path) -> Path:
    """The nearest folder at or above ``path``'s folder that holds setup.py, else that folder."""
    start = path.resolve().parent
    return next((p for p in (start, *start.parents) if (p / "setup.py").is_file()), start)


def load_grid(path: str | Path, *, check_inputs: bool = True) -> Grid:
    """Read and validate a grid YAML (GridError names the file and the bad entry)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise GridError(f"cannot read grid {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise GridError(f"grid {path} is not valid YAML: {exc}") from exc
    try:
        return parse_grid(data, path=path, root=repo_root(path), check_inputs=check_inputs)
    except GridError as exc:
        raise GridError(f"grid {path}: {exc}") from exc


def parse_grid(data: Any, *, path: str | Path = "<grid>", root: str | Path = ".", check_inputs: bool = True) -> Grid:
    """A grid from its YAML data (see the module docstring); GridError on the first problem."""
    root = Path(root).resolve()
    if not isinstance(data, dict):
        raise GridError(f"the grid must be a mapping with streams, methods and seeds, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise GridError(f"unknown key(s) {unknown}; known: {sorted(GRID_KEYS)} (and x-* for anchors)")
    for key in ("streams", "methods", "seeds"):
        if not data.get(key):
            raise GridError(f"{key} is missing or empty")
    name = check_name(data.get("name") or Path(str(path)).stem, "name")
    seeds = _seeds(data["seeds"], "seeds")
    max_frames = None if data.get("max_frames") is None else _positive(data["max_frames"], "max_frames")
    window = _positive(data.get("window", 50), "window")
    mode = data.get("mode", "lockstep")
    if mode not in MODES:
        raise GridError(f"mode must be one of {list(MODES)}, got {mode!r}")
    settings = _overrides(data.get("settings"), "settings")
    if not isinstance(data["methods"], dict):
        raise GridError("methods must be a mapping: name -> dotted settings overrides")
    methods = {check_name(m, "method"): _overrides(v, f"method {m!r}") for m, v in data["methods"].items()}
    if not isinstance(data["streams"], list):
        raise GridError("streams must be a list of stream mappings")
    default_model = resolve_model(data.get("model"), root, "model", check_inputs)
    streams = tuple(parse_stream(e, f"streams[{i}]", root, default_model, check_inputs)
                    for i, e in enumerate(data["streams"]))
    names = [s.name for s in streams]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GridError(f"stream names repeat: {dup}")
    grid = Grid(name=name, path=str(path), root=str(root), seeds=seeds, methods=methods, settings=settings,
                streams=streams, max_frames=max_frames, mode=mode, window=window,
                description=str(data.get("description") or "").strip())
    for m in methods:  # every method's settings, validated before anything runs
        if "adapt.method" not in grid.method_settings(m):
            raise GridError(f"method {m!r}: set adapt.method (the default would silently be full)")
        try:
            cfg = grid.method_config(m)
        except ConfigError as exc:
            raise GridError(f"method {m!r}: {exc}") from exc
        if (cfg.adapt.disable or cfg.adapt.enable) and cfg.adapt.method != "full":
            raise GridError(f"method {m!r}: adapt.disable / adapt.enable apply to adapt.method full only, "
                            f"not {cfg.adapt.method}")
    return grid


# ----------------------------------------------------------------------------------------- the cells

@dataclass(frozen=True)
class Cell:
    """One run of the grid: stream x method x seed, as the Ray task receives it.

    inputs: the real stream's recordings (a sim cell gets its bags' paths as task arguments);
    bags: the sim domains it plays; settings: the dotted overrides of its Config; out_dir: its
    folder; stream_identity: what the stream plays (``StreamSpec.identity``); config: every
    setting the cell runs with, defaults included (Config.flat), so that a cell run before a
    default changed is not taken for done."""

    stream: str
    method: str
    seed: int
    kind: str
    out_dir: str
    inputs: tuple[str, ...]
    bags: tuple[SimBag, ...]
    corrupt: str
    checkpoint: str
    settings: Mapping[str, Any]
    max_frames: int | None
    mode: str
    stream_identity: Mapping[str, Any]
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.stream}/{self.method}/seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """What this cell plays and with what, as cell.json holds it (JSON-normalised)."""
        return json.loads(json.dumps({
            **self.stream_identity, "method": self.method, "seed": self.seed,
            "settings": dict(sorted(self.settings.items())), "config": dict(sorted(self.config.items())),
            "checkpoint": self.checkpoint or "(bundled)",
            "checkpoint_sha256": file_digest(self.checkpoint),
            "max_frames": self.max_frames, "mode": self.mode}))

    def state(self) -> str:
        """"done" (metrics.json there, same identity), "todo", or GridError when the folder holds
        results of another cell definition."""
        d = Path(self.out_dir)
        if not (d / "metrics.json").is_file():
            return "todo"
        try:
            found = json.loads((d / "cell.json").read_text())
        except (OSError, ValueError):
            found = None
        want = self.identity()
        if found != want:
            diff = ([k for k in sorted(set(want) | set(found)) if want.get(k) != found.get(k)]
                    if isinstance(found, dict) else ["cell.json missing or unreadable"])
            raise GridError(f"{d} holds results of another run (differs in {', '.join(diff)}); "
                            "use another --out, or delete that cell folder to run it again")
        return "done"


def run_cell(cell: Cell, *bag_paths: str) -> dict[str, Any]:
    """Replay one cell (the Ray task body; runs anywhere the package is installed).

    Returns {"ok": True, "metrics": the metrics dict, "confusion": (F, C, C) int64 or None,
    "host", "task_s"} or {"ok": False, "error": one line, "traceback"}. Errors are returned, not
    raised, so the grid goes on; the cell's log goes to cell.log, a traceback to error.txt."""
    import socket

    import torch

    from pl3d_ros.eval.replay import ReplayOptions, replay

    torch.set_num_threads(1)  # one CPU per task: more threads only contend with the other cells
    out = Path(cell.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "cell.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        inputs = list(bag_paths) if cell.kind == "sim" else list(cell.inputs)
        opts = ReplayOptions(corrupt=cell.corrupt, mode=cell.mode, seed=cell.seed, max_frames=cell.max_frames,
                             write_bag=False, plots=True, pictures=False, label=cell.method,
                             config=Config().replace(**cell.settings))
        metrics = replay(inputs, cell.checkpoint, out, opts)
        npy = out / "confusion_per_frame.npy"
        return {"ok": True, "metrics": metrics, "confusion": np.load(npy) if npy.is_file() else None,
                "host": socket.gethostname(), "task_s": round(time.perf_counter() - t0, 1)}
    except Exception as exc:
        tb = traceback.format_exc()
        logging.getLogger(__name__).error("cell %s failed:\n%s", cell.key, tb)
        (out / "error.txt").write_text(tb)
        (out / "metrics.json").unlink(missing_ok=True)  # e.g. plots failed after it: run it again next time
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": tb,
                "host": socket.gethostname(), "task_s": round(time.perf_counter() - t0, 1)}
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def _store(cell: Cell, result: Mapping[str, Any]) -> None:
    """Write what a task returned into the driver's cell folder when it is not there (OUT not on
    shared storage): the merge reads the folders."""
    d = Path(cell.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "metrics.json").is_file():
        (d / "metrics.json").write_text(json.dumps(result["metrics"], indent=2, default=str))
    if result.get("confusion") is not None and not (d / "confusion_per_frame.npy").is_file():
        np.save(d / "confusion_per_frame.npy", np.asarray(result["confusion"], np.int64))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _run_on_ray(todo: list[Cell], cache: Path, workers: int | None, address: str | None,
                status: dict[str, dict[str, Any]], progress: bool) -> dict[str, Any]:
    """Run the cells on Ray (at most ``workers`` in flight), filling ``status``; returns how Ray
    was started."""
    import ray
    from tqdm import tqdm

    address = address or os.environ.get("RAY_ADDRESS") or None
    t0 = time.perf_counter()
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # address="local": a private instance, never some other user's `ray start` on this machine.
        ray.init(address="local", num_cpus=workers or _cpus(), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    info: dict[str, Any] = {"address": address or "local", "init_s": round(time.perf_counter() - t0, 2)}
    try:
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        info["workers"] = n
        sim_task = ray.remote(num_cpus=1, max_retries=1)(simulate_bag)
        cell_task = ray.remote(num_cpus=1, max_retries=1)(run_cell)
        bags: dict[str, Any] = {}  # bag key -> its path (cached) or the ObjectRef of its simulation
        for cell in todo:
            for bag in cell.bags:
                if bag.key not in bags:
                    path = bag.path(cache)
                    bags[bag.key] = str(path) if path.exists() else sim_task.remote(bag, str(path))
        info["bags_simulated"] = sum(not isinstance(v, str) for v in bags.values())
        pending, inflight = list(todo), {}
        bar = tqdm(total=len(todo), desc="bench", unit="cell", file=sys.stderr, dynamic_ncols=True,
                   disable=not progress)
        done = 0
        while pending or inflight:
            while pending and len(inflight) < n:
                cell = pending.pop(0)
                Path(cell.out_dir).mkdir(parents=True, exist_ok=True)
                (Path(cell.out_dir) / "cell.json").write_text(json.dumps(cell.identity(), indent=2))
                ref = cell_task.remote(cell, *(bags[b.key] for b in cell.bags))  # waits on its bags
                inflight[ref] = (cell, time.perf_counter())
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                cell, started = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the worker died, a bag's simulation failed, ...
                    result = {"ok": False, "error": _one_line(exc)}
                done += 1
                wall = time.perf_counter() - started
                if result["ok"]:
                    _store(cell, result)
                    m = result["metrics"]
                    status[cell.key] = {"status": "ran", "host": result.get("host"), "task_s": result.get("task_s")}
                    bar.set_postfix_str(f"last {cell.key} fused {m['miou']['fused']:.1f}")
                    line = (f"fused {m['miou']['fused']:.1f} 2D {m['miou']['2d']:.1f} 3D {m['miou']['3d']:.1f} "
                            f"({m['frames']} frames, {m['adapt_steps']} steps, {wall:.0f} s)")
                else:
                    status[cell.key] = {"status": "failed", "error": result["error"], "host": result.get("host")}
                    bar.set_postfix_str(f"last {cell.key} FAILED")
                    line = f"FAILED: {result['error']}"
                bar.update(1)
                if progress:  # one line per finished cell, above the bar
                    bar.write(f"[{done}/{len(todo)}] {cell.key}: {line}", file=sys.stderr)
                else:
                    log.info("[%d/%d] %s: %s", done, len(todo), cell.key, line)
        bar.close()
    finally:
        t1 = time.perf_counter()
        ray.shutdown()
        info["shutdown_s"] = round(time.perf_counter() - t1, 2)
    return info


def run_grid(grid: Grid, out: str | Path, *, workers: int | None = None, address: str | None = None,
             cache: str | Path | None = None, progress: bool = True, run: bool = True) -> dict[str, Any]:
    """Run every cell of ``grid`` not done yet under ``out`` (Ray is started only when there is
    one), then merge everything into OUT/results.json, results.md and plots; returns the results
    dict (``counts``: cells ran / resumed / failed). run=False merges the cells already done and
    runs nothing (the others count as missing)."""
    if workers is not None and workers < 1:
        raise GridError(f"--workers must be at least 1, got {workers}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells = grid.cells(out)
    status: dict[str, dict[str, Any]] = {}
    todo = []
    for cell in cells:  # a mismatching folder fails here, before anything runs
        if cell.state() == "done":
            status[cell.key] = {"status": "resumed"}
        else:
            todo.append(cell)
    if status and progress:
        print(f"bench {grid.name}: {len(status)} of {len(cells)} cells already done in {out}, skipped",
              file=sys.stderr)
    ray_info: dict[str, Any] = {"started": False}
    if todo and not run:
        if progress:
            print(f"bench {grid.name}: merge only, {len(todo)} cells not run", file=sys.stderr)
        todo = []
    if todo:
        ray_info = {"started": True, **_run_on_ray(todo, cache_root(cache).resolve(), workers, address,
                                                   status, progress)}
    results = merge(grid, cells, status, out)
    results["ray"] = ray_info
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (out / "results.md").write_text(render_markdown(results))
    return results


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return str(obj)


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


def miou_from_confusion(matrix: np.ndarray) -> float:
    """mIoU (%) of a (C, C) confusion matrix (rows ground truth), as ConfusionMatrix.miou."""
    from pl3d_ros.eval.metrics import ConfusionMatrix

    m = np.asarray(matrix, np.int64)
    cm = ConfusionMatrix(m.shape[0])
    cm.matrix = m
    return cm.miou()


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
    return {
        "frames": metrics.get("frames"), "frames_processed": metrics.get("frames_processed"),
        **{k: (metrics.get(sec) or {}).get(key) for k, (sec, key) in MIOU_KEYS.items()},
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
            effect = (paired_differences(value(ref, "fused"), value(m, "fused")) if removed and not added
                      else paired_differences(value(m, "fused"), value(ref, "fused")) if added and not removed
                      else None)
            if effect is None:
                continue  # both ways at once: no single component's effect
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
              f"x {n} seeds): {c['ran']} ran, {c['resumed']} resumed, {c['failed']} failed",
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
