"""A pinhole camera rendered by ray casting the same scene the LiDAR sees.

Intrinsics default to KITTI's left colour camera (P2 of sequence 00) at half resolution:
621 x 188 pixels, fx = fy = 359.4 px. Half resolution keeps one camera + LiDAR frame under a
second on two CPU cores and is already above the "cpu" model's 640 x 192 input after its
centre crop; ``CameraConfig(scale=1.0)`` gives the full 1242 x 375. The camera sits 0.27 m ahead
of and 0.08 m below the LiDAR (KITTI: camera 1.65 m, LiDAR 1.73 m above the road), looking along
the LiDAR's x axis; its optical frame is x right, y down, z forward.

Shading (all per pixel, vectorised): per-class albedo modulated by procedural textures (value
noise; windows on facades, tiles on sidewalks, stripes on fences, grain on asphalt), Lambertian sun
+ hemispherical sky ambient, hard sun shadows from one shadow ray per lit pixel (``Scene.occluded``,
shared sun direction), optional headlights and lit windows at night, distance haze, a sky
gradient, sensor noise, and a gamma curve. Textures are functions of world position, so a surface
looks the same from frame to frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pl3d_ros.frame import CameraModel
from pl3d_ros.io.kitti import CAMERA_FRAME
from pl3d_ros.sim import raycast as rc
from pl3d_ros.sim.raycast import Scene

RGB = tuple[float, float, float]

#: KITTI sequence 00, P2: the full-resolution left colour camera.
KITTI_SIZE = (1242, 375)
KITTI_F = 718.856
KITTI_C = (607.1928, 185.2157)

#: LiDAR frame (x forward, y left, z up) -> camera optical frame (x right, y down, z forward).
R_OPTICAL_LIDAR = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


@dataclass(frozen=True)
class CameraConfig:
    """Pinhole camera: KITTI's P2 scaled by ``scale`` (focal length times ``focal_scale``:
    below 1 widens the view), mounted at ``position`` (metres, LiDAR frame), pitched down by
    ``pitch_deg``."""

    scale: float = 0.5
    focal_scale: float = 1.0
    position: tuple[float, float, float] = (0.27, 0.0, -0.08)
    pitch_deg: float = 0.0
    max_range: float = 250.0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(round(KITTI_SIZE[0] * self.scale)), int(round(KITTI_SIZE[1] * self.scale))

    def K(self) -> np.ndarray:
        """(3, 3) intrinsics; the principal point scales with the OpenCV pixel-centre convention."""
        f = KITTI_F * self.scale * self.focal_scale
        cx = (KITTI_C[0] + 0.5) * self.scale - 0.5
        cy = (KITTI_C[1] + 0.5) * self.scale - 0.5
        return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])

    def T_cam_lidar(self) -> np.ndarray:
        """(4, 4) LiDAR -> camera optical frame."""
        p = np.radians(self.pitch_deg)
        # Pitched down, the LiDAR's forward axis appears above the image centre (-y in the optical frame).
        Rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(p), -np.sin(p)], [0.0, np.sin(p), np.cos(p)]])
        R = Rx @ R_OPTICAL_LIDAR
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = -R @ np.asarray(self.position, dtype=np.float64)
        return T

    def camera_model(self) -> CameraModel:
        w, h = self.size
        return CameraModel(self.K(), w, h, self.T_cam_lidar(), "none", np.zeros(0), CAMERA_FRAME)


@dataclass(frozen=True)
class Lighting:
    """Illumination and the camera's response. Colours are linear RGB; angles in degrees
    (the sun's azimuth is measured in the world frame, counter-clockwise from +x)."""

    sun_azimuth_deg: float = 135.0
    sun_elevation_deg: float = 45.0
    sun: float = 1.0
    sun_color: RGB = (1.0, 0.96, 0.88)
    ambient: float = 0.45
    ambient_color: RGB = (0.80, 0.88, 1.0)
    sky_horizon: RGB = (0.62, 0.72, 0.88)
    sky_zenith: RGB = (0.16, 0.32, 0.66)
    haze: float = 0.002  # extinction, 1/m
    haze_color: RGB = (0.62, 0.70, 0.82)
    exposure: float = 1.0
    noise: float = 1.5  # sensor noise, standard deviation in 8-bit units
    headlights: float = 0.0  # ego headlight strength (night)
    window_glow: float = 0.0  # share of windows lit from inside (night)
    shadows: bool = True

    def sun_direction(self) -> np.ndarray:
        """(3,) unit vector towards the sun, world frame."""
        a, e = np.radians(self.sun_azimuth_deg), np.radians(self.sun_elevation_deg)
        return np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])


@dataclass
class CameraImage:
    """image (H, W, 3) uint8 RGB; labels (H, W) uint32 raw label per pixel (0: sky, unlabeled);
    depth (H, W) float32 metres along each pixel's ray (inf: sky)."""

    image: np.ndarray
    labels: np.ndarray
    depth: np.ndarray


def pixel_rays(camera: CameraModel) -> np.ndarray:
    """(H * W, 3) unit ray directions in the optical frame through every pixel centre, row-major
    (cached per intrinsics and size: every frame of a drive reuses them; read-only)."""
    return _pixel_rays(tuple(camera.K.ravel()), camera.width, camera.height)


@lru_cache(maxsize=8)
def _pixel_rays(K: tuple[float, ...], width: int, height: int) -> np.ndarray:
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    uv1 = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    d = uv1 @ np.linalg.inv(np.asarray(K).reshape(3, 3)).T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    d.setflags(write=False)
    return d


#: Linear [0, 1] -> 8-bit display values (gamma 2.2), by lookup: a power per pixel costs more.
_GAMMA_LUT = (np.linspace(0.0, 1.0, 4096) ** (1 / 2.2) * 255.0).astype(np.float32)


def render(scene: Scene, T_world_lidar: np.ndarray, camera: CameraModel, lighting: Lighting,
           rng: np.random.Generator, *, max_range: float = 250.0, texture_seed: int = 0) -> CameraImage:
    """Render ``camera`` (its T_cam_lidar places it relative to the LiDAR at ``T_world_lidar``)."""
    L = lighting
    T_world_cam = np.asarray(T_world_lidar, dtype=np.float64) @ np.linalg.inv(camera.T_cam_lidar)
    origin = T_world_cam[:3, 3]
    dirs_c = pixel_rays(camera)
    dirs_w = dirs_c @ T_world_cam[:3, :3].T
    hits = scene.cast(origin, dirs_w, max_range)
    surf = scene.surface(origin, dirs_w, hits)
    H, W = camera.height, camera.width

    # Sky for every pixel, then surfaces over it.
    color = _sky(dirs_w, L)
    albedo, emissive = _texture(surf, L, texture_seed)
    light = _illumination(scene, surf, dirs_w, dirs_c, hits.t, L)
    t = hits.t[surf.ray].astype(np.float64)
    trans = np.exp(-L.haze * t)[:, None]
    haze = np.asarray(L.haze_color) * (L.ambient + 0.25 * L.sun)
    color[surf.ray] = (albedo * light + emissive) * trans + haze * (1 - trans)
    if L.haze > 0.01:  # dense fog hides the sky too
        color[~hits.hit] = haze
    color = _GAMMA_LUT[(np.clip(color * L.exposure, 0.0, 1.0) * 4095).astype(np.int32)]
    color += rng.standard_normal(color.shape, dtype=np.float32) * np.float32(L.noise)
    image = np.clip(np.rint(color), 0, 255).astype(np.uint8).reshape(H, W, 3)
    labels = np.zeros(H * W, dtype=np.uint32)
    labels[surf.ray] = surf.raw
    return CameraImage(image, labels.reshape(H, W), hits.t.reshape(H, W))


# ------------------------------------------------------------------------------------ shading


def _sky(dirs_w: np.ndarray, L: Lighting) -> np.ndarray:
    """(R, 3) linear sky radiance: horizon-to-zenith gradient and a sun disk."""
    el = np.clip(dirs_w[:, 2], -1, 1)
    k = np.clip(el / 0.6, 0.0, 1.0)[:, None] ** 0.6
    sky = np.asarray(L.sky_horizon) * (1 - k) + np.asarray(L.sky_zenith) * k
    if L.sun > 0:
        glow = np.clip(dirs_w @ L.sun_direction(), 0, 1) ** 400 * 3.0 * L.sun
        sky = sky + glow[:, None] * np.asarray(L.sun_color)
    return sky


def _illumination(scene: Scene, surf: rc.Surface, dirs_w: np.ndarray, dirs_c: np.ndarray,
                  t: np.ndarray, L: Lighting) -> np.ndarray:
    """(M, 3) incident light at each surface point: sky ambient, sun (with shadows), headlights."""
    n = surf.normal.astype(np.float64)
    amb = L.ambient * (0.65 + 0.35 * n[:, 2])  # a hemisphere: up-facing surfaces see more sky
    light = amb[:, None] * np.asarray(L.ambient_color)
    if L.sun > 0:
        s = L.sun_direction()
        ndl = np.clip(n @ s, 0.0, None)
        lit = np.flatnonzero(ndl > 0)
        if L.shadows and lit.size:
            start = surf.point[lit] + n[lit] * 0.03  # off the surface: no self-shadowing
            shadow = scene.occluded(start, s, max_dist=80.0)
            ndl[lit[shadow]] = 0.0
        light = light + (L.sun * ndl)[:, None] * np.asarray(L.sun_color)
    if L.headlights > 0:
        # Low beams: a wide, flat lobe just below the horizon, from (about) the camera itself.
        dc = dirs_c[surf.ray]
        x, y = dc[:, 0] / dc[:, 2], dc[:, 1] / dc[:, 2]
        lobe = np.exp(-(x / 0.5) ** 2 - ((y - 0.12) / 0.16) ** 2)
        cos_l = np.clip(-(n * dirs_w[surf.ray]).sum(1), 0, 1)
        r = t[surf.ray].astype(np.float64)
        light = light + (L.headlights * lobe * cos_l / (1 + (r / 10.0) ** 2))[:, None] * np.array(
            [1.0, 0.95, 0.85])
    return light


def _hash(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Integer lattice -> uniform [0, 1) (a multiply-xorshift hash; uint32 wraps on purpose)."""
    h = (ix.astype(np.int64).astype(np.uint32) * np.uint32(73856093)
         ^ iy.astype(np.int64).astype(np.uint32) * np.uint32(19349663)
         ^ iz.astype(np.int64).astype(np.uint32) * np.uint32(83492791)
         ^ np.uint32(seed * 2654435761 % (1 << 32)))
    h ^= h >> np.uint32(13)
    h *= np.uint32(0x5BD1E995)
    h ^= h >> np.uint32(15)
    return (h & np.uint32(0xFFFFFF)).astype(np.float32) / np.float32(1 << 24)


def _cell_noise(p: np.ndarray, cell: float | np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) per lattice cell of size ``cell`` metres (grain, tiles, window cells)."""
    q = np.floor(p / cell)
    return _hash(q[:, 0], q[:, 1], q[:, 2], seed)


def _value_noise(p: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """(M,) smooth value noise in [0, 1) at world points (M, 3), feature size ``cell`` metres."""
    q = p / cell
    i = np.floor(q)
    f = q - i
    f = f * f * (3 - 2 * f)  # smoothstep: no visible lattice creases
    out = np.zeros(p.shape[0], dtype=np.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = ((f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                     * (f[:, 2] if dz else 1 - f[:, 2]))
                out += w * _hash(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, seed)
    return out


def _texture(surf: rc.Surface, L: Lighting, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, 3) linear albedo after texturing, (M, 3) emitted light (lit windows)."""
    m = surf.ray.size
    base = surf.albedo.astype(np.float64)
    p = surf.point
    tex = surf.tex
    factor = np.ones(m)
    emissive = np.zeros((m, 3))
    coarse = _value_noise(p, 1.5, seed)
    factor *= 0.9 + 0.2 * coarse

    def where(t: int) -> np.ndarray:
        return np.flatnonzero(tex == t)

    i = where(rc.TEX_ASPHALT)
    if i.size:
        factor[i] *= 0.82 + 0.3 * _cell_noise(p[i], 0.04, seed + 1) + 0.1 * _value_noise(p[i], 4.0, seed + 2)
    i = where(rc.TEX_MARKING)
    if i.size:
        factor[i] *= 0.8 + 0.2 * _value_noise(p[i], 0.3, seed + 3)
    i = where(rc.TEX_COBBLE)
    if i.size:
        g = np.abs(((p[i, :2] / 0.25) % 1.0) - 0.5)
        joint = (g > 0.42).any(axis=1)
        factor[i] *= np.where(joint, 0.55, 0.85 + 0.3 * _cell_noise(p[i], 0.25, seed + 4))
    i = where(rc.TEX_PAVING)
    if i.size:
        g = np.abs(((p[i, :2] / 0.6) % 1.0) - 0.5)
        joint = (g > 0.46).any(axis=1)
        factor[i] *= np.where(joint, 0.6, 0.9 + 0.15 * _cell_noise(p[i], 0.6, seed + 5))
        curb = surf.normal[i, 2] < 0.5  # the curb face: darker concrete
        factor[i[curb]] *= 0.75
    for t_id, cell, amp in ((rc.TEX_GRASS, 0.35, 0.6), (rc.TEX_FOLIAGE, 0.3, 0.9)):
        i = where(t_id)
        if i.size:
            n1 = _value_noise(p[i], cell, seed + 6)
            n2 = _value_noise(p[i], cell * 4, seed + 7)
            factor[i] *= 1 - amp / 2 + amp * n1
            # Hue drifts towards yellow-brown in patches, and per tree.
            tint = np.stack([1 + 0.35 * n2 + 0.2 * surf.var[i], 1 + 0.1 * n2, 0.8 + 0.2 * surf.var[i]], 1)
            base[i] = base[i] * tint
    i = where(rc.TEX_BARK)
    if i.size:
        factor[i] *= 0.6 + 0.6 * _value_noise(p[i] * [1.0, 1.0, 0.2], 0.08, seed + 8)
    i = where(rc.TEX_FENCE)
    if i.size:
        factor[i] *= np.where((surf.u[i] / 0.12) % 1.0 < 0.35, 0.45, 1.0)
    i = where(rc.TEX_GLASS)
    if i.size:
        roof = surf.normal[i, 2] > 0.5
        glass = i[~roof]
        base[glass] = (0.07, 0.08, 0.10)
        factor[glass] = 1.0 + 0.5 * np.clip(surf.height[glass] / 0.5, 0, 1)  # sky reflection
    i = where(rc.TEX_BUILDING)
    if i.size:
        var = surf.var[i].astype(np.float64)
        wall = surf.normal[i, 2] < 0.5
        spacing = 2.4 + 1.2 * var
        floor_h = 3.0 + 0.4 * var
        fu = (surf.u[i] / spacing) % 1.0
        fh = (surf.height[i] / floor_h) % 1.0
        win = (wall & (np.abs(fu - 0.5) < 0.22) & (fh > 0.3) & (fh < 0.8)
               & (surf.height[i] > 2.5) & (surf.height[i] < surf.top[i] - 0.8))
        factor[i[~wall]] *= 0.7  # roofs
        w = i[win]
        if w.size:
            base[w] = (0.10, 0.13, 0.17)
            factor[w] = 1.0 + 0.6 * _cell_noise(p[w], 3.0, seed + 9)
            if L.window_glow > 0:
                cell = np.stack([np.floor(surf.u[w] / spacing[win]), np.floor(surf.height[w] / floor_h[win]),
                                 surf.var[w] * 1e4], 1)
                lit = _hash(cell[:, 0], cell[:, 1], cell[:, 2], seed + 10) < L.window_glow
                emissive[w[lit]] = np.array([1.0, 0.75, 0.45]) * 0.6
    albedo = np.clip(base * factor[:, None], 0.0, 1.0) ** 2.2  # sRGB-ish -> linear
    return albedo, emissive
