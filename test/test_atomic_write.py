"""pl3d_ros.atomic_write: one atomic write for checkpoints, training state and the engine cache,
and the clean-up of temp files a killed writer left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pl3d_ros import atomic_write as aw
from pl3d_ros.models.checkpoint import load_checkpoint, save_checkpoint
from pl3d_ros.runtime.engine_cache import EngineCache
from pl3d_ros.train.trainer import load_train_state, save_train_state
from fakes import header, small_model

REPO = Path(__file__).resolve().parents[1]


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_bytes_and_writer_function(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    assert aw.atomic_write(target, b"one") == target and target.read_bytes() == b"one"
    assert (target.stat().st_mode & 0o777) == aw.DEFAULT_MODE
    aw.atomic_write(target, lambda tmp: tmp.write_bytes(b"two"))
    assert target.read_bytes() == b"two" and temps(target.parent) == []


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_keeps_the_old_file_and_no_temp(tmp_path, exc):
    target = tmp_path / "f.bin"
    aw.atomic_write(target, b"old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise exc

    with pytest.raises(type(exc)):
        aw.atomic_write(target, broken)
    assert target.read_bytes() == b"old" and temps(tmp_path) == []


def test_which_temps_are_stale(tmp_path):
    target = tmp_path / "m.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # exited: no process with this pid (pids are not reused at once)
    names = {
        "dead": f".m.safetensors.{dead_pid}.abcd1234.tmp",
        "alive": f".m.safetensors.{os.getpid()}.abcd1234.tmp",
        "legacy_young": ".m.safetensors.k2j4h5g6.tmp",
        "legacy_old": ".m.safetensors.z9y8x7w6.tmp",
        "alive_but_old": f".m.safetensors.{os.getpid()}.qqqqqqqq.tmp",
        "other_file": f".other.{dead_pid}.abcd1234.tmp",
        "not_ours": ".m.safetensors.tmp",
    }
    for n in names.values():
        (tmp_path / n).write_bytes(b"x")
    old = time.time() - aw.STALE_AGE_S - 10
    for key in ("legacy_old", "alive_but_old"):
        os.utime(tmp_path / names[key], (old, old))
    removed = {p.name for p in aw.clean_stale_temps(target)}
    assert removed == {names["dead"], names["legacy_old"], names["alive_but_old"]}
    # a whole directory: the other file's dead temp too
    assert {p.name for p in aw.clean_stale_temps(tmp_path)} == {names["other_file"]}
    assert aw.clean_stale_temps(tmp_path / "missing" / "x") == []


def test_temp_names_parse():
    assert aw._temp_target(".a.b.17.abcdefgh.tmp") == ("a.b", 17)
    assert aw._temp_target(".a.b.abcdefgh.tmp") == ("a.b", None)
    assert aw._temp_target(".a.17.abcdefgh.tmp", "a.17") == ("a.17", None)
    assert aw._temp_target("a.b.abcdefgh.tmp") is None
    assert aw._temp_target(".a.b.abc.tmp") is None


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from pl3d_ros.atomic_write import atomic_write

    def slow(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial checkpoint")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)

    atomic_write(sys.argv[1], slow)
""")


def kill_during_write(target: Path) -> None:
    """Start a writer of ``target``, SIGKILL it mid-write; its temp file stays behind."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(repo=str(REPO)), str(target)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(temps(target.parent)) == 1


def test_kill_during_checkpoint_write_then_next_write_cleans(tmp_path):
    target = tmp_path / "adapted.safetensors"
    model = small_model()
    save_checkpoint(target, model, header())
    kill_during_write(target)
    loaded, _ = load_checkpoint(target)  # the old file is whole
    assert torch.equal(loaded.state_dict()["image.head.bias"], model.state_dict()["image.head.bias"])
    save_checkpoint(target, small_model(1), header())
    assert temps(tmp_path) == []


def test_kill_during_train_state_write_then_next_write_cleans(tmp_path):
    target = tmp_path / "m.safetensors.train-state"
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    save_train_state(target, opt, {"epoch": 1})
    kill_during_write(target)
    assert load_train_state(target, opt)["epoch"] == 1
    save_train_state(target, opt, {"epoch": 2})
    assert temps(tmp_path) == [] and load_train_state(target, opt)["epoch"] == 2


def test_engine_cache_cleans_killed_writes_when_opened(tmp_path):
    cache_dir = tmp_path / "engines"
    EngineCache(cache_dir)
    kill_during_write(cache_dir / "x.engine")
    EngineCache(cache_dir)
    assert temps(cache_dir) == []
