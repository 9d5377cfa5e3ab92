"""Temporal consistency of the branches' labels (adapt/consistency.py) and its fusion term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pl3d_ros.adapt.consistency import BranchConsistency


def _pose(x: float) -> np.ndarray:
    T = np.eye(4)
    T[0, 3] = x
    return T


def _scene(n: int = 400) -> np.ndarray:
    g = np.random.default_rng(0)
    return g.uniform([5, -5, -1], [25, 5, 2], size=(n, 3))  # static world points, metres


def test_consistency_matches_static_points_through_odometry():
    world = _scene()
    cons = BranchConsistency(4, voxel_m=0.3, momentum=0.0, min_matched=50)
    l2 = np.arange(world.shape[0]) % 4
    l3 = (np.arange(world.shape[0]) // 7) % 4
    assert cons.update(world - [0.0, 0, 0], _pose(0.0), 1, l2, l3) is None  # nothing to compare yet
    assert cons.bias(5.0).tolist() == [0.0, 0.0]
    # the vehicle moved 1.3 m forward: the same world points, 1.3 m closer in the LiDAR frame
    flipped = l3.copy()
    flipped[: world.shape[0] // 2] = (flipped[: world.shape[0] // 2] + 1) % 4
    frame = cons.update(world - [1.3, 0, 0], _pose(1.3), 2, l2, flipped)
    assert cons.matched >= 0.99 * world.shape[0]  # a point on a voxel face may round to the next voxel
    assert frame[0] == pytest.approx(1.0, abs=0.01) and frame[1] == pytest.approx(0.5, abs=0.01)
    b = cons.bias(5.0)
    assert b.dtype == torch.float32
    assert b[0] == pytest.approx(5 * np.log(frame[0])) and b[1] == pytest.approx(5 * np.log(frame[1]))


def test_consistency_without_odometry_or_with_time_going_back_starts_again():
    world = _scene()
    labels = np.zeros(world.shape[0], np.int64)
    cons = BranchConsistency(2, momentum=0.0, min_matched=50)
    cons.update(world, _pose(0.0), 10, labels, labels)
    assert cons.update(world, None, 20, labels, labels) is None  # odometry lost: no comparison
    assert cons.update(world, _pose(0.0), 30, labels, labels) is None  # and the history started again
    assert cons.update(world, _pose(0.0), 5, labels, labels) is None  # a stamp back in time
    assert cons.update(world, _pose(0.0), 6, labels, labels).tolist() == [1.0, 1.0]
    assert cons.update(world[:10], _pose(0.0), 7, labels[:10], labels[:10]) is None  # too few matches


def test_consistency_rejects_labels_that_do_not_match_the_points():
    with pytest.raises(ValueError, match="labels at the points"):
        BranchConsistency(3).update(np.zeros((5, 3)), _pose(0.0), 1, np.zeros(5, np.int64), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="voxel"):
        BranchConsistency(3, voxel_m=0.0)


@pytest.mark.usefixtures("one_torch_thread")
def test_full_adds_the_consistency_term_to_the_deployed_fusion():
    import dataclasses

    from fakes import header, small_model, synthetic_frame
    from pl3d_ros.adapt import Adapter
    from pl3d_ros.config import AdaptConfig, Config
    from pl3d_ros.pipeline import FUSION_KEY

    calls = {}
    for gamma in (0.0, 5.0):
        cfg = Config(class_set="xmuda10", adapt=AdaptConfig(fusion_consistency=gamma, swap_every_steps=1)).validate()
        out = []
        ad = Adapter(small_model(), header(), cfg, on_weights=out.append, seed=0)
        for i in range(3):  # a parked vehicle: new scans of one scene, odometry at the origin
            frame = synthetic_frame(i)
            stats = ad.step(dataclasses.replace(frame, stamp_ns=(i + 1) * 100_000_000, pose=np.eye(4)))
            assert "error" not in stats, stats
        calls[gamma] = out[-1][FUSION_KEY]
        if gamma:
            assert 0.0 <= stats["consistency_2d"] <= 1.0 and 0.0 <= stats["consistency_3d"] <= 1.0
            value = ad.method.consistency.value
            assert value is not None and (value < 1).any()  # not every voxel keeps its class
        else:
            assert "consistency_2d" not in stats and ad.method.consistency is None
    shift_only = calls[0.0]
    assert calls[5.0].shape == (2,) and not torch.equal(calls[5.0], shift_only)
