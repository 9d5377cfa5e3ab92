"""The bundled default model and `pl3d demo` (the README's first command)."""

import pytest

from pl3d_ros.config import TrainingConfig
from pl3d_ros.models.checkpoint import load_checkpoint, read_header
from pl3d_ros.weights import DEFAULT_MODEL, default_model_path


def test_bundled_model_header_and_load():
    path = default_model_path()
    assert path.stat().st_size <= 20e6  # ships inside the package
    header = read_header(path)
    defaults = TrainingConfig()  # what `pl3d train` makes without options
    assert header.class_set.name == defaults.class_set
    assert header.model.preset == "cpu" and header.sensor == defaults.sensor
    assert header.training["data"]["inputs"] and header.training["epochs_done"] >= 1
    model, _ = load_checkpoint(path, class_set="xmuda10", sensor=defaults.sensor)
    assert sum(p.numel() for p in model.parameters()) > 100_000


def test_missing_bundled_model_is_a_clear_error(monkeypatch, tmp_path):
    from pl3d_ros import weights
    from pl3d_ros.models.checkpoint import CheckpointError

    monkeypatch.setattr(weights, "DEFAULT_MODEL", tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="pass --model"):
        weights.default_model_path()
    assert DEFAULT_MODEL.name.endswith(".safetensors")


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_short_drive(tmp_path, monkeypatch, capsys):
    from pl3d_ros import cli

    monkeypatch.setenv("PL3D_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--frames", "3", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "source" in text and "full" in text and "fused" in text
    for method in ("source", "full"):
        assert (out / method / "metrics.json").is_file() and (out / method / "labeled.mcap").is_dir()
    assert (out / "miou_over_frames.png").is_file()
    assert any((tmp_path / "cache" / "demo").iterdir())  # the simulated drive is cached
