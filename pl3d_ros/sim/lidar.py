"""A spinning multi-beam LiDAR, simulated by casting one ray per beam and azimuth step.

Model (per ray of beam elevation e and azimuth a, LiDAR frame x forward, y left, z up):

- geometry: first hit of the ray against the scene (``Scene.cast``), up to ``max_range``;
- received power ~ reflectivity * sqrt(cos(incidence)) * exp(-2 alpha r) / r^2 (alpha: fog
  extinction, 1/m; the square root because rough asphalt and grass scatter back far more at grazing
  angles than a Lambertian surface). A return is detected when this, relative to a 10 %-reflective
  target head-on at ``detect_range`` metres, is at least 1: dark, grazing and far surfaces drop
  out, as on a real sensor;
- range: Gaussian noise of ``range_noise_m``; random dropout ``dropout`` of the detected returns;
- intensity: reflectivity * cos(incidence) / (1 + (r / intensity_range)^2) * exp(-2 alpha r), in
  [0, 1] like KITTI's remission (real firmware compensates most of the 1/r^2 loss);
- fog backscatter: with fog, some rays return from the fog itself, a few metres out, with the
  raw label ``outlier`` (1), which every class set ignores.

The whole sweep is taken at one pose (no rolling-shutter motion during the 0.1 s revolution):
the ego moves ~1 m per sweep, far below what the adaptation methods here look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pl3d_ros.sim.raycast import Scene
from pl3d_ros.sim.world import OUTLIER


@dataclass(frozen=True)
class LidarConfig:
    """A spinning LiDAR. Angles in degrees, distances in metres.

    ``elevations_deg`` overrides the linear spacing of ``beams`` between ``fov_up_deg`` and
    ``fov_down_deg``.
    """

    beams: int = 64
    fov_up_deg: float = 2.0
    fov_down_deg: float = -24.9
    elevations_deg: tuple[float, ...] | None = None
    columns: int = 2048  # azimuth steps per revolution (HDL-64E at 10 Hz: ~2083)
    rate_hz: float = 10.0
    mount_height: float = 1.73  # above the ground, as in KITTI
    max_range: float = 120.0
    min_range: float = 2.0  # returns off the ego vehicle's own body are cut, as in KITTI
    range_noise_m: float = 0.02
    dropout: float = 0.02
    detect_range: float = 120.0
    intensity_range: float = 60.0
    fog_extinction: float = 0.0  # alpha, 1/m (0.03: ~100 m visibility)
    fog_backscatter: float = 0.0  # chance per ray of a return from the fog when fog is on

    def elevations(self) -> np.ndarray:
        """(beams,) beam elevations in radians, top beam first."""
        if self.elevations_deg is not None:
            return np.radians(np.asarray(self.elevations_deg, dtype=np.float64))
        return np.radians(np.linspace(self.fov_up_deg, self.fov_down_deg, self.beams))

    def azimuths(self) -> np.ndarray:
        """(columns,) azimuths in radians: starting behind the sensor and turning clockwise
        seen from above, as a Velodyne spins."""
        return np.pi - 2 * np.pi * (np.arange(self.columns) + 0.5) / self.columns

    def directions(self) -> np.ndarray:
        """(beams * columns, 3) unit ray directions in the LiDAR frame, ring-major (cached per
        configuration; read-only)."""
        return _directions(self)


@lru_cache(maxsize=8)
def _directions(config: LidarConfig) -> np.ndarray:
    el = config.elevations()[:, None]
    az = config.azimuths()[None, :]
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az),
                  np.broadcast_to(np.sin(el), (el.size, az.size))], axis=-1).reshape(-1, 3)
    d.setflags(write=False)
    return d


@dataclass
class LidarScan:
    """One sweep: points (N, 4) float32 x, y, z (metres, LiDAR frame), intensity in [0, 1];
    labels (N,) uint32 raw SemanticKITTI labels; ring (N,) int16 beam index (0: top)."""

    points: np.ndarray
    labels: np.ndarray
    ring: np.ndarray


def scan(scene: Scene, T_world_lidar: np.ndarray, config: LidarConfig,
         rng: np.random.Generator) -> LidarScan:
    """Simulate one sweep of a LiDAR at pose ``T_world_lidar`` (4, 4) in ``scene``."""
    c = config
    dirs_l = c.directions()
    R = np.asarray(T_world_lidar, dtype=np.float64)
    origin = R[:3, 3]
    dirs_w = dirs_l @ R[:3, :3].T
    hits = scene.cast(origin, dirs_w, c.max_range)
    surf = scene.surface(origin, dirs_w, hits)
    ray = surf.ray
    r = hits.t[ray].astype(np.float64)
    cos_inc = np.abs((surf.normal * dirs_w[ray].astype(np.float32)).sum(axis=1)).astype(np.float64)
    fog = np.exp(-2.0 * c.fog_extinction * r)
    power = surf.refl * np.sqrt(cos_inc) * fog * (c.detect_range / np.maximum(r, 1e-3)) ** 2 / 0.1
    keep = (power >= 1.0) & (r >= c.min_range) & (rng.random(r.size, dtype=np.float32) >= c.dropout)
    intensity = surf.refl * cos_inc / (1.0 + (r / c.intensity_range) ** 2) * fog
    intensity = intensity * (1.0 + 0.05 * rng.standard_normal(r.size, dtype=np.float32))
    rn = r + c.range_noise_m * rng.standard_normal(r.size, dtype=np.float32)
    labels = surf.raw.copy()
    if c.fog_extinction > 0 and c.fog_backscatter > 0:
        # Backscatter: the fog returns light from a few metres out, before the real target.
        n_rays = dirs_l.shape[0]
        fog_r = c.min_range + rng.exponential(1.0 / max(c.fog_extinction * 8.0, 1e-6), n_rays)
        fog_hit = rng.random(n_rays) < c.fog_backscatter
        full_r = np.full(n_rays, np.inf)
        full_r[ray[keep]] = rn[keep]
        fog_hit &= fog_r < np.minimum(full_r, c.max_range)
        fog_ray = np.flatnonzero(fog_hit)
        keep &= ~fog_hit[ray]
        ray = np.concatenate([ray[keep], fog_ray])
        rn = np.concatenate([rn[keep], fog_r[fog_ray]])
        intensity = np.concatenate([intensity[keep], rng.uniform(0.0, 0.05, fog_ray.size)])
        labels = np.concatenate([labels[keep], np.full(fog_ray.size, OUTLIER, dtype=np.uint32)])
        order = np.argsort(ray, kind="stable")  # back to ring-major order
        ray, rn, intensity, labels = ray[order], rn[order], intensity[order], labels[order]
    else:
        ray, rn, intensity, labels = ray[keep], rn[keep], intensity[keep], labels[keep]
    xyz = dirs_l[ray] * rn[:, None]
    points = np.concatenate([xyz, np.clip(intensity, 0.0, 1.0)[:, None]], axis=1).astype(np.float32)
    ring = (ray // c.columns).astype(np.int16)
    return LidarScan(points, labels.astype(np.uint32), ring)
