"""What replay reads, skips and says: skip counts per input, unlabelled bags, no usable frame,
topics, slop and extrinsics from the options and the settings (synthetic bags, no dataset)."""

from __future__ import annotations

import numpy as np
import pytest

from fakes import NS, header, small_model, synthetic_frame, write_synthetic_bag
from pl3d_ros.cli import main
from pl3d_ros.config import Config
from pl3d_ros.eval.replay import ReplayError, ReplayOptions, replay
from pl3d_ros.io.bag import BagError, BagTopics
from pl3d_ros.models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "small.safetensors", small_model(), header())


def _opts(method="source", **kw):
    cfg = Config().replace(**{"adapt.method": method, "runtime.backend": "torch", "runtime.threads": 1,
                              **kw.pop("settings", {})})
    return ReplayOptions(config=cfg, write_bag=False, plots=False, **kw)


def test_skipped_clouds_are_counted_per_input_and_reported(tmp_path, ckpt):
    base = synthetic_frame(0).stamp_ns
    # 5 clouds: the 3rd repeats the 2nd's stamp, the 4th goes back in time
    stamps = [base, base + NS // 10, base + NS // 10, base + NS // 20, base + 4 * NS // 10]
    bag = write_synthetic_bag(tmp_path / "skips", 5, cloud_stamps_ns=stamps)
    m = replay(bag, ckpt, tmp_path / "out", _opts())
    (inp,) = m["inputs_read"]
    assert inp["frames"] == 3 and inp["duplicate"] == 1 and inp["out_of_order"] == 1
    assert m["frames_skipped"] == inp["frames_skipped"] == 2 and m["frames_processed"] == 3
    assert "duplicate 1" in inp["skip_reasons"] and "out_of_order 1" in inp["skip_reasons"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "skipped" in report and "out_of_order 1" in report


def test_an_unlabelled_bag_is_labelled_timed_and_says_nothing_was_scored(tmp_path, ckpt):
    bag = write_synthetic_bag(tmp_path / "nolabels", 3, labels=False)
    m = replay(bag, ckpt, tmp_path / "out", _opts("pl"))
    assert m["frames_processed"] == 3 and m["frames_scored"] == 0 and m["frames"] == 0
    assert m["latency_ms"]["total"]["p50"] > 0
    assert m["pseudo_labels"]["base"]["density"] > 0 and m["pseudo_labels"]["base"]["precision"] is None
    assert "nothing was scored" in (tmp_path / "out" / "report.md").read_text()


def test_no_usable_frame_is_an_error_and_a_failing_exit(tmp_path, ckpt, capsys):
    bag = write_synthetic_bag(tmp_path / "badinfo", 3, info_width=640)  # CameraInfo vs 128-px images
    with pytest.raises(ReplayError, match="bad_frame 3"):
        replay(bag, ckpt, tmp_path / "out", _opts())
    rc = main(["replay", str(bag), "--model", str(ckpt), "--method", "source", "--out", str(tmp_path / "cli"),
               "--backend", "torch", "--no-bag"])
    assert rc == 1 and "no frame could be used" in capsys.readouterr().err


def test_slop_comes_from_the_settings(tmp_path, ckpt):
    bag = write_synthetic_bag(tmp_path / "offset", 3, image_offset_ns=30_000_000)  # images 30 ms late
    assert replay(bag, ckpt, tmp_path / "a", _opts())["frames_processed"] == 3  # default slop 50 ms
    with pytest.raises(ReplayError, match="no_image 3"):
        replay(bag, ckpt, tmp_path / "b", _opts(settings={"sync.slop_s": 0.01}))


def test_named_topics_must_exist_and_extrinsics_can_be_given(tmp_path, ckpt, capsys):
    bag = write_synthetic_bag(tmp_path / "topics", 2)
    with pytest.raises(BagError, match="no cloud topic /velodyne_points"):
        replay(bag, ckpt, tmp_path / "a", _opts(topics=BagTopics.given(cloud="/velodyne_points")))
    rc = main(["bag-info", str(bag), "--cloud-topic", "/velodyne_points"])
    assert rc == 1 and "no cloud topic /velodyne_points; topics: " in capsys.readouterr().out
    T = np.eye(4)
    T[:3, :3] = [[0, -1, 0], [0, 0, -1], [1, 0, 0]]
    m = replay(bag, ckpt, tmp_path / "b", _opts(settings={"frames.static_extrinsics": T.ravel().tolist()}))
    assert m["frames_processed"] == 2
    rc = main(["bag-info", str(bag), "--extrinsics", ",".join(str(v) for v in T.ravel()), "--slop", "0.02"])
    assert rc == 0


def test_a_missing_input_fails_before_the_model_loads(tmp_path):
    rc = main(["replay", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "o"), "--method", "source"])
    assert rc == 1 and not (tmp_path / "o").exists()
