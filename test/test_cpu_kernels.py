"""The compiled per-point loops' own elementary functions and edge cases (their agreement with
the numpy / torch stages they replaced is tested where those stages are: test_fastpath,
test_geometry)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pl3d_ros import cpu_kernels
from pl3d_ros.config import RangeImageConfig
from pl3d_ros.geometry import range_projection
from pl3d_ros.io.kitti import KittiSequence


def test_atan2f_within_four_ulp_of_float64_in_every_quadrant():
    rng = np.random.default_rng(0)
    y = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-3, 3, 20000)).astype(np.float32)
    x = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-3, 3, 20000)).astype(np.float32)
    y[:4], x[:4] = [0.0, 1.0, 0.0, -1.0], [1.0, 0.0, -1.0, 0.0]  # the axes
    got = np.array([cpu_kernels._atan2f(a, b) for a, b in zip(y, x)], dtype=np.float32)
    want = np.arctan2(y.astype(np.float64), x.astype(np.float64))
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - want) / np.maximum(ulp, np.spacing(np.float32(1e-3)))) <= 4.0
    assert cpu_kernels._atan2f(np.float32(0.0), np.float32(0.0)) == 0.0
    assert np.isnan(cpu_kernels._atan2f(np.float32(np.nan), np.float32(1.0)))


def test_expf_neg_relative_error():
    x = -np.concatenate([np.linspace(0.0, 1.0, 5001), np.linspace(1.0, 43.0, 5001)]).astype(np.float32)
    got = np.array([cpu_kernels._expf_neg(v) for v in x], dtype=np.float64)
    want = np.exp(x.astype(np.float64))
    # the float32 rounding of x * log2(e) bounds it: half an ulp of |x| log2(e), times ln 2
    assert np.all(np.abs(got - want) / want <= 2e-7 + 9e-8 * np.abs(x))
    assert 0.0 < cpu_kernels._expf_neg(np.float32(-200.0)) < 1e-18  # far below: negligible, finite


def test_spherical_cells_masks_bad_points_and_keeps_indices_in_bounds():
    pts = np.array([[5.0, 1.0, -1.0, 0.3], [np.nan, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.2],
                    [np.inf, 1.0, 1.0, 0.0], [1e30, 1e30, 0.0, 0.0], [0.0, 0.0, -7.0, 0.5]], dtype=np.float32)
    cfg = RangeImageConfig()
    proj = range_projection(pts, cfg)
    assert proj.valid.tolist() == [True, False, False, False, False, True]
    assert proj.in_fov.tolist() == [True, False, False, False, False, False]  # straight down: below the FOV
    assert (proj.rows >= 0).all() and (proj.rows < cfg.rows).all()
    assert (proj.cols >= 0).all() and (proj.cols < cfg.cols).all()
    assert proj.rows[5] == cfg.rows - 1  # clipped to the last row, as RangeNet++
    winners = proj.cell_to_point[proj.cell_to_point >= 0]
    assert sorted(winners.tolist()) == [0, 5]


@pytest.mark.parametrize("rule", ["product", "entropy"])
def test_fusion_with_one_class_far_more_certain_and_extreme_bias(rule):
    """The fusion stays finite at extreme weights: the entropy rule's log-ratio normalisation
    where exp(-H + b) of the torch formula would overflow (bias 100), the product's exponents
    (2 softmax(bias) = (0, 2)) where a branch is all but switched off."""
    from pl3d_ros.models.points import predict_points

    c, h, w = 4, 2, 3
    l2 = torch.zeros(1, c, h, w)
    l2[0, 2] = 30.0  # 2D: class 2, certain
    l3 = torch.zeros(1, c, 1, 5)
    l3[0, 1] = 1.0  # 3D: class 1, unsure
    uv = torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    cells = torch.tensor([0, 4, 2], dtype=torch.int64)
    in_view = torch.tensor([True, True, False])
    for bias, want in (((0.0, 0.0), 2), ((-100.0, 100.0), 1)):
        l2d, l3d, labels, conf = predict_points(l2, l3, uv, cells, in_view, (h, w), bias, rule=rule)
        assert labels.tolist() == [want, want, 1] and l2d.tolist() == [2, 2] and l3d.tolist() == [1, 1, 1]
        assert torch.isfinite(conf).all() and (conf <= 1.0 + 1e-6).all()


def test_warm_up_compiles_the_signatures_a_real_frame_uses(kitti00):
    """After load_cpu_kernels a KITTI frame's pre- and postprocess compile nothing more (else the
    first frame of a node would pay for the compilation)."""
    from concurrent.futures import ThreadPoolExecutor

    from pl3d_ros.inputs import load_cpu_kernels, point_predictions, prepare

    load_cpu_kernels()
    kernels = [getattr(cpu_kernels, name) for name in ("spherical_cells", "nearest_per_cell", "cell_channels",
                                                       "pinhole_in_view", "top_class", "fuse_in_view", "spread_cells")]
    before = [len(k.signatures) for k in kernels]
    assert all(n >= 1 for n in before)
    with ThreadPoolExecutor(1) as pool:
        inputs = prepare(KittiSequence(kitti00).frame(0), (640, 192), RangeImageConfig(), executor=pool)
        l2, l3 = torch.randn(1, 10, 192, 640), torch.randn(1, 10, 64, 2048)
        for rule in ("product", "entropy"):  # one kernel: the rule is an argument, not a signature
            point_predictions(inputs, l2, l3, (0.1, -0.2), pool, rule=rule)
    assert [len(k.signatures) for k in kernels] == before
