"""Domain presets: a source domain to train on, and targets that shift what real deployments shift.

Each preset is a world layout + a LiDAR + a camera + lighting. The targets change one family of
factors each (``mixed`` several at once), so adaptation results can be read per kind of shift:

- ``source``: KITTI-like. Day, HDL-64E-like 64 beams (+2 to -24.9 deg) at 1.73 m, KITTI P2 camera,
  2 lanes of 3.5 m, parking strips, town buildings, street trees.
- ``sensor``: another sensor rig on the same streets: 32 beams spanning +10.67 to -30.67 deg
  (HDL-32E-like) at 1.95 m, noisier ranges, a wider camera (0.8 x focal length) mounted higher
  and pitched down 3 deg.
- ``night``: the same rig at night: no sun, dim bluish ambient, ego headlights, lit windows,
  dark sky, 3x sensor noise; other building and car colours. The LiDAR (an active sensor) is
  unchanged: the shift is in the image only.
- ``layout``: another kind of street: 4 lanes of 3.0 m, narrower sidewalks, fewer parking strips,
  wide grass strips with dense trees and hedges, lower suburban buildings, stronger curves.
- ``fog``: LiDAR extinction (alpha = 0.03 /m, ~100 m visibility: weak far returns drop out) and
  backscatter (spurious near returns labelled outlier), image haze and flat, sunless light.
- ``mixed``: sensor + layout + dusk (low orange sun, long shadows, dim purple ambient).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pl3d_ros.sim.camera import CameraConfig, Lighting
from pl3d_ros.sim.lidar import LidarConfig
from pl3d_ros.sim.world import WorldConfig


@dataclass(frozen=True)
class SimPreset:
    """A simulated domain."""

    name: str
    describe: str
    world: WorldConfig
    lidar: LidarConfig
    camera: CameraConfig
    lighting: Lighting


# As many colours as the day palettes: the same seed then draws the same geometry, so night and
# source frames differ in appearance only.
NIGHT_BUILDINGS = ((0.42, 0.48, 0.60), (0.20, 0.40, 0.38), (0.50, 0.30, 0.52), (0.30, 0.45, 0.25),
                   (0.70, 0.70, 0.78), (0.25, 0.25, 0.35), (0.60, 0.55, 0.40))
NIGHT_CARS = ((0.95, 0.78, 0.10), (0.95, 0.45, 0.05), (0.10, 0.50, 0.25), (0.85, 0.85, 0.90),
              (0.45, 0.10, 0.50), (0.05, 0.45, 0.60), (0.60, 0.60, 0.20))

_SOURCE_WORLD = WorldConfig()
_SOURCE_LIDAR = LidarConfig()
_SOURCE_CAMERA = CameraConfig()
_DAY = Lighting()

_SENSOR_LIDAR = LidarConfig(beams=32, fov_up_deg=10.67, fov_down_deg=-30.67, mount_height=1.95,
                            range_noise_m=0.03, max_range=100.0, detect_range=100.0)
_SENSOR_CAMERA = CameraConfig(focal_scale=0.8, position=(0.35, 0.0, -0.25), pitch_deg=3.0)
_LAYOUT_WORLD = replace(
    _SOURCE_WORLD, lanes=4, lane_width=3.0, parking_width=2.0, parking_prob=0.4,
    sidewalk_width=(1.5, 2.5), building_setback=(3.0, 10.0), building_height=(3.5, 10.0),
    building_gap_prob=0.45, tree_spacing=5.0, sidewalk_tree_prob=0.8, crown_radius=(1.6, 3.4),
    hedge_prob=0.7, bushes_per_100m=30.0, curve_amplitude=(4.0, 9.0), curve_wavelength=300.0,
    foliage_color=(0.18, 0.34, 0.10))

PRESETS: dict[str, SimPreset] = {
    "source": SimPreset("source", "KITTI-like day: 64 beams at 1.73 m, KITTI camera, town street",
                        _SOURCE_WORLD, _SOURCE_LIDAR, _SOURCE_CAMERA, _DAY),
    "sensor": SimPreset("sensor", "other rig: 32 beams (+10.7/-30.7 deg) at 1.95 m, wider and "
                        "higher camera pitched down", _SOURCE_WORLD, _SENSOR_LIDAR, _SENSOR_CAMERA, _DAY),
    "night": SimPreset(
        "night", "night: no sun, headlights, lit windows, noisy dark image, other building and "
        "car colours; LiDAR unchanged",
        replace(_SOURCE_WORLD, building_colors=NIGHT_BUILDINGS, car_colors=NIGHT_CARS),
        _SOURCE_LIDAR, _SOURCE_CAMERA,
        Lighting(sun=0.0, ambient=0.05, ambient_color=(0.55, 0.62, 1.0), sky_horizon=(0.05, 0.045, 0.05),
                 sky_zenith=(0.005, 0.008, 0.02), haze=0.004, haze_color=(0.05, 0.05, 0.06),
                 exposure=1.8, noise=5.0, headlights=2.5, window_glow=0.35, shadows=False)),
    "layout": SimPreset("layout", "suburban layout: 4 narrower lanes, dense trees and hedges, "
                        "wide grass strips, low buildings, stronger curves",
                        _LAYOUT_WORLD, _SOURCE_LIDAR, _SOURCE_CAMERA, _DAY),
    "fog": SimPreset(
        "fog", "fog: LiDAR extinction 0.03/m and backscatter, hazy sunless image",
        _SOURCE_WORLD, replace(_SOURCE_LIDAR, fog_extinction=0.03, fog_backscatter=0.03),
        _SOURCE_CAMERA,
        Lighting(sun=0.2, ambient=0.75, ambient_color=(0.9, 0.92, 0.95), sky_horizon=(0.72, 0.74, 0.77),
                 sky_zenith=(0.66, 0.69, 0.74), haze=0.03, haze_color=(0.80, 0.82, 0.85), noise=2.0,
                 shadows=False)),
    "mixed": SimPreset(
        "mixed", "sensor + layout + dusk (low orange sun, long shadows)",
        _LAYOUT_WORLD, _SENSOR_LIDAR, _SENSOR_CAMERA,
        Lighting(sun_azimuth_deg=200.0, sun_elevation_deg=6.0, sun=0.8, sun_color=(1.0, 0.6, 0.3),
                 ambient=0.22, ambient_color=(0.6, 0.55, 0.8), sky_horizon=(0.95, 0.55, 0.3),
                 sky_zenith=(0.2, 0.25, 0.5), haze=0.004, haze_color=(0.7, 0.5, 0.45), noise=3.0)),
}


def get_preset(name: str | SimPreset) -> SimPreset:
    """A preset by name (or the preset itself)."""
    if isinstance(name, SimPreset):
        return name
    if name not in PRESETS:
        raise KeyError(f"unknown sim preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
