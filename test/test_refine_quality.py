"""The yardsticks of bench/refine_quality.py that its README figures rest on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "refine_quality", Path(__file__).resolve().parents[1] / "bench" / "refine_quality.py")
rq = importlib.util.module_from_spec(_SPEC)
sys.modules["refine_quality"] = rq  # dataclasses look their module up there
_SPEC.loader.exec_module(rq)


def _stream(base, gt, argmax, conf):
    a = [np.asarray(x) for x in (base, gt, argmax, conf)]
    return rq.Stream([], [], a[1].astype(np.int64), a[0].astype(np.int64), a[2].astype(np.int64), a[3].astype(np.float32))


def test_by_confidence_adds_the_most_confident_unlabelled_points():
    s = _stream(base=[0, -1, -1, -1], gt=[0, 1, 2, 3], argmax=[0, 1, 5, 3], conf=[0.9, 0.2, 0.8, 0.5])
    assert s.by_confidence(2).tolist() == [0, -1, 5, 3]
    assert s.counts(s.by_confidence(2)) == (3, 3, 2)
    assert s.by_confidence(0).tolist() == [0, -1, -1, -1]


def test_top_at_base_density_keeps_as_many_points_as_the_base():
    s = _stream(base=[0, -1, 1, -1], gt=[0, 0, 0, 0], argmax=[0, 0, 0, 0], conf=[0.1, 0.9, 0.2, 0.8])
    out = rq.top_at_base_density(s, np.array([7, 8, 9, 6]), s.view_conf)
    assert out.tolist() == [-1, 8, -1, 6]


def _frame(points, stamp, pose=np.eye(4)):
    return SimpleNamespace(points=np.asarray(points, np.float32), stamp_ns=stamp, pose=pose)


def test_temporal_average_is_the_geometric_mean_with_the_nearest_earlier_point():
    pts = [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]
    moved = np.eye(4)
    moved[0, 3] = 1.0  # the sensor moved 1 m along x: the same world points sit 1 m nearer
    frames = [_frame(pts, 1), _frame([[-1.0, 0.0, 0.0], [4.0, 0.0, 0.0]], 2, moved)]
    p0 = np.array([[0.9, 0.1], [0.5, 0.5]])
    p1 = np.array([[0.1, 0.9], [0.5, 0.5]])
    out = rq.temporal_average(frames, [p0, p1], k=1)
    np.testing.assert_allclose(out[0], p0)  # nothing before the first scan
    np.testing.assert_allclose(out[1], [[0.5, 0.5], [0.5, 0.5]], atol=1e-6)
    # a stamp that goes back starts over: the earlier scan is not used
    back = [_frame(pts, 5), _frame(pts, 2)]
    np.testing.assert_allclose(rq.temporal_average(back, [p0, p1], k=1)[1], p1)
