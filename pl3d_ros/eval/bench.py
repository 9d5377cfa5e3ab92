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

Relative paths (inputs, model, and the recordings of FRAME_SPEC_SETTINGS) resolve against the
repository root: the nearest folder above the grid file that holds setup.py, else the grid file's
folder. Every method's settings are validated with
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

Outputs in OUT: results.json, results.md and plots/*.png, merged from the cell folders by
``pl3d_ros.eval.bench_results``, which owns the statistics, the tables and the plots.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pl3d_ros.config import Config, ConfigError
from pl3d_ros.eval.bench_results import merge, render_markdown
from pl3d_ros.eval.streams import (GridError, SimBag, StreamSpec, cache_root, check_name, file_digest, parse_stream,
                                   resolve_model, resolve_path, simulate_bag)

__all__ = ["Grid", "GridError", "Cell", "load_grid", "parse_grid", "run_grid", "run_cell"]

log = logging.getLogger(__name__)

GRID_KEYS = {"name", "description", "model", "seeds", "max_frames", "mode", "window", "settings",
             "methods", "streams"}
MODES = ("lockstep", "realtime")


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


#: Settings that name frames of the model's training data (``sim:PRESET`` or comma-separated
#: recordings): their relative recordings resolve against the grid's root like a stream's inputs.
FRAME_SPEC_SETTINGS = ("adapt.gate_reference", "runtime.int8_calibration")


def _resolve_frame_specs(overrides: dict[str, Any], root: Path) -> dict[str, Any]:
    out = dict(overrides)
    for key in FRAME_SPEC_SETTINGS:
        spec = out.get(key)
        if isinstance(spec, str) and spec and not spec.startswith("sim:"):
            out[key] = ",".join(str(resolve_path(p.strip(), root, key)) for p in spec.split(",") if p.strip())
    return out


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
    settings = _resolve_frame_specs(_overrides(data.get("settings"), "settings"), root)
    if not isinstance(data["methods"], dict):
        raise GridError("methods must be a mapping: name -> dotted settings overrides")
    methods = {check_name(m, "method"): _resolve_frame_specs(_overrides(v, f"method {m!r}"), root)
               for m, v in data["methods"].items()}
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
            grid.method_config(m)
        except ConfigError as exc:
            raise GridError(f"method {m!r}: {exc}") from exc
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
