"""pl3d replay end to end: deterministic lockstep and outputs on a short real bag; realtime mode and
the weight deployer on a synthetic one."""

import json

import numpy as np
import pytest

from pl3d_ros.config import Config
from pl3d_ros.eval.replay import SEGMENTATION_TOPIC, VISUALIZATION_TOPIC, ReplayOptions, replay
from pl3d_ros.models.checkpoint import save_checkpoint
from fakes import header, small_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def short_bag(tmp_path_factory, kitti00):
    from pl3d_ros.io.kitti import sequence_to_bag

    out = tmp_path_factory.mktemp("replay") / "s00"
    sequence_to_bag(kitti00, out, max_frames=3)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    return save_checkpoint(path, small_model(), header())


def _opts(method="full", **kw):
    # short stream: swap after every step so adaptation shows
    cfg = Config().replace(**{"adapt.method": method, "adapt.swap_every_steps": 1,
                              "runtime.backend": "torch", "runtime.threads": 1})
    return ReplayOptions(config=cfg, **kw)


def test_lockstep_replay_is_deterministic_and_writes_its_report(short_bag, ckpt, tmp_path):
    a = replay(short_bag, ckpt, tmp_path / "a", _opts(method="full", seed=3, corrupt="fog:2"))
    b = replay(short_bag, ckpt, tmp_path / "b", _opts(method="full", seed=3, corrupt="fog:2", write_bag=False))
    assert a["frames"] == b["frames"] == 3
    assert a["miou_per_frame"] == b["miou_per_frame"] and a["miou"] == b["miou"]
    assert a["pseudo_labels"] == b["pseudo_labels"] and a["adapt_steps"] == 3
    assert a["weight_swaps"] == 3 and a["corruption"] == "fog:2" and a["method"] == "full"
    for key in ("frames", "miou", "miou_all_points", "iou_per_class", "latency_ms", "adapt_steps",
                "weight_swaps", "pseudo_labels"):
        assert key in json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(a["pseudo_labels"]) >= {"base", "refined"}
    for png in ("miou_over_frames.png", "confusion_fused.png", "latency_hist.png"):
        assert (tmp_path / "a" / png).stat().st_size > 1000
    assert "| in view |" in (tmp_path / "a" / "report.md").read_text()

    from pl3d_ros.io.bag import BagReader

    reader = BagReader(tmp_path / "a" / "labeled.mcap")
    topics = reader.info()["topics"]
    assert topics[SEGMENTATION_TOPIC]["count"] == 3 and topics[VISUALIZATION_TOPIC]["count"] == 3
    assert len(list(reader.frames())) == 3  # the camera + cloud + TF of the input are in it too


def test_source_replay_scores_the_undeployed_model_and_seed_changes_corruption(short_bag, ckpt, tmp_path):
    s1 = replay(short_bag, ckpt, tmp_path / "s1", _opts(method="source", corrupt="beam_missing:3", seed=1,
                                                        write_bag=False, plots=False))
    s2 = replay(short_bag, ckpt, tmp_path / "s2", _opts(method="source", corrupt="beam_missing:3", seed=2,
                                                        write_bag=False, plots=False))
    assert s1["adapt_steps"] == 0 and s1["weight_swaps"] == 0 and s1["pseudo_labels"] == {}
    assert s1["miou_per_frame"] != s2["miou_per_frame"]  # other beams dropped


def test_two_inputs_play_as_one_stream_and_realtime_mode_accounts_for_every_frame(synthetic_bag, ckpt, tmp_path):
    m = replay([synthetic_bag, synthetic_bag], ckpt, tmp_path / "rt", _opts(method="tent", mode="realtime", plots=False))
    runner = m["runner"]
    assert runner["frames_in"] == 6
    assert runner["frames_out"] + runner["frames_dropped"] + runner["frames_failed"] == 6
    assert m["frames"] == runner["frames_out"] >= 1
    assert np.isfinite(m["miou"]["fused"])


def test_realtime_replay_deploys_weights_on_the_deployer_thread(synthetic_bag, ckpt, tmp_path, monkeypatch):
    """Realtime replay runs the node's runner: the (niced) adaptation thread hands its weights to
    the app's WeightDeployer, whose normal-priority thread runs backend.swap_weights."""
    import threading

    from pl3d_ros.cpu_budget import thread_nice
    from pl3d_ros.runtime.torch_backend import TorchBackend

    calls = []
    real = TorchBackend.swap_weights

    def recording(self, state_dict):
        calls.append((threading.current_thread().name, thread_nice()))
        return real(self, state_dict)

    monkeypatch.setattr(TorchBackend, "swap_weights", recording)
    base_nice = thread_nice()
    m = replay([synthetic_bag, synthetic_bag], ckpt, tmp_path / "rt", _opts(method="tent", mode="realtime",
                                                                             plots=False, write_bag=False))
    assert m["adapt_steps"] >= 1 and calls, m["runner"]
    assert {name for name, _ in calls} == {"pl3d-deploy"}
    if base_nice is not None:
        assert {nice for _, nice in calls} == {base_nice}  # not the adaptation thread's +10
