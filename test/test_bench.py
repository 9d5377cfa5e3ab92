"""pl3d bench: the grid spec's validation, the merging math (mean ± std over seeds, paired
ablation differences, window mIoU from summed confusions) on hand-made cell folders, and (slow)
the smoke grid's 2 cells on Ray with 2 workers, then resumed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pl3d_ros import registry
from pl3d_ros.eval.bench import Grid, GridError, load_grid, parse_grid, run_cell
from pl3d_ros.eval.bench_results import (mean_over_streams, mean_std, merge, paired_differences, render_markdown,
                                         window_miou, window_ranges)
from pl3d_ros.eval.corruptions import available
from pl3d_ros.eval.metrics import ConfusionMatrix

REPO = Path(__file__).resolve().parents[1]
GRIDS = REPO / "bench" / "grids"


def base_spec() -> dict:
    """A valid grid: one sim stream, source / full / one ablation, two seeds (nothing checked on disk
    but what the spec names)."""
    return {"name": "t", "seeds": [0, 1], "window": 2, "settings": {"adapt.steps_per_frame": 1},
            "methods": {"source": {"adapt.method": "source"}, "full": {"adapt.method": "full"},
                        "full-mla": {"adapt.method": "full", "adapt.disable": ["mla"]}},
            "streams": [{"name": "drive", "kind": "sim", "domains": ["fog", "night"], "frames_per_domain": 2}]}


# ------------------------------------------------------------------------------------ the shipped grids

def test_shipped_grids_cover_the_protocol():
    real = load_grid(GRIDS / "real.yaml", check_inputs=False)
    # every corruption of `pl3d corruptions` at severity 3, one stream each, on KITTI 04 + 05
    assert sorted(s.corrupt for s in real.streams) == sorted(f"{c}:3" for c in available())
    assert all(s.kind == "real" and [Path(p).name for p in s.inputs] == ["04", "05"] for s in real.streams)
    for grid in (real, load_grid(GRIDS / "continual.yaml")):
        assert grid.seeds == (0, 1, 2)
        assert {"source", "tent", "pl", "full"} <= set(grid.methods)
        # one ablation per component of full: the default-on ones removed, the others added
        removed = {c for m in grid.methods for c in grid.method_config(m).adapt.disable}
        added = {c for m in grid.methods for c in grid.method_config(m).adapt.enable}
        assert removed == set(registry.COMPONENTS) - set(registry.OFF_BY_DEFAULT)
        assert added == set(registry.OFF_BY_DEFAULT)
    (cont,) = load_grid(GRIDS / "continual.yaml").streams
    assert cont.kind == "sim" and cont.frames >= 600 and len(cont.domains) >= 5
    smoke = load_grid(GRIDS / "smoke.yaml")
    assert len(smoke.cells("/x")) == 2 and set(smoke.methods) == {"source", "tent"}


def test_real_grid_inputs_exist():
    from conftest import kitti_sequence_dir

    for seq in ("04", "05"):
        kitti_sequence_dir(seq)  # fails in CI (PL3D_REQUIRE_DATA) when missing
    assert len(load_grid(GRIDS / "real.yaml").streams) == len(available())


# ------------------------------------------------------------------------------------------ validation

def _with(change) -> dict:
    spec = copy.deepcopy(base_spec())
    change(spec)
    return spec


BAD = {
    "unknown top-level key": (lambda s: s.update(method={}), "unknown key"),
    "no streams": (lambda s: s.pop("streams"), "streams is missing"),
    "no seeds": (lambda s: s.update(seeds=[]), "seeds is missing"),
    "repeated seed": (lambda s: s.update(seeds=[1, 1]), "repeats a seed"),
    "seed not an integer": (lambda s: s.update(seeds=["a"]), "seeds must be"),
    "bad mode": (lambda s: s.update(mode="fast"), "mode must be"),
    "bad kind": (lambda s: s["streams"][0].update(kind="video"), "kind must be"),
    "stream key typo": (lambda s: s["streams"][0].update(domain=["fog"]), "unknown key"),
    "unknown corruption": (lambda s: s["streams"][0].update(corrupt="rain:3"), "unknown corruption"),
    "bad severity": (lambda s: s["streams"][0].update(corrupt="fog:9"), "severity"),
    "unknown preset": (lambda s: s["streams"][0].update(domains=["fog", "mars"]), "unknown sim preset"),
    "zero frames": (lambda s: s["streams"][0].update(frames_per_domain=0), "frames_per_domain"),
    "frames per domain count": (lambda s: s["streams"][0].update(frames_per_domain=[2]), "one per domain"),
    "sim with inputs": (lambda s: s["streams"][0].update(inputs=["x"]), "not inputs"),
    "real without inputs": (lambda s: s["streams"].append({"name": "r", "kind": "real"}), "inputs must be"),
    "missing input": (lambda s: s["streams"].append({"name": "r", "kind": "real", "inputs": ["no/such/seq"]}),
                      "does not exist"),
    "missing model": (lambda s: s.update(model="no/such.safetensors"), "does not exist"),
    "repeated stream": (lambda s: s["streams"].append(dict(s["streams"][0])), "stream names repeat"),
    "bad stream name": (lambda s: s["streams"][0].update(name="a/b"), "becomes a folder name"),
    "bad method name": (lambda s: s["methods"].update({"full w/o mla": {"adapt.method": "full"}}), "method"),
    "unknown setting": (lambda s: s["methods"]["full"].update({"adapt.lrr": 1}), "method 'full': unknown setting"),
    "bad setting value": (lambda s: s["methods"]["full"].update({"adapt.lr": -1}), "method 'full'"),
    "unknown component": (lambda s: s["methods"]["full-mla"].update({"adapt.disable": ["sam"]}), "method 'full-mla'"),
    "disable without full": (lambda s: s["methods"].update(t={"adapt.method": "tent", "adapt.disable": ["mla"]}),
                             "apply to adapt.method full only"),
    "enable and disable": (lambda s: s["methods"]["full-mla"].update({"adapt.enable": ["mla"]}),
                           "both name mla"),
    "method not named": (lambda s: s["methods"].update(t={"adapt.lr": 0.01}), "set adapt.method"),
    "threads": (lambda s: s["settings"].update({"runtime.threads": 2}), "runtime.threads is 1"),
    "method not a mapping": (lambda s: s["methods"].update(t=["adapt.method", "tent"]), "must be a mapping"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_grids_fail_before_running_with_a_clear_error(case, tmp_path):
    change, message = BAD[case]
    with pytest.raises(GridError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_grid(_with(change), root=tmp_path)


def test_grid_files_anchors_paths_and_selection(tmp_path):
    (tmp_path / "setup.py").write_text("")  # the repository root that relative paths resolve against
    (tmp_path / "grids").mkdir()
    path = tmp_path / "grids" / "g.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base_spec().items() if k != "streams"}) + """
x-sim: &sim
  kind: sim
  frames_per_domain: 3
streams:
  - {<<: *sim, name: other, domains: [layout]}
  - {name: drive, kind: sim, domains: [fog, night], frames_per_domain: 2}
""")
    grid = load_grid(path)
    assert grid.root == str(tmp_path.resolve())
    assert [s.name for s in grid.streams] == ["other", "drive"]
    assert grid.stream("other").frames_per_domain == (3,)
    sub = grid.select(methods=["full"], streams=["drive"], seeds=[5], max_frames=3)
    cells = sub.cells(tmp_path / "out")
    assert [c.key for c in cells] == ["drive/full/seed5"]
    assert [b.key for b in cells[0].bags] == ["fog-n2-s5", "night-n1-s5"]  # world seed = grid seed; capped
    assert cells[0].settings["runtime.threads"] == 1
    with pytest.raises(GridError, match="not in the grid's methods"):
        grid.select(methods=["tent"])
    path.write_text("streams: [\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(path)


def test_frame_spec_settings_resolve_against_the_grid_root(tmp_path):
    spec = base_spec()
    spec["settings"] = {"runtime.int8_calibration": "sim:source"}
    spec["methods"]["gated"] = {"adapt.method": "full", "adapt.enable": ["gate"],
                                "adapt.gate_reference": "data/00, /abs/01"}
    grid = parse_grid(spec, root=tmp_path, check_inputs=False)
    assert grid.methods["gated"]["adapt.gate_reference"] == f"{tmp_path.resolve() / 'data/00'},/abs/01"
    assert grid.settings["runtime.int8_calibration"] == "sim:source"  # a preset is no path


def test_cli_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    from pl3d_ros.cli import main

    (tmp_path / "g.yaml").write_text(yaml.safe_dump(_with(lambda s: s["streams"][0].update(corrupt="rain:3"))))
    assert main(["bench", str(tmp_path / "g.yaml"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "pl3d bench: error:" in err and "unknown corruption 'rain'" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the math

def test_mean_std_over_seeds_and_streams():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}  # sample std (ddof 1)
    assert mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert mean_std([None, float("nan"), 4.0])["n"] == 1 and mean_std([])["mean"] is None
    values = {("a", 0): 10.0, ("b", 0): 20.0, ("a", 1): 14.0, ("b", 1): 22.0, ("a", 2): 30.0}  # seed 2 lacks b
    m = mean_over_streams(values, ["a", "b"], [0, 1, 2])
    assert m["per_seed"] == {"0": 15.0, "1": 18.0} and m["n"] == 2
    assert m["mean"] == pytest.approx(16.5) and m["std"] == pytest.approx(np.std([15, 18], ddof=1), abs=1e-3)
    d = paired_differences({("a", 0): 3.0, ("a", 1): 5.0, ("b", 0): None}, {("a", 0): 1.0, ("b", 0): 2.0})
    assert d == {("a", 0): 2.0}  # only pairs both sides hold


def test_window_miou_sums_confusions_over_the_window():
    assert window_ranges(120, 50) == [(0, 50), (50, 120)]  # the remainder joins the last window
    assert window_ranges(100, 50) == [(0, 50), (50, 100)] and window_ranges(30, 50) == [(0, 30)]
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 3, 200) for _ in range(6)]
    preds = [np.where(rng.random(200) < 0.6, g, rng.integers(0, 3, 200)) for g in gts]
    per_frame = []
    for p, g in zip(preds, gts):
        cm = ConfusionMatrix(3)
        cm.update(p, g)
        per_frame.append(cm.matrix)
    got = window_miou(np.stack(per_frame), 3)
    for (a, b), value in zip(window_ranges(6, 3), got):
        ref = ConfusionMatrix(3)
        ref.update(np.concatenate(preds[a:b]), np.concatenate(gts[a:b]))
        assert value == pytest.approx(ref.miou())  # pooled over the window's points


def _fake_cell(grid: Grid, out: Path, stream: str, method: str, seed: int, fused: float, *,
               frames: int = 4, good: float = 0.5) -> None:
    """A finished cell folder as replay leaves it: metrics.json, confusion_per_frame.npy, cell.json."""
    cell = next(c for c in grid.cells(out) if c.key == f"{stream}/{method}/seed{seed}")
    d = Path(cell.out_dir)
    d.mkdir(parents=True)
    conf = np.zeros((frames, 2, 2), np.int64)
    conf[:, 0, 0] = (good * 100 * (1 + np.arange(frames))).astype(int)  # later frames better
    conf[:, 0, 1] = 50
    conf[:, 1, 1] = 50
    np.save(d / "confusion_per_frame.npy", conf)
    metrics = {"frames": frames, "frames_processed": frames,
               "miou": {"fused": fused, "2d": fused - 10, "3d": fused - 5},
               "miou_all_points": {"fused": fused - 1, "3d": fused - 6},
               "confusion": {"fused": conf.sum(0).tolist()},  # no miou_present: a cell from before it
               "pseudo_labels": {} if method == "source" else {"base": {"density": 50.0, "precision": 60.0,
                                                                        "density_in_view": 40.0}},
               "adapt_steps": 0 if method == "source" else frames, "wall_s": 2.0,
               "latency_ms": {"total": {"p50": 10.0, "p90": 12.0}} | (
                   {} if method == "source" else {"adaptation": {"p50": 100.0, "p90": 120.0}}),
               "miou_running": [fused] * frames}
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "cell.json").write_text(json.dumps(cell.identity()))


def test_merge_means_ablations_windows_and_report(tmp_path):
    grid = parse_grid(base_spec() | {"streams": base_spec()["streams"] + [
        {"name": "drive2", "kind": "sim", "domains": ["layout"], "frames_per_domain": 4}]}, root=tmp_path)
    out = tmp_path / "out"
    fused = {("drive", "source"): [20, 22], ("drive", "full"): [30, 34], ("drive", "full-mla"): [29, 30],
             ("drive2", "source"): [10, 12], ("drive2", "full"): [15, 13], ("drive2", "full-mla"): [14, 13]}
    for (s, m), vals in fused.items():
        for seed, v in zip((0, 1), vals):
            _fake_cell(grid, out, s, m, seed, float(v), good=0.2 if m == "source" else 0.5)
    cells = grid.cells(out)
    assert all(c.state() == "done" for c in cells)
    status = {c.key: {"status": "resumed"} for c in cells}
    status["drive2/full-mla/seed1"] = {"status": "failed", "error": "RuntimeError: boom"}
    r = merge(grid, cells, status, out)
    assert r["summary"]["drive"]["full"]["fused"] == {"mean": 32.0, "std": pytest.approx(2.828, abs=1e-3), "n": 2}
    # the mIoU over the ground truth's classes, from the confusion of cells that predate it
    cell = next(c for c in r["cells"] if c["stream"] == "drive" and c["method"] == "full" and c["seed"] == 0)
    assert cell["fused_present"] == pytest.approx(100 * (np.arange(1, 5).sum() * 50 / (np.arange(1, 5).sum() * 50 + 200)
                                                        + 0.5) / 2, abs=0.01)
    mo = r["kinds"]["sim"]["mean_over_streams"]["full"]["fused"]  # per seed: (30+15)/2, (34+13)/2
    assert mo["per_seed"] == {"0": 22.5, "1": 23.5} and mo["mean"] == 23.0
    abl = r["ablations"]["sim"]["full-mla"]  # full - full-mla, paired; the failed cell has no pair
    assert abl["reference"] == "full" and abl["removed"] == ["mla"]
    assert abl["streams"]["drive"]["mean"] == pytest.approx(2.5) and abl["streams"]["drive2"]["n"] == 1
    assert abl["mean_over_streams"]["per_seed"] == {"0": 1.0}  # seed 1 lacks drive2
    w = r["windows"]["drive"]
    assert w["ranges"] == [[0, 2], [2, 4]]
    assert w["methods"]["full"]["min_minus_source"]["value"] > 0  # better in every window here
    assert r["summary"]["drive"]["full"]["adaptation_ms_p50"]["mean"] == 100.0
    assert r["summary"]["drive"]["full"]["pseudo_labels"]["base"]["precision"]["mean"] == 60.0
    assert r["counts"] == {"cells": 12, "ran": 0, "resumed": 11, "failed": 1, "missing": 0}
    md = render_markdown(r)
    assert "| full | 32.0 ± 2.8 | 14.0 ± 1.4 | 23.0 ± 0.7 |" in md
    assert "over the classes in the ground truth" in md
    assert "+2.50 ± 2.12" in md and "boom" in md and "min over windows of (method − source)" in md
    for paths in r["plots"].values():
        assert all((out / p).stat().st_size > 1000 for p in paths)


def test_resume_refuses_a_cell_folder_of_another_definition(tmp_path):
    grid = parse_grid(base_spec(), root=tmp_path)
    _fake_cell(grid, tmp_path, "drive", "full", 0, 30.0)
    other = grid.select(max_frames=3).cells(tmp_path)
    cell = next(c for c in other if c.key == "drive/full/seed0")
    with pytest.raises(GridError, match="differs in domains, max_frames"):
        cell.state()


def test_a_failing_cell_returns_its_error_and_leaves_no_metrics(tmp_path):
    grid = parse_grid(base_spec(), root=tmp_path)
    cell = grid.cells(tmp_path)[0]
    import torch

    threads = torch.get_num_threads()
    try:
        result = run_cell(cell, str(tmp_path / "no-such-bag"))
    finally:
        torch.set_num_threads(threads)  # the task body sets one thread: not this process's business
    assert not result["ok"] and "does not exist" in result["error"]
    assert (Path(cell.out_dir) / "error.txt").is_file() and not (Path(cell.out_dir) / "metrics.json").exists()


# ------------------------------------------------------------------------------------ on Ray (slow)

@pytest.mark.slow
def test_smoke_grid_runs_two_cells_on_ray_then_resumes(tmp_path, capsys):
    from fakes import header, small_model

    from pl3d_ros.cli import main
    from pl3d_ros.eval.bench import run_grid
    from pl3d_ros.models.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", small_model(), header())
    grid = load_grid(GRIDS / "smoke.yaml").select(model=str(ckpt))
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = run_grid(grid, out, workers=2, cache=cache, progress=False)
    assert r["counts"] == {"cells": 2, "ran": 2, "resumed": 0, "failed": 0, "missing": 0}, r["cells"]
    assert r["ray"]["started"] and r["ray"]["workers"] == 2 and r["ray"]["bags_simulated"] == 2
    assert {c["method"]: c["adapt_steps"] for c in r["cells"]} == {"source": 0, "tent": 4}
    assert all(c["frames"] == 4 for c in r["cells"])  # 2 fog + 2 night frames, one stream
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["fog-night"]["tent"]["fused"]["n"] == 1
    assert "±" in (out / "results.md").read_text()
    assert (out / "plots" / "fog-night_running.png").stat().st_size > 1000
    assert len(list(cache.glob("sim-*/*-n2-s0"))) == 2  # the two domains' bags, simulated once

    # again through the command: both cells are skipped, Ray is not even started
    assert main(["bench", str(GRIDS / "smoke.yaml"), "--out", str(out), "--workers", "2", "--cache", str(cache),
                 "--model", str(ckpt)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["counts"]["resumed"] == 2 and again["counts"]["ran"] == 0 and not again["ray"]["started"]
    assert again["summary"] == saved["summary"]
    assert "| tent |" in capsys.readouterr().out


def test_an_added_component_counts_method_minus_full(tmp_path):
    spec = base_spec()
    spec["methods"]["full+ce"] = {"adapt.method": "full", "adapt.enable": ["ce"]}
    grid = parse_grid(spec, root=tmp_path)
    out = tmp_path / "out"
    for m, v in {"source": 20.0, "full": 30.0, "full-mla": 29.0, "full+ce": 27.0}.items():
        _fake_cell(grid, out, "drive", m, 0, v, good=0.5)
    cells = grid.cells(out)
    r = merge(grid, cells, {c.key: {"status": "resumed"} for c in cells}, out)
    abl = r["ablations"]["sim"]
    assert abl["full+ce"]["added"] == ["ce"] and abl["full+ce"]["streams"]["drive"]["mean"] == pytest.approx(-3.0)
    assert abl["full-mla"]["streams"]["drive"]["mean"] == pytest.approx(1.0)
    assert "| +ce |" in render_markdown(r) and "| −mla |" in render_markdown(r)


def test_merge_only_runs_nothing_and_counts_the_missing_cells(tmp_path):
    from pl3d_ros.eval.bench import run_grid

    grid = parse_grid(base_spec(), root=tmp_path)
    out = tmp_path / "out"
    for m, v in {"source": 20.0, "full": 30.0}.items():
        _fake_cell(grid, out, "drive", m, 0, v, good=0.5)
    r = run_grid(grid, out, progress=False, run=False)
    assert not r["ray"]["started"]
    assert r["counts"] == {"cells": 6, "ran": 0, "resumed": 2, "failed": 0, "missing": 4}
    assert r["summary"]["drive"]["full"]["fused"]["mean"] == 30.0
    assert (out / "results.md").is_file()
