"""Domain-shift corruptions: validity, label alignment, monotone severities, determinism, specs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pl3d_ros.config import RangeImageConfig
from pl3d_ros.eval.corruptions import (CORRUPTIONS, IGNORE_RAW_LABEL, SEVERITIES, Corruption,
                                       CorruptionError, apply, describe, directional_blur,
                                       parse_spec, ring_index, sweep_phase)
from pl3d_ros.frame import CameraModel, Frame

SENSOR = RangeImageConfig()
REQUIRED = ("beam_missing", "fog", "cross_sensor", "night", "motion_blur", "snow", "wet_ground",
            "crosstalk", "incomplete_echo", "color_cast")


def synthetic_frame(per_ring: int = 90, seed: int = 0) -> Frame:
    """64 rings at the range-image row centres; label = point index + 1 (0 stays free for ignore).

    Each ring sweeps the full azimuth; ranges 4..60 m; a textured 48 x 64 image.
    """
    rng = np.random.default_rng(seed)
    res = (SENSOR.fov_up - SENSOR.fov_down) / SENSOR.rows
    pitch = SENSOR.fov_up - (np.arange(SENSOR.rows) + 0.5) * res
    yaw = np.linspace(-np.pi, np.pi, per_ring, endpoint=False) + 0.01
    P, Y = np.meshgrid(pitch, yaw, indexing="ij")
    r = rng.uniform(4.0, 60.0, size=P.shape)
    xyz = np.stack([r * np.cos(P) * np.cos(Y), r * np.cos(P) * np.sin(Y), r * np.sin(P)], -1)
    points = np.c_[xyz.reshape(-1, 3), rng.uniform(0.05, 0.9, size=P.size)].astype(np.float32)
    yy, xx = np.mgrid[0:48, 0:64]
    image = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx // 4 + yy // 4) % 2) * 200], -1)
    image = np.clip(image + rng.integers(0, 40, size=image.shape), 0, 255).astype(np.uint8)
    camera = CameraModel(np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]]), 64, 48)
    labels = np.arange(1, points.shape[0] + 1, dtype=np.uint32)
    return Frame(1_000, points, image, camera, labels, seq=3)


@pytest.fixture(scope="module")
def synth() -> Frame:
    return synthetic_frame()


@pytest.fixture(scope="module")
def kitti_frame(kitti00) -> Frame:
    """Frame 0 of sequence 00, labels replaced by index + 1 so every point can be traced."""
    from pl3d_ros.io.kitti import KittiSequence

    frame = KittiSequence(kitti00).frame(0)
    return dataclasses.replace(frame, labels=np.arange(1, frame.num_points + 1, dtype=np.uint32))


def snapshot(frame: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return frame.points.copy(), frame.image.copy(), frame.labels.copy()


def check_output(src: Frame, out: Frame, corruption: Corruption) -> None:
    """Shared invariants: a valid Frame, labels aligned with the points they came from."""
    assert isinstance(out, Frame) and out.num_points > 0
    assert out.points.dtype == np.float32 and np.isfinite(out.points).all()
    assert out.image.shape == src.image.shape and out.image.dtype == np.uint8
    assert out.labels.shape == (out.num_points,)
    assert out.camera is src.camera and out.stamp_ns == src.stamp_ns and out.seq == src.seq
    traced = out.labels != IGNORE_RAW_LABEL
    idx = out.labels[traced].astype(np.int64) - 1
    assert np.unique(idx).size == idx.size, "a source point appears twice"
    # A traced point is the same physical point: motion blur moves it by centimetres, the
    # others not at all.
    shift = np.linalg.norm(out.points[traced, :3] - src.points[idx, :3], axis=1)
    assert shift.max(initial=0.0) < (1.0 if corruption.name == "motion_blur" else 1e-6)
    if corruption.modality == "image":
        np.testing.assert_array_equal(out.points, src.points)
        np.testing.assert_array_equal(out.labels, src.labels)
    if corruption.modality == "lidar":
        np.testing.assert_array_equal(out.image, src.image)
    else:
        assert not np.array_equal(out.image, src.image)


# -- registry and specs --------------------------------------------------------------------------


def test_registry_and_describe():
    assert set(REQUIRED) <= set(CORRUPTIONS)
    text = describe()
    for name, info in CORRUPTIONS.items():
        assert name in text and len(info.levels) == len(SEVERITIES)
        assert info.modality in ("lidar", "image", "both")


def test_parse_spec():
    chain = parse_spec(" fog:3, night:2 ,Wet-Ground:1")
    assert chain == [Corruption("fog", 3), Corruption("night", 2), Corruption("wet_ground", 1)]
    assert [str(c) for c in chain] == ["fog:3", "night:2", "wet_ground:1"]
    assert parse_spec("") == [] and parse_spec("none") == []


@pytest.mark.parametrize("spec, match", [
    ("smog:3", r"unknown corruption 'smog'; available: .*fog.*night"),
    ("fog:0", "must be an integer 1..5"),
    ("fog:6", "must be an integer 1..5"),
    ("fog:x", "must be an integer 1..5, got 'x'"),
    ("fog", "expected name:severity.*available: "),
    ("fog:3,,night:1", "expected name:severity"),
    (":2", "expected name:severity"),
])
def test_parse_spec_errors(spec, match):
    with pytest.raises(CorruptionError, match=match):
        parse_spec(spec)


def test_corruption_rejects_bad_severity_and_rng(synth):
    for bad in (0, 6, 2.5, True, "3"):
        with pytest.raises(CorruptionError, match="1..5"):
            Corruption("fog", bad)
    with pytest.raises(TypeError, match="Generator"):
        Corruption("fog", 2)(synth, 7)


# -- every corruption, every severity ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_on_synthetic_frame(synth, name):
    before = snapshot(synth)
    for severity in SEVERITIES:
        c = Corruption(name, severity)
        check_output(synth, c(synth, np.random.default_rng(severity)), c)
    for a, b in zip(before, snapshot(synth)):
        np.testing.assert_array_equal(a, b)  # the input Frame is never modified


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_on_kitti_frame(kitti_frame, name):
    before = snapshot(kitti_frame)
    c = Corruption(name, 3)
    out = c(kitti_frame, np.random.default_rng(0))
    check_output(kitti_frame, out, c)
    if name not in ("night", "color_cast", "motion_blur", "crosstalk"):
        # Everything else drops or relocates part of a real scan.
        assert out.num_points < kitti_frame.num_points or (out.labels == 0).any()
    for a, b in zip(before, snapshot(kitti_frame)):
        np.testing.assert_array_equal(a, b)


def test_determinism(synth):
    spec = ",".join(f"{n}:3" for n in CORRUPTIONS)
    a, b, c = apply(synth, spec, 7), apply(synth, spec, 7), apply(synth, spec, 8)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.num_points != c.num_points or not np.array_equal(a.points, c.points)
    # A Generator works too, and each corruption's draws do not depend on the others'.
    g = apply(synth, [Corruption("beam_missing", 2)], np.random.default_rng(5))
    np.testing.assert_array_equal(g.points, apply(synth, "beam_missing:2", 5).points)
    alone = apply(synth, "fog:2,beam_missing:2", 11)
    with_night = apply(synth, "fog:2,beam_missing:2,night:1", 11)
    np.testing.assert_array_equal(alone.points, with_night.points)


# -- LiDAR corruptions ----------------------------------------------------------------------------


def test_ring_index_matches_construction(synth):
    rings = ring_index(synth.points, SENSOR)
    np.testing.assert_array_equal(rings, np.repeat(np.arange(64), 90))
    phase = sweep_phase(synth.points)
    assert phase.min() >= 0.0 and phase.max() <= 1.0


@pytest.mark.parametrize("severity, dropped", [(1, 16), (3, 32), (5, 48)])
def test_beam_missing_removes_whole_rings(synth, severity, dropped):
    out = Corruption("beam_missing", severity)(synth, np.random.default_rng(severity))
    before = np.bincount(ring_index(synth.points), minlength=64)
    after = np.bincount(ring_index(out.points), minlength=64)
    gone = np.flatnonzero(after == 0)
    assert gone.size == dropped
    assert gone.min() >= 4 and gone.max() <= 58  # the edge beams stay, as in Robo3D
    np.testing.assert_array_equal(after[after > 0], before[after > 0])  # the rest is complete


def test_beam_missing_on_kitti(kitti_frame):
    out = Corruption("beam_missing", 3)(kitti_frame, np.random.default_rng(0))
    before = np.bincount(ring_index(kitti_frame.points), minlength=64)
    after = np.bincount(ring_index(out.points), minlength=64)
    assert np.count_nonzero(after == 0) == 32 and np.count_nonzero(before == 0) == 0
    np.testing.assert_array_equal(after[after > 0], before[after > 0])


def test_cross_sensor_keeps_half_the_rings(synth, kitti_frame):
    for frame in (synth, kitti_frame):
        out = Corruption("cross_sensor", 3)(frame, np.random.default_rng(1))
        before = np.bincount(ring_index(frame.points), minlength=64)
        after = np.bincount(ring_index(out.points), minlength=64)
        kept = np.flatnonzero(after)
        assert kept.size == 32 and np.all(kept % 2 == 0)  # every other beam: 64 -> 32
        # ... and every other point along each kept beam
        np.testing.assert_allclose(after[kept] / before[kept], 0.5, atol=0.01)
        assert abs(out.num_points / frame.num_points - 0.25) < 0.02
    counts = [np.count_nonzero(np.bincount(ring_index(
        Corruption("cross_sensor", s)(synth, np.random.default_rng(0)).points), minlength=64))
        for s in SEVERITIES]
    assert counts == [48, 40, 32, 24, 16]


def test_cross_sensor_raises_instead_of_emptying(synth):
    odd_ring = synth.points[ring_index(synth.points) == 1]
    frame = dataclasses.replace(synth, points=odd_ring, labels=None)
    with pytest.raises(CorruptionError, match="would drop all .* points"):
        Corruption("cross_sensor", 3)(frame, np.random.default_rng(0))


def test_fog_monotone_in_severity(kitti_frame):
    far, intensity, clutter = [], [], []
    r0 = np.linalg.norm(kitti_frame.points[:, :3], axis=1)
    for severity in SEVERITIES:
        out = Corruption("fog", severity)(kitti_frame, np.random.default_rng(0))
        traced = out.labels != IGNORE_RAW_LABEL
        r = np.linalg.norm(out.points[:, :3], axis=1)
        far.append(np.count_nonzero(traced & (r > 30.0)))
        intensity.append(out.points[traced, 3].mean())
        clutter.append(np.count_nonzero(~traced))
        # back-scatter sits near the sensor, always before the target it replaced
        assert r[~traced].max(initial=0.0) < 30.0
    assert far[0] <= np.count_nonzero(r0 > 30.0)
    assert all(a > b for a, b in zip(far, far[1:])), far
    assert kitti_frame.points[:, 3].mean() > intensity[0]
    assert all(a > b for a, b in zip(intensity, intensity[1:])), intensity
    assert all(a < b for a, b in zip(clutter, clutter[1:])), clutter
    assert far[-1] < 0.2 * np.count_nonzero(r0 > 30.0)  # heavy fog: little left beyond 30 m


def test_snow_and_crosstalk_add_ignored_points(kitti_frame):
    n = kitti_frame.num_points
    prev = 0
    for severity in (1, 3, 5):
        out = Corruption("snow", severity)(kitti_frame, np.random.default_rng(0))
        flakes = out.labels == IGNORE_RAW_LABEL
        assert flakes.sum() > prev
        prev = flakes.sum()
        assert np.linalg.norm(out.points[flakes, :3], axis=1).max() <= 25.0 + 1e-3
    out = Corruption("crosstalk", 5)(kitti_frame, np.random.default_rng(0))
    assert out.num_points == n and np.count_nonzero(out.labels == IGNORE_RAW_LABEL) == int(0.01 * n)


def test_incomplete_echo_drops_vehicle_points(synth):
    labels = np.where(np.arange(synth.num_points) % 4 == 0, 10, 40).astype(np.uint32)
    labels[1::8] = 252 | (7 << 16)  # moving car with an instance id in the upper 16 bits
    frame = dataclasses.replace(synth, labels=labels)
    vehicles = np.isin(labels & 0xFFFF, (10, 252)).sum()
    out = Corruption("incomplete_echo", 3)(frame, np.random.default_rng(0))
    assert (out.labels == 40).sum() == (labels == 40).sum()  # road untouched
    left = np.isin(out.labels & 0xFFFF, (10, 252)).sum()
    assert left == vehicles - int(0.85 * vehicles)
    # Without labels the darkest returns stand in for vehicles.
    unlabeled = dataclasses.replace(synth, labels=None)
    out = Corruption("incomplete_echo", 5)(unlabeled, np.random.default_rng(0))
    threshold = np.quantile(synth.points[:, 3], 0.1)
    assert (out.points[:, 3] > threshold).sum() == (synth.points[:, 3] > threshold).sum()
    assert out.num_points < synth.num_points


def ground_scene() -> Frame:
    """A flat road 1.73 m below the sensor out to 40 m plus a wall 20 m ahead."""
    rng = np.random.default_rng(3)
    d = rng.uniform(3.0, 40.0, 6000)
    a = rng.uniform(-np.pi, np.pi, 6000)
    road = np.c_[d * np.cos(a), d * np.sin(a), np.full(6000, -1.73), rng.uniform(0.2, 0.4, 6000)]
    wall = np.c_[np.full(1000, 20.0), rng.uniform(-5, 5, 1000), rng.uniform(-1.0, 2.0, 1000),
                 rng.uniform(0.0, 0.4, 1000)]
    points = np.r_[road, wall].astype(np.float32)
    labels = np.r_[np.full(6000, 40), np.full(1000, 50)].astype(np.uint32)
    camera = CameraModel(np.array([[10.0, 0, 4], [0, 10, 4], [0, 0, 1]]), 8, 8)
    return Frame(0, points, np.zeros((8, 8, 3), np.uint8), camera, labels)


def test_wet_ground_loses_far_road_returns():
    frame = ground_scene()
    road0 = frame.labels == 40
    far0 = np.count_nonzero(road0 & (np.linalg.norm(frame.points[:, :3], axis=1) > 20))
    lost = []
    for severity in SEVERITIES:
        out = Corruption("wet_ground", severity)(frame, np.random.default_rng(0))
        road = out.labels == 40
        np.testing.assert_array_equal(out.points[out.labels == 50], frame.points[~road0])
        r = np.linalg.norm(out.points[:, :3], axis=1)
        lost.append(far0 - np.count_nonzero(road & (r > 20)))
        assert np.count_nonzero(road & (r < 5)) == np.count_nonzero(
            road0 & (np.linalg.norm(frame.points[:, :3], axis=1) < 5))  # near road survives
    # A thin film only dims (nothing drops below the floor); thicker films lose more and more.
    assert lost[0] == 0 and all(a <= b for a, b in zip(lost, lost[1:])), lost
    assert 0 < lost[2] < lost[3] < lost[4] and lost[4] > 0.7 * far0, (lost, far0)


def test_wet_ground_on_kitti(kitti_frame):
    n = [Corruption("wet_ground", s)(kitti_frame, np.random.default_rng(0)).num_points
         for s in SEVERITIES]
    assert all(a > b for a, b in zip(n, n[1:])), n
    assert n[0] < kitti_frame.num_points and n[-1] > 0.5 * kitti_frame.num_points


def test_lidar_motion_blur_grows_along_the_sweep(kitti_frame):
    disp = []
    phase = sweep_phase(kitti_frame.points)
    for severity in (1, 5):
        out = Corruption("motion_blur", severity)(kitti_frame, np.random.default_rng(4))
        d = np.linalg.norm(out.points[:, :3] - kitti_frame.points[:, :3], axis=1)
        assert d[phase > 0.75].mean() > 2 * d[phase < 0.25].mean()
        disp.append(d.mean())
        np.testing.assert_array_equal(out.labels, kitti_frame.labels)
    assert disp[1] > disp[0]


# -- image corruptions ----------------------------------------------------------------------------


def brightness(img: np.ndarray) -> float:
    return float(img.astype(np.float64).mean())


def gradient_energy(img: np.ndarray) -> float:
    g = img.astype(np.float64).mean(axis=2)
    return float((np.diff(g, axis=0) ** 2).mean() + (np.diff(g, axis=1) ** 2).mean())


def test_night_darkens_monotonically(synth, kitti_frame):
    for frame in (synth, kitti_frame):
        levels = [brightness(frame.image)] + [
            brightness(Corruption("night", s)(frame, np.random.default_rng(0)).image)
            for s in SEVERITIES]
        assert all(a > b for a, b in zip(levels, levels[1:])), levels
        assert levels[-1] < 0.4 * levels[0]
    a = Corruption("night", 4)(kitti_frame, np.random.default_rng(0)).image
    b = Corruption("night", 4)(kitti_frame, np.random.default_rng(1)).image
    assert not np.array_equal(a, b)  # sensor noise, not a fixed tone curve


def test_motion_blur_reduces_gradient_energy(kitti_frame):
    energies = [gradient_energy(kitti_frame.image)] + [
        gradient_energy(Corruption("motion_blur", s)(kitti_frame, np.random.default_rng(2)).image)
        for s in (1, 3, 5)]
    assert all(a > b for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < 0.5 * energies[0]


def test_directional_blur_is_directional():
    img = np.zeros((21, 21, 3), np.float32)
    img[10, 10] = 9.0
    horizontal = directional_blur(img, 9, 0.0)
    np.testing.assert_allclose(horizontal[10, 6:15, 0], 1.0)
    assert horizontal[:10].sum() == 0 and horizontal[11:].sum() == 0
    vertical = directional_blur(img, 9, np.pi / 2)
    np.testing.assert_allclose(vertical[6:15, 10, 0], 1.0)
    np.testing.assert_allclose(horizontal.sum(), img.sum(), rtol=1e-6)  # energy preserved


def test_color_cast_shifts_tint_not_brightness(kitti_frame):
    src = kitti_frame.image.astype(np.float64)
    out = Corruption("color_cast", 5)(kitti_frame, np.random.default_rng(0)).image.astype(float)
    ratio = out.reshape(-1, 3).mean(0) / src.reshape(-1, 3).mean(0)
    assert ratio.max() - ratio.min() > 0.3  # a strong tint
    assert abs(out.mean() / src.mean() - 1.0) < 0.1
