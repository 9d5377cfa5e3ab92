"""Metrics against hand-computed values; training determinism, resume and the train/eval commands."""

import json

import numpy as np
import pytest
import torch

from pl3d_ros.eval.metrics import ConfusionMatrix, SegmentationScores, percentiles
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.labels import load_class_set
from pl3d_ros.models.checkpoint import load_checkpoint
from pl3d_ros.train.augment import AugmentConfig, augment_points
from pl3d_ros.train.trainer import TrainConfig, class_weights, make_sample, state_path, train
from fakes import SENSOR, SMALL


def test_confusion_iou_by_hand():
    cm = ConfusionMatrix(3)
    # gt:   0 0 1 1 2 255 ; pred: 0 1 1 1 0 2
    cm.update(np.array([0, 1, 1, 1, 0, 2]), np.array([0, 0, 1, 1, 2, 255]))
    # class 0: tp 1, fp 1 (gt 2 -> 0), fn 1 (-> 1): 1/3; class 1: tp 2, fp 1: 2/3; class 2: tp 0, fn 1: 0
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx(100 / 3)
    cm2 = ConfusionMatrix(3)
    cm2.update(np.array([0]), np.array([0]))
    assert np.isnan(cm2.iou()[1]) and cm2.miou() == 100.0  # absent classes carry no IoU
    # a class only predicted: IoU 0 in the mean over non-empty unions, left out over present classes
    cm3 = ConfusionMatrix(3)
    cm3.update(np.array([0, 0, 0, 2, 1, 1]), np.array([0, 0, 0, 0, 1, 1]))
    assert cm3.iou()[2] == 0.0 and cm3.miou() == pytest.approx(100 * (3 / 4 + 1 + 0) / 3)
    assert cm3.miou_present() == pytest.approx(100 * (3 / 4 + 1) / 2)  # the stray point is still a miss of class 0
    assert np.isnan(ConfusionMatrix(2).miou_present())
    with pytest.raises(ValueError, match="outside"):
        cm2.update(np.array([5]), np.array([0]))


def test_scores_summary_keys_and_percentiles():
    s = SegmentationScores(2)
    gt = np.array([0, 1, 1, 0])
    in_view = np.array([True, True, False, False])
    s.update(gt, in_view, fused=np.array([0, 1, 0, 0]), pred_2d=np.array([0, 0]),
             pred_3d=np.array([1, 1, 1, 0]), timings_ms={"total": 10.0})
    out = s.summary(["a", "b"])
    assert out["frames"] == 1 and out["miou"]["fused"] == 100.0 and out["miou"]["2d"] == 25.0
    # all points: class 0 tp 2 fp 1 -> 2/3; class 1 tp 1 fn 1 -> 1/2
    assert out["miou_all_points"]["fused"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2, abs=0.01)
    assert set(out["iou_per_class"]) == {"fused", "2d", "3d"} and out["latency_ms"]["total"]["p50"] == 10.0
    assert percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])["p90"] == pytest.approx(9.1)


def test_class_weights_favour_rare_classes():
    w = class_weights([np.array([0] * 90 + [1] * 10 + [255] * 5)], 3)
    assert w[2] == 0 and w[1] > w[0] and w[:2].mean() == pytest.approx(1.0)


def test_point_augmentation_is_rigid_up_to_scale():
    pts = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    cfg = AugmentConfig(jitter_m=0.0, scale=(1.0, 1.0))
    out = augment_points(pts, cfg, np.random.default_rng(1))
    d_in = np.linalg.norm(pts[:, None, :3] - pts[None, :, :3], axis=-1)
    d_out = np.linalg.norm(out[:, None, :3] - out[None, :, :3], axis=-1)
    np.testing.assert_allclose(d_in, d_out, atol=1e-4)
    np.testing.assert_array_equal(out[:, 3], pts[:, 3])


@pytest.fixture(scope="module")
def frames(kitti00):
    seq = KittiSequence(kitti00)
    return [seq.frame(i) for i in range(2)]


def test_sample_labels_follow_points_through_a_mirrored_crop(frames):
    cs = load_class_set("xmuda10")
    ids = cs.to_train_ids(frames[0].labels)
    cfg = AugmentConfig(image_flip=1.0)
    s = make_sample(frames[0], ids, SMALL, SENSOR, cfg, np.random.default_rng(0))
    x = s.inputs
    assert x.image.shape == (1, 3, SMALL.image_height, SMALL.image_width)
    assert x.range_image.shape == (1, 5, SENSOR.rows, SENSOR.cols)
    assert len(s.target_2d) == len(x.uv) > 0 and s.target.shape[0] == frames[0].num_points
    assert (x.uv[:, 0] >= -0.5).all() and (x.uv[:, 0] <= SMALL.image_width - 0.5).all()
    plain = make_sample(frames[0], ids, SMALL, SENSOR, AugmentConfig(image_flip=0.0), np.random.default_rng(0))
    # same draws up to the flip decision: mirrored u = (w - 1) - u
    np.testing.assert_allclose(x.uv[:, 0].numpy(), SMALL.image_width - 1 - plain.inputs.uv[:, 0].numpy(), atol=1e-4)


def _train(frames, out, epochs, resume=False):
    cs = load_class_set("xmuda10")
    cfg = TrainConfig(epochs=epochs, batch_size=2, lr=5e-3, warmup_steps=1, seed=3, val_every=1)
    calls = []
    res = train(frames, out, cs, SMALL, SENSOR, cfg, resume=resume, device="cpu", progress=False,
                validate=lambda m, h: calls.append(1) or {"fused": 0.0})
    return res, calls


def test_training_is_deterministic_and_resumes_exactly(frames, tmp_path):
    torch.set_num_threads(1)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    res_a, calls = _train(frames, a, epochs=2)
    assert len(calls) == 2 and len(res_a["history"]) == 2
    _train(frames, b, epochs=1)
    assert state_path(b).is_file()
    res_b, _ = _train(frames, b, epochs=2, resume=True)  # continues with epoch 2
    assert [r["epoch"] for r in res_b["history"]] == [1, 2]
    ma, ha = load_checkpoint(a)
    mb, _ = load_checkpoint(b)
    for (name, ta), tb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert ha.training["epochs_done"] == 2 and ha.training["frames"] == 2
    assert res_a["history"][-1]["loss"] < res_a["history"][0]["loss"] * 1.5


@pytest.mark.slow
def test_train_and_eval_commands(kitti00, tmp_path):
    """The CLI end to end on one KITTI frame pair: checkpoint, report, metrics.json contract."""
    import dataclasses

    import yaml

    from pl3d_ros import cli

    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump({"model": dataclasses.asdict(SMALL), "sensor": dataclasses.asdict(SENSOR)}))
    ckpt = tmp_path / "m.safetensors"
    assert cli.main(["train", "--data", str(kitti00), "--val", str(kitti00), "--out", str(ckpt),
                     "--config", str(cfg), "--epochs", "1", "--threads", "1"]) == 0
    assert (tmp_path / "m_report" / "confusion_fused.png").stat().st_size > 1000
    out = tmp_path / "eval"
    assert cli.main(["eval", str(ckpt), "--data", str(kitti00), "--out", str(out), "--backend", "torch"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["frames"] == 10
    assert set(m["miou"]) == {"fused", "2d", "3d"} and set(m["miou_all_points"]) == {"fused", "3d"}
    assert set(m["iou_per_class"]["fused"]) == set(load_class_set("xmuda10").names)
    assert {"preprocess", "inference", "postprocess", "total"} <= set(m["latency_ms"])
    assert all(0 <= v <= 100 for v in m["miou"].values())
    assert cli.main(["eval", str(tmp_path / "missing.safetensors"), "--data", str(kitti00),
                     "--out", str(out)]) == 1
