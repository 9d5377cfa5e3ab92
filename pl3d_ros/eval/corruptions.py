"""Domain-shift corruptions of Frames, applied on the fly (LiDAR after Robo3D, plus image shifts).

The LiDAR corruptions follow the eight of Robo3D (Kong et al., "Robo3D: Towards Robust and
Reliable 3D Perception against Corruptions", ICCV 2023; generator scripts in
github.com/ldkong1205/Robo3D, ``create/kitti_c``), re-implemented here as vectorised numpy on a
single Frame, with simplified physics where Robo3D runs a full simulator (fog: Hahner et al.,
ICCV 2021; snow: Hahner et al., CVPR 2022; wet ground: the Bijelic/Hahner ground-water model).
Image corruptions follow the spirit of ImageNet-C (Hendrycks & Dietterich, ICLR 2019).

Severities
----------
Every corruption has severities 1..5. Robo3D defines three levels; they are our 1 / 3 / 5
(light / moderate / heavy) wherever Robo3D gives the parameter, and 2 / 4 interpolate.

=============== ========= ==================================================================
name            modality  severity 1 .. 5
=============== ========= ==================================================================
fog             lidar     attenuation alpha 0.008 / 0.015 / 0.025 / 0.04 / 0.06 1/m
                          (visibility ln20/alpha = 374 / 200 / 120 / 75 / 50 m); back-scatter
                          share 0.02 .. 0.10 of the extinguished light
wet_ground      lidar     water film 0.2 / 0.6 / 1.0 / 1.1 / 1.2 mm on 1.2 mm pavement texture
snow            lidar     snowfall rate 0.5 / 0.75 / 1.0 / 1.75 / 2.5 mm/h
motion_blur     both      LiDAR ego-motion std 0.04 / 0.06 / 0.08 / 0.09 / 0.10 m;
                          image blur length 0.6 / 1.2 / 1.8 / 2.4 / 3.0 % of the width
beam_missing    lidar     16 / 24 / 32 / 40 / 48 of 64 beams dropped (random, beams 4..58)
crosstalk       lidar     0.6 / 0.7 / 0.8 / 0.9 / 1.0 % of points thrown 3 m (std) off
incomplete_echo lidar     75 / 80 / 85 / 90 / 95 % of vehicle points dropped
cross_sensor    lidar     48 / 40 / 32 / 24 / 16 of 64 beams kept, then every other point per beam
night           image     exposure x0.5 / 0.35 / 0.25 / 0.15 / 0.08, gamma 1.1 .. 1.5, more noise
color_cast      image     white-balance shift 8 / 15 / 22 / 30 / 40 % along a random hue
=============== ========= ==================================================================

``describe()`` prints the same table from the registry, so it cannot drift from the code.

Conventions
-----------
* The beam (ring) of a point is its row in the spherical range image (``geometry.
  range_projection``, elevation against the sensor's vertical FOV, 64 rows for the HDL-64E),
  since KITTI clouds carry no ring field. Dropping a "beam" drops a range-image row.
* Points that a corruption drops take their ground-truth labels with them. Points that a
  corruption creates or relocates onto something that is not the labelled surface (fog
  back-scatter, snowflakes, crosstalk) get ``IGNORE_RAW_LABEL``: Frame labels are *raw* dataset ids
  (SemanticKITTI: raw 0 = "unlabeled"), which every class set maps to its ignore train id (255).
  Raw 255 would be wrong: it is SemanticKITTI's "moving-motorcyclist".
* Corruptions never modify their input Frame; they return a new, validated Frame, which may
  share the arrays a corruption left unchanged (treat Frames as immutable).
* Randomness comes only from the ``np.random.Generator`` passed in: the same seed gives the same
  output. ``apply`` gives each corruption of a chain its own child generator (``spawn``), so one
  corruption's draws do not shift another's.
* A corruption that would leave no point raises ``CorruptionError`` (an empty cloud is not a
  Frame); on real scans none comes close.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pl3d_ros.config import RangeImageConfig
from pl3d_ros.frame import Frame
from pl3d_ros.geometry import range_projection

#: Raw label given to points that a corruption creates (SemanticKITTI raw 0 = "unlabeled",
#: mapped to the ignore train id by every class set).
IGNORE_RAW_LABEL = 0
SEVERITIES = (1, 2, 3, 4, 5)

# -- per-severity parameters (index = severity - 1) ---------------------------------------------

#: Beams dropped (of 64). Robo3D light/moderate/heavy: 16/32/48, drawn from beams 4..58.
BEAM_MISSING_DROPPED = (16, 24, 32, 40, 48)
#: Beams kept (of 64). Robo3D drops 16/32/48 evenly spaced beams, then keeps every other point.
CROSS_SENSOR_KEPT = (48, 40, 32, 24, 16)
#: Fog extinction coefficient alpha (1/m). Robo3D draws alpha from {0, .005, .01, .02, .03, .06}
#: per scan and varies the back-scatter coefficient; we fix alpha per level so severity is monotone.
FOG_ALPHA = (0.008, 0.015, 0.025, 0.04, 0.06)
#: Probability that the extinguished part of a beam (1 - two-way transmission) comes back as a
#: fog return that masks the target (Robo3D's back-scatter beta 0.008 / 0.05 / 0.2, rescaled).
FOG_BACKSCATTER = (0.02, 0.04, 0.06, 0.08, 0.10)
#: A return survives for sure while the two-way transmission exp(-2 alpha r) is above this;
#: below, it survives with probability transmission / FOG_MIN_TRANSMISSION (detection threshold).
FOG_MIN_TRANSMISSION = 0.3
#: Snowfall rate (mm/h). Robo3D: 0.5 / 1.0 / 2.5 mm/h (light / moderate / heavy).
SNOW_RATE = (0.5, 0.75, 1.0, 1.75, 2.5)
SNOW_HIT_PER_M = 0.003  # snowflake interceptions per metre of beam per mm/h of snowfall
SNOW_ALPHA_PER_RATE = 0.004  # extinction (1/m) per mm/h that attenuates the surviving returns
SNOW_MAX_RANGE = 25.0  # m; single flakes are only strong enough to register close to the sensor
#: Water film height (mm) over the pavement texture depth. Robo3D: 0.2 / 1.0 / 1.2 mm on 1.2 mm.
WET_WATER_MM = (0.2, 0.6, 1.0, 1.1, 1.2)
WET_PAVEMENT_MM = 1.2
WET_NOISE_FLOOR = 0.15  # a ground return below this share of the median dry-ground return is lost
#: Share of points displaced by crosstalk. Robo3D: 0.6 / 0.8 / 1.0 %, displaced by N(0, 3 m).
CROSSTALK_SHARE = (0.006, 0.007, 0.008, 0.009, 0.010)
CROSSTALK_STD_M = 3.0
#: Share of vehicle points lost to incomplete echoes. Robo3D: 75 / 85 / 95 %.
INCOMPLETE_ECHO_DROP = (0.75, 0.80, 0.85, 0.90, 0.95)
#: SemanticKITTI raw ids of Robo3D's vehicle classes (car, bicycle, motorcycle, truck,
#: other-vehicle, incl. the moving-* variants and bus / on-rails that map to other-vehicle).
VEHICLE_RAW_IDS = (10, 11, 13, 15, 16, 18, 20, 252, 256, 257, 258, 259)
DARK_QUANTILE = 0.1  # without labels, the darkest 10 % of returns stand in for vehicle points
#: LiDAR motion blur: std (m) of the ego translation during one sweep. Robo3D: 0.04 / 0.08 / 0.10.
MOTION_SIGMA_M = (0.04, 0.06, 0.08, 0.09, 0.10)
#: Image motion blur: kernel length as a share of the image width (>= 3 px), random direction.
MOTION_BLUR_LENGTH = (0.006, 0.012, 0.018, 0.024, 0.030)
MOTION_BLUR_MAX_ANGLE_DEG = 45.0  # as ImageNet-C: directions within +-45 deg of horizontal
#: Night: exposure factor on linear radiance, extra display gamma, read noise (linear units).
NIGHT_EXPOSURE = (0.5, 0.35, 0.25, 0.15, 0.08)
NIGHT_GAMMA = (1.1, 1.2, 1.3, 1.4, 1.5)
NIGHT_READ_NOISE = (0.001, 0.0015, 0.002, 0.003, 0.004)
NIGHT_FULL_WELL = 1000.0  # photo-electrons at full scale: sets the shot-noise level
#: Colour cast: relative white-balance gain change along a random hue direction.
COLOR_CAST_STRENGTH = (0.08, 0.15, 0.22, 0.30, 0.40)

_SRGB_GAMMA = 2.2  # display gamma used to go to linear radiance and back


class CorruptionError(ValueError):
    """Unknown corruption, bad severity or spec, or a corruption that would empty the cloud."""


# -- helpers -------------------------------------------------------------------------------------


def ring_index(points: np.ndarray, sensor: RangeImageConfig | None = None) -> np.ndarray:
    """(N,) int32 beam index of each point: its range-image row (0 = top beam).

    The elevation asin(z / range) is binned against the sensor's vertical FOV into ``sensor.rows``
    rows exactly as ``geometry.range_projection`` does (points outside the FOV clip to the first /
    last row), so a dropped beam is a missing row of the range image the model sees.
    """
    return range_projection(points, sensor or RangeImageConfig()).rows


def sweep_phase(points: np.ndarray) -> np.ndarray:
    """(N,) float64 in [0, 1]: when in the sweep each point was measured, from its azimuth.

    A spinning LiDAR scans azimuth linearly in time; the phase is the range-image column
    fraction 0.5 (1 - yaw / pi), which starts behind the sensor as KITTI's sweeps do.
    """
    yaw = np.arctan2(points[:, 1].astype(np.float64), points[:, 0].astype(np.float64))
    return 0.5 * (1.0 - yaw / np.pi)


def _ranges(points: np.ndarray) -> np.ndarray:
    """(N,) float64 distance of each point from the sensor (metres)."""
    xyz = points[:, :3].astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", xyz, xyz))


def _intensity_scale(points: np.ndarray) -> float:
    """Full scale of the intensity channel (1 for KITTI, 255 for many drivers), never 0."""
    top = float(np.max(points[:, 3])) if points.shape[0] else 0.0
    return top if top > 0 else 1.0


def _move_along_ray(points: np.ndarray, idx: np.ndarray, new_range: np.ndarray) -> None:
    """In place: put points[idx] at ``new_range`` metres along their own ray."""
    r = np.maximum(_ranges(points[idx]), 1e-6)  # a point at the origin has no ray; keep it there
    points[idx, :3] = (points[idx, :3] * (new_range / r)[:, None]).astype(np.float32)


def _rebuild(frame: Frame, *, keep: np.ndarray | None = None, points: np.ndarray | None = None,
             labels: np.ndarray | None = None, image: np.ndarray | None = None,
             what: str = "") -> Frame:
    """A new validated Frame from ``frame`` with points / labels / image replaced, then ``keep``
    (bool mask over the (new) points) applied to points and labels together."""
    pts = frame.points if points is None else points
    lab = frame.labels if labels is None else labels
    if keep is not None:
        if not np.any(keep):
            raise CorruptionError(
                f"{what} would drop all {pts.shape[0]} points of frame {frame.seq}; "
                "an empty cloud is not a Frame (lower the severity)"
            )
        pts = pts[keep]
        lab = lab[keep] if lab is not None else None
    return dataclasses.replace(frame, points=pts, labels=lab,
                               image=frame.image if image is None else image)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -- LiDAR corruptions ---------------------------------------------------------------------------


def _beam_missing(frame: Frame, rng: np.random.Generator, severity: int,
                  sensor: RangeImageConfig) -> Frame:
    """Drop whole beams (range-image rows), chosen at random away from the top and bottom edges.

    Robo3D draws 16/32/48 beam ids in 4..58 with replacement (so fewer distinct ones); we draw
    distinct beams so that the severity is exactly the number of beams lost.
    """
    rows = sensor.rows
    lo, hi = round(rows / 16), rows - 1 - round(5 * rows / 64)  # 4 .. 58 of 64, as Robo3D
    n_drop = min(round(BEAM_MISSING_DROPPED[severity - 1] * rows / 64), hi - lo + 1)
    dropped = rng.choice(np.arange(lo, hi + 1), size=n_drop, replace=False)
    lost = np.zeros(rows, dtype=bool)
    lost[dropped] = True
    return _rebuild(frame, keep=~lost[ring_index(frame.points, sensor)],
                    what=f"beam_missing:{severity}")


def _cross_sensor(frame: Frame, rng: np.random.Generator, severity: int,
                  sensor: RangeImageConfig) -> Frame:
    """A sparser sensor: keep evenly spaced beams, then every other point along each beam.

    Severity 3 turns the 64-beam cloud into a 32-beam one (every other beam) with half the
    horizontal resolution, like Robo3D's 64 -> 32 "moderate" level.
    """
    rows = sensor.rows
    n_keep = max(1, round(CROSS_SENSOR_KEPT[severity - 1] * rows / 64))
    kept_rows = np.zeros(rows, dtype=bool)
    kept_rows[np.floor(np.arange(n_keep) * rows / n_keep).astype(np.int64)] = True
    ring = ring_index(frame.points, sensor)
    # Every other point per beam in azimuth order (Robo3D's scan[::2] on KITTI's beam-major
    # order): rank the points within their beam, keep one parity; the parity is random.
    order = np.lexsort((sweep_phase(frame.points), ring))
    ring_sorted = ring[order]
    starts = np.flatnonzero(np.r_[True, ring_sorted[1:] != ring_sorted[:-1]])
    counts = np.diff(np.r_[starts, ring_sorted.shape[0]])
    rank = np.arange(ring_sorted.shape[0]) - np.repeat(starts, counts)
    every_other = np.empty(ring.shape[0], dtype=bool)
    every_other[order] = (rank % 2) == int(rng.integers(2))
    return _rebuild(frame, keep=kept_rows[ring] & every_other, what=f"cross_sensor:{severity}")


def _fog(frame: Frame, rng: np.random.Generator, severity: int,
         sensor: RangeImageConfig) -> Frame:
    """Fog after Hahner et al. (ICCV 2021), simplified to closed forms.

    * hard target: intensity *= exp(-2 alpha r) (two-way Beer-Lambert, their P_R hard term);
    * lost returns: once the two-way transmission T falls below FOG_MIN_TRANSMISSION, a return
      survives with probability T / FOG_MIN_TRANSMISSION, so far points vanish first;
    * back-scatter: with probability backscatter * (1 - T) the fog's own echo outshines the
      target and the point moves onto its ray a few metres from the sensor (gamma-distributed,
      mean ~4 m, as the soft-target response peaks near the receiver overlap range), with a weak
      intensity; it gets the ignore label.
    """
    alpha, backscatter = FOG_ALPHA[severity - 1], FOG_BACKSCATTER[severity - 1]
    pts = frame.points.copy()
    labels = frame.labels.copy() if frame.labels is not None else None
    r = _ranges(pts)
    transmission = np.exp(-2.0 * alpha * r)
    n = pts.shape[0]
    scatter = rng.random(n) < backscatter * (1.0 - transmission)
    survive = rng.random(n) < np.minimum(1.0, transmission / FOG_MIN_TRANSMISSION)
    pts[:, 3] = (pts[:, 3] * transmission).astype(np.float32)

    idx = np.flatnonzero(scatter)
    fog_range = 1.0 + rng.gamma(2.0, 1.5, size=idx.size)
    fog_range = np.minimum(fog_range, np.maximum(r[idx] - 0.1, 0.0))  # the fog is before the target
    _move_along_ray(pts, idx, fog_range)
    pts[idx, 3] = (rng.uniform(0.0, 0.15, size=idx.size) * _intensity_scale(frame.points)
                   ).astype(np.float32)
    if labels is not None:
        labels[idx] = IGNORE_RAW_LABEL
    return _rebuild(frame, points=pts, labels=labels, keep=scatter | survive,
                    what=f"fog:{severity}")


def _snow(frame: Frame, rng: np.random.Generator, severity: int,
          sensor: RangeImageConfig) -> Frame:
    """Snowfall after Hahner et al. (CVPR 2022), simplified.

    A beam meets a snowflake within the first SNOW_MAX_RANGE metres with probability
    1 - exp(-k rate min(r, SNOW_MAX_RANGE)). Half of those beams return the flake (the point
    moves to a uniform range before the target, ignore label, flake intensity); the other half
    are blocked without a usable echo (dropped). Surviving returns are attenuated by the snow's
    extinction exp(-2 alpha_snow r).
    """
    rate = SNOW_RATE[severity - 1]
    pts = frame.points.copy()
    labels = frame.labels.copy() if frame.labels is not None else None
    r = _ranges(pts)
    reach = np.minimum(r, SNOW_MAX_RANGE)
    hit = rng.random(r.shape[0]) < 1.0 - np.exp(-SNOW_HIT_PER_M * rate * reach)
    flake = hit & (rng.random(r.shape[0]) < 0.5)
    blocked = hit & ~flake
    pts[:, 3] = (pts[:, 3] * np.exp(-2.0 * SNOW_ALPHA_PER_RATE * rate * r)).astype(np.float32)

    idx = np.flatnonzero(flake)
    near = np.minimum(1.0, reach[idx])
    _move_along_ray(pts, idx, near + rng.random(idx.size) * (reach[idx] - near))
    pts[idx, 3] = (rng.uniform(0.05, 0.3, size=idx.size) * _intensity_scale(frame.points)
                   ).astype(np.float32)
    if labels is not None:
        labels[idx] = IGNORE_RAW_LABEL
    return _rebuild(frame, points=pts, labels=labels, keep=~blocked, what=f"snow:{severity}")


def _fit_ground(points: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Least-squares ground plane z = a x + b y + c with two trimming rounds.

    Returns (unit normal pointing up (3,), distance of the sensor above the plane in metres),
    or None where too few candidates exist. Candidates: 3..40 m away horizontally, in the lowest
    30 % of heights (the ground dominates there in a driving scan).
    """
    xyz = points[:, :3].astype(np.float64)
    horiz = np.hypot(xyz[:, 0], xyz[:, 1])
    cand = (horiz > 3.0) & (horiz < 40.0)
    if np.count_nonzero(cand) < 50:
        return None
    cand &= xyz[:, 2] <= np.quantile(xyz[cand, 2], 0.3)
    for _ in range(3):
        if np.count_nonzero(cand) < 50:
            return None
        A = np.c_[xyz[cand, 0], xyz[cand, 1], np.ones(np.count_nonzero(cand))]
        (a, b, c), *_ = np.linalg.lstsq(A, xyz[cand, 2], rcond=None)
        resid = np.abs(xyz[:, 2] - (a * xyz[:, 0] + b * xyz[:, 1] + c))
        cand = (horiz > 3.0) & (horiz < 40.0) & (resid < 0.15)
    normal = np.array([-a, -b, 1.0])
    norm = float(np.linalg.norm(normal))
    return normal / norm, float(-c / norm)


def _wet_ground(frame: Frame, rng: np.random.Generator, severity: int,
                sensor: RangeImageConfig) -> Frame:
    """Wet road after the ground-water model Robo3D uses (Bijelic / Hahner), simplified.

    A water film of height h over pavement texture depth d covers a share f = min(1, h / d) of
    the road. Wet patches reflect specularly: only the part of the diffuse return aligned with
    the surface normal survives, so ground intensity becomes i ((1 - f) + f cos(theta)), theta
    the incidence angle (grazing far away). Ground returns that fall below WET_NOISE_FLOOR of the
    median dry-ground return are lost. Points off the fitted ground plane (> 0.3 m) are untouched.
    ``rng`` is unused: the model is deterministic.
    """
    fit = _fit_ground(frame.points)
    if fit is None:
        return _rebuild(frame)  # no ground to wet (a synthetic scene or a sensor looking up)
    normal, height = fit
    f = min(1.0, WET_WATER_MM[severity - 1] / WET_PAVEMENT_MM)
    xyz = frame.points[:, :3].astype(np.float64)
    above = xyz @ normal + height  # signed height over the fitted plane, metres
    ground = np.abs(above) < 0.3
    r = np.maximum(_ranges(frame.points), 1e-6)
    cos_incidence = np.clip(np.abs(xyz @ normal) / r, 0.0, 1.0)
    intensity = frame.points[:, 3].astype(np.float64)
    wet = intensity * ((1.0 - f) + f * cos_incidence)
    dry_ground = intensity[ground & (intensity > 0)]
    floor = WET_NOISE_FLOOR * (float(np.median(dry_ground)) if dry_ground.size else 0.0)
    # Lost: darkened by the water below the noise floor (returns that were already that dark and
    # not dimmed further, e.g. intensity 0, are how the sensor saw them dry: keep them).
    lost = ground & (wet < floor) & (wet < intensity)
    pts = frame.points.copy()
    pts[ground, 3] = wet[ground].astype(np.float32)
    return _rebuild(frame, points=pts, keep=~lost, what=f"wet_ground:{severity}")


def _crosstalk(frame: Frame, rng: np.random.Generator, severity: int,
               sensor: RangeImageConfig) -> Frame:
    """Crosstalk (as Robo3D): a share of points is thrown N(0, 3 m) off in x, y, z.

    Their intensity is redrawn uniformly (Robo3D adds 3-sigma noise to it too, which leaves
    negative values); they no longer lie on the labelled surface, so they get the ignore label.
    """
    n = frame.num_points
    k = int(CROSSTALK_SHARE[severity - 1] * n)
    idx = rng.choice(n, size=k, replace=False)
    pts = frame.points.copy()
    pts[idx, :3] += (rng.normal(0.0, CROSSTALK_STD_M, size=(k, 3))).astype(np.float32)
    pts[idx, 3] = (rng.random(k) * _intensity_scale(frame.points)).astype(np.float32)
    labels = None
    if frame.labels is not None:
        labels = frame.labels.copy()
        labels[idx] = IGNORE_RAW_LABEL
    return _rebuild(frame, points=pts, labels=labels)


def _incomplete_echo(frame: Frame, rng: np.random.Generator, severity: int,
                     sensor: RangeImageConfig) -> Frame:
    """Incomplete echoes (as Robo3D): a share of the vehicle points is lost.

    Dark, glossy car paint returns too little light; Robo3D finds vehicles by their labels. With
    no labels (a live stream) the darkest DARK_QUANTILE of returns stands in for them.
    """
    if frame.labels is not None:
        target = np.isin(frame.labels & 0xFFFF, VEHICLE_RAW_IDS)
    else:
        intensity = frame.points[:, 3]
        target = intensity <= np.quantile(intensity, DARK_QUANTILE)
    idx = np.flatnonzero(target)
    drop = rng.choice(idx, size=int(idx.size * INCOMPLETE_ECHO_DROP[severity - 1]), replace=False)
    keep = np.ones(frame.num_points, dtype=bool)
    keep[drop] = False
    return _rebuild(frame, keep=keep, what=f"incomplete_echo:{severity}")


def _lidar_motion(frame: Frame, rng: np.random.Generator, severity: int) -> np.ndarray:
    """Motion-distorted points (N, 4): the ego pose drifts during the sweep.

    Robo3D adds one N(0, sigma) translation to the whole scan plus per-point jitter of std
    (0.1, 0.1, 0.05) sigma clipped to 3 sigma. Here the translation grows with the sweep phase
    (the sensor moved t during the sweep, so a point measured at phase p is off by p t: the
    familiar skew at the sweep's seam) and the jitter std grows as 2p (same mean as Robo3D).
    """
    sigma = MOTION_SIGMA_M[severity - 1]
    pts = frame.points.copy()
    phase = sweep_phase(pts)[:, None]
    t = rng.normal(0.0, sigma, size=3)
    jitter = rng.normal(0.0, 1.0, size=(pts.shape[0], 3)) * (np.array([0.1, 0.1, 0.05]) * sigma)
    jitter = np.clip(2.0 * phase * jitter, -3.0 * sigma, 3.0 * sigma)
    pts[:, :3] += (phase * t + jitter).astype(np.float32)
    return pts


# -- image corruptions ---------------------------------------------------------------------------


def directional_blur(image: np.ndarray, length: int, angle_rad: float) -> np.ndarray:
    """Linear motion blur: the mean of ``length`` copies shifted along a line.

    Args:
        image: (H, W, C) array (any numeric dtype).
        length: kernel length in pixels (>= 1).
        angle_rad: blur direction, 0 = horizontal, counter-clockwise in image coordinates.

    Returns:
        (H, W, C) float32 blurred image; borders replicate the edge pixels.
    """
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape[:2]
    t = np.linspace(-(length - 1) / 2.0, (length - 1) / 2.0, max(1, int(length)))
    dx = np.rint(t * math.cos(angle_rad)).astype(np.int64)
    dy = np.rint(-t * math.sin(angle_rad)).astype(np.int64)
    taps, weights = np.unique(np.stack([dy, dx], axis=1), axis=0, return_counts=True)
    pad = int(max(np.abs(dx).max(), np.abs(dy).max()))
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(img)
    for (oy, ox), wgt in zip(taps, weights):  # one shifted add per kernel tap, not per pixel
        shifted = padded[pad + oy:pad + oy + h, pad + ox:pad + ox + w]
        out += shifted if wgt == 1 else wgt * shifted
    return out / float(t.size)


def _motion_blur(frame: Frame, rng: np.random.Generator, severity: int,
                 sensor: RangeImageConfig) -> Frame:
    """Ego-motion blur on both sensors: a directional blur of the image and sweep-long drift
    plus jitter of the LiDAR points (see ``_lidar_motion``). Labels stay with their points."""
    pts = _lidar_motion(frame, rng, severity)
    width = frame.image.shape[1]
    length = max(3, round(MOTION_BLUR_LENGTH[severity - 1] * width))
    angle = math.radians(rng.uniform(-MOTION_BLUR_MAX_ANGLE_DEG, MOTION_BLUR_MAX_ANGLE_DEG))
    image = _to_uint8(directional_blur(frame.image, length, angle))
    return _rebuild(frame, points=pts, image=image)


def _night(frame: Frame, rng: np.random.Generator, severity: int,
           sensor: RangeImageConfig) -> Frame:
    """Night: less light, a darker tone curve, and the sensor noise that comes with it.

    In linear radiance (sRGB decoded with gamma 2.2): scale by the exposure factor, add
    Poisson-Gaussian noise (shot noise with NIGHT_FULL_WELL electrons at full scale, plus read
    noise), then encode with gamma 2.2 times an extra gamma > 1 that crushes the shadows.
    """
    i = severity - 1
    lin = (frame.image.astype(np.float32) / 255.0) ** _SRGB_GAMMA * NIGHT_EXPOSURE[i]
    std = np.sqrt(lin / NIGHT_FULL_WELL + NIGHT_READ_NOISE[i] ** 2)
    noisy = np.clip(lin + rng.standard_normal(lin.shape, dtype=np.float32) * std, 0.0, 1.0)
    image = _to_uint8(255.0 * noisy ** (NIGHT_GAMMA[i] / _SRGB_GAMMA))
    return _rebuild(frame, image=image)


def _color_cast(frame: Frame, rng: np.random.Generator, severity: int,
                sensor: RangeImageConfig) -> Frame:
    """A white-balance error: per-channel gains 1 + s cos(hue - k 2pi/3), random hue.

    The three gain offsets sum to zero, so the overall brightness is roughly kept while the tint
    (sodium-lamp orange, LED blue, green, ...) shifts.
    """
    s = COLOR_CAST_STRENGTH[severity - 1]
    hue = rng.uniform(0.0, 2.0 * np.pi)
    gains = 1.0 + s * np.cos(hue - np.arange(3) * 2.0 * np.pi / 3.0)
    image = _to_uint8(frame.image.astype(np.float32) * gains.astype(np.float32))
    return _rebuild(frame, image=image)


# -- registry ------------------------------------------------------------------------------------

CorruptionFn = Callable[[Frame, np.random.Generator, int, RangeImageConfig], Frame]


@dataclass(frozen=True)
class CorruptionInfo:
    """A registered corruption: what it touches, what it does, and its level parameters."""

    name: str
    modality: str  # "lidar", "image" or "both"
    summary: str
    levels: tuple[str, ...]  # human-readable parameters of severities 1..5
    fn: CorruptionFn = field(repr=False)


def _levels(fmt: str, *columns: Sequence[float]) -> tuple[str, ...]:
    return tuple(fmt.format(*values) for values in zip(*columns))


CORRUPTIONS: dict[str, CorruptionInfo] = {
    info.name: info
    for info in (
        CorruptionInfo("fog", "lidar", "Beer-Lambert attenuation, far returns lost, back-scatter "
                       "echoes near the sensor (Hahner et al. 2021, simplified)",
                       _levels("alpha {:.3f}/m (visibility {:.0f} m), back-scatter {:.2f}",
                               FOG_ALPHA, [math.log(20) / a for a in FOG_ALPHA],
                               FOG_BACKSCATTER), _fog),
        CorruptionInfo("wet_ground", "lidar", "water film dims ground returns at grazing "
                       "incidence; returns under the noise floor are lost",
                       _levels("water {:.1f} mm on {:.1f} mm pavement", WET_WATER_MM,
                               [WET_PAVEMENT_MM] * 5), _wet_ground),
        CorruptionInfo("snow", "lidar", "snowflake echoes near the sensor, blocked beams, "
                       "attenuation (Hahner et al. 2022, simplified)",
                       _levels("snowfall {:.2f} mm/h", SNOW_RATE), _snow),
        CorruptionInfo("motion_blur", "both", "LiDAR: ego drift growing along the sweep + "
                       "jitter; image: directional blur",
                       _levels("drift std {:.2f} m, blur {:.1f} % of width", MOTION_SIGMA_M,
                               [100 * x for x in MOTION_BLUR_LENGTH]), _motion_blur),
        CorruptionInfo("beam_missing", "lidar", "whole beams (range-image rows) dropped",
                       _levels("{} of 64 beams dropped", BEAM_MISSING_DROPPED), _beam_missing),
        CorruptionInfo("crosstalk", "lidar", "points thrown N(0, 3 m) off (ignore label)",
                       _levels("{:.1f} % of points", [100 * x for x in CROSSTALK_SHARE]),
                       _crosstalk),
        CorruptionInfo("incomplete_echo", "lidar", "vehicle points lost (darkest returns "
                       "without labels)",
                       _levels("{:.0f} % of vehicle points dropped",
                               [100 * x for x in INCOMPLETE_ECHO_DROP]), _incomplete_echo),
        CorruptionInfo("cross_sensor", "lidar", "sparser sensor: evenly spaced beams kept, "
                       "every other point per beam",
                       _levels("{} of 64 beams kept, 1/2 of each", CROSS_SENSOR_KEPT),
                       _cross_sensor),
        CorruptionInfo("night", "image", "darker exposure + gamma + shot/read noise",
                       _levels("exposure x{:.2f}, gamma {:.1f}, read noise {:.4f}",
                               NIGHT_EXPOSURE, NIGHT_GAMMA, NIGHT_READ_NOISE), _night),
        CorruptionInfo("color_cast", "image", "white-balance shift along a random hue",
                       _levels("gain change {:.0f} %", [100 * x for x in COLOR_CAST_STRENGTH]),
                       _color_cast),
    )
}


def available() -> list[str]:
    """Names of the registered corruptions, in registry order."""
    return list(CORRUPTIONS)


@dataclass(frozen=True)
class Corruption:
    """One corruption at one severity; call it on a Frame with a Generator.

    Attributes:
        name: a key of ``CORRUPTIONS``.
        severity: 1 (mild) .. 5 (heavy).
        sensor: the LiDAR's range-image geometry, used to find beams (default HDL-64E).
    """

    name: str
    severity: int
    sensor: RangeImageConfig = field(default_factory=RangeImageConfig, repr=False,
                                     compare=False)

    def __post_init__(self) -> None:
        if self.name not in CORRUPTIONS:
            raise CorruptionError(
                f"unknown corruption {self.name!r}; available: {', '.join(available())}"
            )
        sev = self.severity
        if isinstance(sev, bool) or not isinstance(sev, (int, np.integer)) or sev not in SEVERITIES:
            raise CorruptionError(
                f"severity of {self.name} must be an integer 1..5, got {sev!r}"
            )
        object.__setattr__(self, "severity", int(sev))

    @property
    def info(self) -> CorruptionInfo:
        return CORRUPTIONS[self.name]

    @property
    def modality(self) -> str:
        """"lidar", "image" or "both"."""
        return self.info.modality

    def __str__(self) -> str:
        return f"{self.name}:{self.severity}"

    def __call__(self, frame: Frame, rng: np.random.Generator) -> Frame:
        """The corrupted copy of ``frame`` (the input is not modified)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"{self}: rng must be a numpy Generator, got {type(rng).__name__}")
        out = self.info.fn(frame, rng, self.severity, self.sensor)
        # Frame would silently drop non-finite rows; a corruption must never make them.
        if not np.isfinite(out.points).all():
            raise CorruptionError(f"{self} produced non-finite points (a bug)")
        return out


def parse_spec(spec: str, sensor: RangeImageConfig | None = None) -> list[Corruption]:
    """Parse "fog:3,night:2" into Corruptions, in order ("" or "none" -> []).

    Names are case-insensitive and may use '-' for '_' ("wet-ground:1").

    Raises:
        CorruptionError: malformed entry, unknown name (the message lists the available ones)
            or a severity outside 1..5.
    """
    text = spec.strip()
    if text.lower() in ("", "none", "clean"):
        return []
    out: list[Corruption] = []
    for entry in text.split(","):
        item = entry.strip()
        name, sep, level = item.partition(":")
        name = name.strip().lower().replace("-", "_")
        if not item or not sep or not name:
            raise CorruptionError(
                f"bad corruption entry {item!r} in {spec!r}: expected name:severity, e.g. fog:3; "
                f"available: {', '.join(available())}"
            )
        try:
            severity = int(level.strip())
        except ValueError:
            raise CorruptionError(
                f"severity of {name} must be an integer 1..5, got {level.strip()!r} in {spec!r}"
            ) from None
        out.append(Corruption(name, severity, sensor or RangeImageConfig()))
    return out


def apply(frame: Frame, corruptions: str | Sequence[Corruption],
          seed_or_rng: int | Sequence[int] | np.random.Generator | None = 0) -> Frame:
    """Apply corruptions in order; deterministic for a given seed.

    Args:
        frame: the clean Frame (not modified).
        corruptions: Corruption objects or a spec string for ``parse_spec``.
        seed_or_rng: a seed (int or int sequence, e.g. ``(seed, frame.seq)`` for per-frame
            draws that are still reproducible), a Generator, or None for fresh entropy.

    Each corruption gets its own child generator, so adding or removing one corruption does not
    change the random draws of the others.
    """
    chain = parse_spec(corruptions) if isinstance(corruptions, str) else list(corruptions)
    rng = (seed_or_rng if isinstance(seed_or_rng, np.random.Generator)
           else np.random.default_rng(seed_or_rng))
    for corruption, child in zip(chain, rng.spawn(len(chain))):
        frame = corruption(frame, child)
    return frame


def describe() -> str:
    """A plain-text table of every corruption, its modality and its five severity levels."""
    lines = ["corruption       modality  what it does / severity 1..5"]
    for info in CORRUPTIONS.values():
        lines.append(f"{info.name:<16} {info.modality:<9} {info.summary}")
        for sev, text in zip(SEVERITIES, info.levels):
            lines.append(f"{'':<26}  {sev}: {text}")
    lines.append("spec syntax: name:severity[,name:severity...], e.g. fog:3,night:2")
    return "\n".join(lines)
