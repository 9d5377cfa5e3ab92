"""Analytic scene primitives and vectorised ray casting against them.

A scene is a ground plane (z = ``ground.z`` in world coordinates, metres, z up) with a class per
region, plus three kinds of primitives, each stored as a handful of numpy arrays:

- ``Boxes``: centre (N, 3), half sizes (N, 3), yaw about +z (N,) radians;
- ``Cylinders``: vertical, axis at xy (N, 2), from z0 to z1 (N,), radius (N,);
- ``Ellipsoids``: axis-aligned, centre (N, 3), radii (N, 3).

Each primitive carries a ``Material``: raw SemanticKITTI label (semantic id in the lower 16 bits,
instance id in the upper 16, as in ``.label`` files), albedo (sRGB in [0, 1]), LiDAR reflectivity,
a texture id and a per-primitive random variation value.

Casting is vectorised over rays x primitives. Every ray of one cast shares an origin (a LiDAR or a
camera centre), so per-primitive terms are computed once and the per-pair work reduces to a few
matrix products and element-wise passes. To keep the rays x primitives products small, rays are
binned into tiles of azimuth x elevation seen from the origin and each primitive is tested only
against the tiles its angular bounds overlap (a primitive 60 m away covers a few degrees; without
culling a 64 x 2048 scan would test every ray against every primitive). Shadow rays share one
direction (the sun) instead, and are tiled in the plane perpendicular to it (a shadow map's
projection). The loops run over tiles and primitive kinds, never over rays.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

#: Hit kinds.
KIND_NONE, KIND_GROUND, KIND_BOX, KIND_CYLINDER, KIND_ELLIPSOID = 0, 1, 2, 3, 4

#: Rays per culling tile the tiler aims at: small enough to keep the rays x primitives products
#: cheap, large enough that the per-tile Python overhead stays a minor share (measured on 2 cores).
RAYS_PER_TILE = 1500

#: Shadow-ray start points per light-space tile: smaller than RAYS_PER_TILE because projected
#: shadow volumes of tall buildings are long, so coarse tiles pair every point with many of them.
SHADOW_POINTS_PER_TILE = 300

#: Smallest culling tile, radians.
MIN_BIN = math.radians(0.1)

#: Smallest accepted hit distance, metres: rejects self-intersections of rays that start on a surface.
T_MIN = 1e-3

# Texture ids, read by the camera's shader (sim/camera.py).
TEX_PLAIN, TEX_ASPHALT, TEX_BUILDING, TEX_FOLIAGE, TEX_GRASS, TEX_FENCE = 0, 1, 2, 3, 4, 5
TEX_GLASS, TEX_PAVING, TEX_MARKING, TEX_BARK, TEX_COBBLE = 6, 7, 8, 9, 10


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# ------------------------------------------------------------------------------------ primitives


@dataclass
class Material:
    """Per-primitive appearance. All arrays have the primitive count N as first dimension.

    Attributes:
        raw: (N,) uint32 raw label, semantic id | instance id << 16.
        albedo: (N, 3) float32 sRGB reflectance in [0, 1] for the camera.
        refl: (N,) float32 LiDAR reflectivity in [0, 1] at the laser wavelength.
        tex: (N,) int16 texture id (TEX_*).
        var: (N,) float32 random value in [0, 1) that textures use to vary between instances.
    """

    raw: np.ndarray
    albedo: np.ndarray
    refl: np.ndarray
    tex: np.ndarray
    var: np.ndarray

    @classmethod
    def make(cls, n: int, raw: int | np.ndarray, albedo, refl, tex: int | np.ndarray = TEX_PLAIN,
             var: float | np.ndarray = 0.0) -> Material:
        """Broadcast scalars / single colours to n primitives."""
        return cls(np.broadcast_to(np.asarray(raw, dtype=np.uint32), (n,)).copy(),
                   np.broadcast_to(_f32(albedo), (n, 3)).copy(),
                   np.broadcast_to(_f32(refl), (n,)).copy(),
                   np.broadcast_to(np.asarray(tex, dtype=np.int16), (n,)).copy(),
                   np.broadcast_to(_f32(var), (n,)).copy())


class _Prims:
    """Shared helpers of the primitive containers: length, concat."""

    mat: Material

    def __len__(self) -> int:
        return int(self.mat.raw.shape[0])

    @classmethod
    def concat(cls, parts: list):
        parts = [p for p in parts if p is not None]
        if not parts:
            return cls.empty()
        kw = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
              for f in fields(cls) if f.name != "mat"}
        mat = Material(**{f.name: np.concatenate([getattr(p.mat, f.name) for p in parts])
                          for f in fields(Material)})
        return cls(**kw, mat=mat)


@dataclass
class Boxes(_Prims):
    """Boxes rotated about +z. center (N, 3), half (N, 3) half sizes, yaw (N,) radians, metres."""

    center: np.ndarray
    half: np.ndarray
    yaw: np.ndarray
    mat: Material

    @classmethod
    def empty(cls) -> Boxes:
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), Material.make(0, 0, 0, 0))

    @classmethod
    def make(cls, center, size, yaw, mat: Material) -> Boxes:
        """From full sizes (N, 3) (length along the box's x, width, height)."""
        center = np.atleast_2d(np.asarray(center, dtype=np.float64))
        n = center.shape[0]
        half = np.broadcast_to(np.asarray(size, dtype=np.float64) / 2.0, (n, 3)).copy()
        return cls(center, half, np.broadcast_to(np.asarray(yaw, dtype=np.float64), (n,)).copy(), mat)

    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Footprint corners (N, 4, 2), bounding radius in xy (N,), zmin (N,), zmax (N,)."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        sx = np.array([1, 1, -1, -1])[None] * self.half[:, :1]
        sy = np.array([1, -1, -1, 1])[None] * self.half[:, 1:2]
        corners = np.stack([self.center[:, :1] + c[:, None] * sx - s[:, None] * sy,
                            self.center[:, 1:2] + s[:, None] * sx + c[:, None] * sy], axis=-1)
        return (corners, np.hypot(self.half[:, 0], self.half[:, 1]),
                self.center[:, 2] - self.half[:, 2], self.center[:, 2] + self.half[:, 2])


@dataclass
class Cylinders(_Prims):
    """Vertical cylinders: axis xy (N, 2), z0 < z1 (N,), radius (N,), metres."""

    xy: np.ndarray
    z0: np.ndarray
    z1: np.ndarray
    radius: np.ndarray
    mat: Material

    @classmethod
    def empty(cls) -> Cylinders:
        return cls(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0), Material.make(0, 0, 0, 0))

    @classmethod
    def make(cls, xy, z0, z1, radius, mat: Material) -> Cylinders:
        xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
        n = xy.shape[0]
        b = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()  # noqa: E731
        return cls(xy, b(z0), b(z1), b(radius), mat)


@dataclass
class Ellipsoids(_Prims):
    """Axis-aligned ellipsoids: center (N, 3), radii (N, 3), metres."""

    center: np.ndarray
    radii: np.ndarray
    mat: Material

    @classmethod
    def empty(cls) -> Ellipsoids:
        return cls(np.zeros((0, 3)), np.ones((0, 3)), Material.make(0, 0, 0, 0))

    @classmethod
    def make(cls, center, radii, mat: Material) -> Ellipsoids:
        center = np.atleast_2d(np.asarray(center, dtype=np.float64))
        return cls(center, np.broadcast_to(np.asarray(radii, dtype=np.float64),
                                           center.shape).copy(), mat)


@dataclass
class PrimSet:
    """One container of each primitive kind."""

    boxes: Boxes = field(default_factory=Boxes.empty)
    cylinders: Cylinders = field(default_factory=Cylinders.empty)
    ellipsoids: Ellipsoids = field(default_factory=Ellipsoids.empty)

    @classmethod
    def concat(cls, parts: list[PrimSet]) -> PrimSet:
        return cls(Boxes.concat([p.boxes for p in parts]),
                   Cylinders.concat([p.cylinders for p in parts]),
                   Ellipsoids.concat([p.ellipsoids for p in parts]))

    def __len__(self) -> int:
        return len(self.boxes) + len(self.cylinders) + len(self.ellipsoids)

    def transformed(self, xyz: np.ndarray, yaw: np.ndarray) -> PrimSet:
        """Each primitive moved by its own rigid motion: rotate by ``yaw`` (N_kind,) about the
        local origin, then translate by ``xyz`` (N_kind, 3). Used to place object templates and
        move agents; ``xyz``/``yaw`` are given per primitive (gathered from per-object poses)."""
        out = PrimSet()
        for name in ("boxes", "cylinders", "ellipsoids"):
            p = getattr(self, name)
            t, y = xyz[name], yaw[name]
            c, s = np.cos(y), np.sin(y)
            if name == "boxes":
                x0, y0 = p.center[:, 0], p.center[:, 1]
                center = np.stack([t[:, 0] + c * x0 - s * y0, t[:, 1] + s * x0 + c * y0,
                                   t[:, 2] + p.center[:, 2]], axis=1)
                out.boxes = Boxes(center, p.half.copy(), p.yaw + y, p.mat)
            elif name == "cylinders":
                x0, y0 = p.xy[:, 0], p.xy[:, 1]
                xy = np.stack([t[:, 0] + c * x0 - s * y0, t[:, 1] + s * x0 + c * y0], axis=1)
                out.cylinders = Cylinders(xy, p.z0 + t[:, 2], p.z1 + t[:, 2], p.radius.copy(), p.mat)
            else:
                # Ellipsoids stay axis-aligned: templates only use spheres, which rotation leaves alike.
                x0, y0 = p.center[:, 0], p.center[:, 1]
                center = np.stack([t[:, 0] + c * x0 - s * y0, t[:, 1] + s * x0 + c * y0,
                                   t[:, 2] + p.center[:, 2]], axis=1)
                out.ellipsoids = Ellipsoids(center, p.radii.copy(), p.mat)
        return out


# ------------------------------------------------------------------------------------ ground


class Ground(Protocol):
    """A horizontal ground plane whose class and material depend on the position."""

    z: float

    def classify(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(M, 2) world xy (metres) -> raw (M,) uint32, albedo (M, 3), refl (M,), tex (M,) int16."""
        ...


@dataclass
class FlatGround:
    """The same class everywhere (test scenes)."""

    raw: int = 40
    albedo: tuple[float, float, float] = (0.3, 0.3, 0.31)
    refl: float = 0.15
    tex: int = TEX_ASPHALT
    z: float = 0.0

    def classify(self, xy: np.ndarray):
        m = xy.shape[0]
        mat = Material.make(m, self.raw, self.albedo, self.refl, self.tex)
        return mat.raw, mat.albedo, mat.refl, mat.tex


# ------------------------------------------------------------------------------------ results


@dataclass
class Hits:
    """First hits of R rays: t (R,) float32 metres along the unit direction (inf: no hit),
    kind (R,) int8 KIND_*, index (R,) int32 primitive index within its kind (-1: none)."""

    t: np.ndarray
    kind: np.ndarray
    index: np.ndarray

    @property
    def hit(self) -> np.ndarray:
        return self.kind != KIND_NONE


@dataclass
class Surface:
    """Attributes at the hit points of the rays ``ray`` (M,) (indices into the cast's rays).

    point (M, 3) float64 world metres; normal (M, 3) float32 unit, facing the ray's origin;
    raw (M,) uint32; albedo (M, 3); refl (M,); tex (M,) int16; var (M,); u (M,) a horizontal
    coordinate along the surface (metres; facade position for windows and stripes);
    height (M,) metres above the primitive's base; top (M,) the primitive's height (metres);
    kind (M,) int8.
    """

    ray: np.ndarray
    point: np.ndarray
    normal: np.ndarray
    raw: np.ndarray
    albedo: np.ndarray
    refl: np.ndarray
    tex: np.ndarray
    var: np.ndarray
    u: np.ndarray
    height: np.ndarray
    top: np.ndarray
    kind: np.ndarray


# ------------------------------------------------------------------------------------ culling


def _wrap(a: np.ndarray) -> np.ndarray:
    """Angles to [-pi, pi)."""
    return (a + np.pi) % (2 * np.pi) - np.pi


class _Tiler:
    """Bins rays of one shared origin into azimuth x elevation tiles and primitives into the tiles
    their angular bounds overlap.

    Azimuth bins start at the rays' smallest azimuth (relative to their mean direction, so a camera
    looking along -x does not straddle the +-pi seam) and continue around the full circle; bins
    beyond the rays' extent receive no rays and are never visited.
    """

    def __init__(self, dirs: np.ndarray, target: int | None = None) -> None:
        n = dirs.shape[0]
        target = target or RAYS_PER_TILE
        mean = dirs[:, :2].mean(axis=0)
        self.ref = float(math.atan2(mean[1], mean[0])) if np.hypot(*mean) > 0.3 else 0.0
        az = _wrap(np.arctan2(dirs[:, 1], dirs[:, 0]) - self.ref)
        el = np.arctan2(dirs[:, 2], np.hypot(dirs[:, 0], dirs[:, 1]))
        a0, a1 = float(az.min()), float(az.max())
        e0, e1 = float(el.min()), float(el.max())
        span_a = max(a1 - a0, 1e-6)
        span_e = max(e1 - e0, 1e-6)
        n_tiles = max(1, n // target)
        # Square-ish tiles in angle, but at most 8 elevation bands (a scan spans ~30 deg of
        # elevation and 360 of azimuth: the split goes mostly to azimuth).
        n_el = int(np.clip(round(math.sqrt(n_tiles * span_e / span_a)), 1, 8))
        n_az = max(1, n_tiles // n_el)
        # Bins no finer than 0.1 deg: a handful of rays (a unit test, a single shadow probe)
        # must not make the full-circle bin count explode.
        self.a0, self.da = a0, max(span_a * (1 + 1e-6) / n_az, MIN_BIN)
        self.e0, self.de = e0, max(span_e * (1 + 1e-6) / n_el, MIN_BIN)
        self.n_full = int(math.ceil(2 * np.pi / self.da))
        self.n_az, self.n_el = n_az, n_el
        ab = np.minimum(((az - a0) % (2 * np.pi) / self.da).astype(np.int64), self.n_full - 1)
        eb = np.clip(((el - e0) / self.de).astype(np.int64), 0, n_el - 1)
        tile = ab * n_el + eb
        self.order = _bucket_order(tile, self.n_full * n_el)
        counts = np.bincount(tile, minlength=self.n_full * n_el)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.tiles = np.flatnonzero(counts)

    def overlap(self, az_lo: np.ndarray, az_hi: np.ndarray, full: np.ndarray,
                el_lo: np.ndarray, el_hi: np.ndarray) -> np.ndarray:
        """(n_full * n_el, P) bool: which tiles each primitive's angular box overlaps.

        az_lo <= az_hi (P,) absolute azimuths in radians (az_hi - az_lo < pi unless ``full``),
        el_lo <= el_hi (P,) elevations.
        """
        b0 = np.minimum((((az_lo - self.ref) - self.a0) % (2 * np.pi) / self.da).astype(np.int64),
                        self.n_full - 1)
        b1 = np.minimum((((az_hi - self.ref) - self.a0) % (2 * np.pi) / self.da).astype(np.int64),
                        self.n_full - 1)
        span = (b1 - b0) % self.n_full
        k = np.arange(self.n_full)[:, None]
        az_ov = (((k - b0[None]) % self.n_full) <= span[None]) | full[None]
        e0 = np.clip(np.floor((el_lo - self.e0) / self.de), -1, self.n_el).astype(np.int64)
        e1 = np.clip(np.floor((el_hi - self.e0) / self.de), -1, self.n_el).astype(np.int64)
        j = np.arange(self.n_el)[:, None]
        el_ov = (j >= e0[None]) & (j <= e1[None])
        return (az_ov[:, None, :] & el_ov[None, :, :]).reshape(self.n_full * self.n_el, -1)

    def __iter__(self) -> Iterator[tuple[int, slice]]:
        """(tile id, slice into ``order``) of every tile that holds rays."""
        for tile in self.tiles:
            yield int(tile), slice(int(self.starts[tile]), int(self.starts[tile + 1]))


def _bucket_order(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """Stable argsort of small non-negative integer keys: numpy's radix sort for 16-bit keys is
    several times faster than its 64-bit sort on a 100k-ray cast."""
    if n_keys <= np.iinfo(np.uint16).max:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def _angular_bounds(o: np.ndarray, center_xy: np.ndarray, radius_xy: np.ndarray,
                    zmin: np.ndarray, zmax: np.ndarray, corners: np.ndarray | None = None):
    """Conservative azimuth / elevation bounds (radians) of primitives seen from o (3,).

    The footprint is a circle of ``radius_xy`` about ``center_xy`` (N, 2), or, tighter, the
    polygon ``corners`` (N, K, 2). Returns az_lo, az_hi, full (N,) bool (origin inside the
    footprint: every azimuth), el_lo, el_hi.
    """
    rel = center_xy - o[:2]
    dist = np.hypot(rel[:, 0], rel[:, 1])
    ac = np.arctan2(rel[:, 1], rel[:, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        if corners is not None:
            ca = np.arctan2(corners[..., 1] - o[1], corners[..., 0] - o[0])
            d = _wrap(ca - ac[:, None])
            lo, hi = ac + d.min(axis=1), ac + d.max(axis=1)
        else:
            half = np.arcsin(np.clip(radius_xy / np.maximum(dist, 1e-9), 0, 1))
            lo, hi = ac - half, ac + half
    full = dist <= radius_xy * 1.0001 + 1e-6
    full |= (hi - lo) >= np.pi  # only near primitives; treat as surrounding
    dmin = np.maximum(dist - radius_xy, 1e-6)
    dmax = dist + radius_xy
    zlo, zhi = zmin - o[2], zmax - o[2]
    el_lo = np.minimum(np.arctan2(zlo, dmin), np.arctan2(zlo, dmax))
    el_hi = np.maximum(np.arctan2(zhi, dmin), np.arctan2(zhi, dmax))
    return lo, hi, full, el_lo, el_hi


# ------------------------------------------------------------------------------------ scene


@dataclass
class Scene:
    """Ground + primitives at one instant, in world coordinates (metres, z up)."""

    prims: PrimSet
    ground: Ground = field(default_factory=FlatGround)

    # -- shared-origin casting ------------------------------------------------------------------

    def cast(self, origin: np.ndarray, dirs: np.ndarray, max_range: float) -> Hits:
        """First hits of rays from one ``origin`` (3,) along unit ``dirs`` (R, 3), up to
        ``max_range`` metres."""
        o = np.asarray(origin, dtype=np.float64)
        D = _f32(dirs)
        R = D.shape[0]
        t_best = np.full(R, np.inf, dtype=np.float32)
        kind = np.zeros(R, dtype=np.int8)
        index = np.full(R, -1, dtype=np.int32)

        # Ground plane: one division per ray.
        with np.errstate(divide="ignore", invalid="ignore"):
            tg = np.float32(self.ground.z - o[2]) / D[:, 2]
        ok = (D[:, 2] < 0) & (tg > T_MIN) & (tg <= max_range)
        t_best[ok] = tg[ok]
        kind[ok] = KIND_GROUND
        index[ok] = 0

        preps = self._prepare_origin(o, max_range)
        if not preps or R == 0:
            return Hits(t_best, kind, index)
        tiler = _Tiler(D)
        overlaps = [(k, ids, packed, tiler.overlap(*bounds), fn)
                    for k, ids, packed, bounds, fn in preps]
        Ds = D[tiler.order]
        tb = t_best[tiler.order]
        kd = kind[tiler.order]
        ix = index[tiler.order]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for tile, sl in tiler:
                d = Ds[sl]
                for k, ids, packed, ov, fn in overlaps:
                    sel = np.flatnonzero(ov[tile])
                    if sel.size == 0:
                        continue
                    t = fn(d, packed[sel])  # (n, p)
                    j = t.argmin(axis=1)
                    tm = np.take_along_axis(t, j[:, None], axis=1)[:, 0]
                    better = tm < tb[sl]
                    if better.any():
                        rows = np.flatnonzero(better) + sl.start
                        tb[rows] = tm[better]
                        kd[rows] = k
                        ix[rows] = ids[sel[j[better]]]
        t_best[tiler.order], kind[tiler.order], index[tiler.order] = tb, kd, ix
        far = t_best > max_range
        t_best[far], kind[far], index[far] = np.inf, KIND_NONE, -1
        return Hits(t_best, kind, index)

    def _prepare_origin(self, o: np.ndarray, max_range: float):
        """Per kind: (kind, primitive ids, packed float32 per-primitive terms, angular bounds,
        intersection function) for the primitives within ``max_range`` of ``o``."""
        out = []
        b = self.prims.boxes
        if len(b):
            corners, rxy, zmin, zmax = b.bounds()
            near = np.hypot(*(b.center[:, :2] - o[:2]).T) - rxy <= max_range
            ids = np.flatnonzero(near)
            if ids.size:
                c, s = np.cos(b.yaw[ids]), np.sin(b.yaw[ids])
                rel = o - b.center[ids]
                lx, ly, lz = c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]
                h = b.half[ids]
                # Numerators of the slab test: (+-h - o_local); the rotation columns go to a matmul.
                packed = _f32(np.stack([c, s, -h[:, 0] - lx, h[:, 0] - lx, -h[:, 1] - ly,
                                        h[:, 1] - ly, -h[:, 2] - lz, h[:, 2] - lz], axis=1))
                bounds = _angular_bounds(o, b.center[ids, :2], rxy[ids], zmin[ids], zmax[ids],
                                         corners[ids])
                out.append((KIND_BOX, ids, packed, bounds, _boxes_from_origin))
        cy = self.prims.cylinders
        if len(cy):
            near = np.hypot(*(cy.xy - o[:2]).T) - cy.radius <= max_range
            ids = np.flatnonzero(near)
            if ids.size:
                rel = o[:2] - cy.xy[ids]
                r = cy.radius[ids]
                packed = _f32(np.stack([rel[:, 0], rel[:, 1], (rel ** 2).sum(1) - r ** 2,
                                        cy.z0[ids] - o[2], cy.z1[ids] - o[2], r ** 2], axis=1))
                bounds = _angular_bounds(o, cy.xy[ids], r, cy.z0[ids], cy.z1[ids])
                out.append((KIND_CYLINDER, ids, packed, bounds, _cylinders_from_origin))
        e = self.prims.ellipsoids
        if len(e):
            rxy = e.radii[:, :2].max(axis=1)
            near = np.hypot(*(e.center[:, :2] - o[:2]).T) - rxy <= max_range
            ids = np.flatnonzero(near)
            if ids.size:
                r = e.radii[ids]
                op = (o - e.center[ids]) / r  # origin in the unit-sphere space of each ellipsoid
                packed = _f32(np.concatenate([op / r, 1.0 / r ** 2,
                                              (op ** 2).sum(1, keepdims=True) - 1.0], axis=1))
                zc = e.center[ids, 2]
                bounds = _angular_bounds(o, e.center[ids, :2], rxy[ids], zc - r[:, 2], zc + r[:, 2])
                out.append((KIND_ELLIPSOID, ids, packed, bounds, _ellipsoids_from_origin))
        return out

    # -- shared-direction occlusion (shadows) ---------------------------------------------------

    def occluded(self, points: np.ndarray, direction: np.ndarray, max_dist: float = 200.0,
                 target: int | None = None) -> np.ndarray:
        """(M,) bool: whether the ray from each of ``points`` (M, 3) along the unit ``direction``
        (3,) hits a primitive within ``max_dist`` metres (the ground cannot occlude a ray that
        leaves it upwards). Start points should be offset off their surface by the caller."""
        P = np.asarray(points, dtype=np.float64)
        s = np.asarray(direction, dtype=np.float64)
        s = s / np.linalg.norm(s)
        M = P.shape[0]
        out = np.zeros(M, dtype=bool)
        if M == 0 or len(self.prims) == 0:
            return out
        # Light-space basis: tiles live in the plane perpendicular to the shared direction.
        e1 = np.cross(s, [0.0, 0.0, 1.0])
        e1 = e1 / np.linalg.norm(e1) if np.linalg.norm(e1) > 1e-6 else np.array([1.0, 0.0, 0.0])
        e2 = np.cross(s, e1)
        basis = np.stack([e1, e2], axis=1)  # (3, 2)
        pc = P.mean(axis=0)
        uv = (P - pc) @ basis
        lo, hi = uv.min(axis=0), uv.max(axis=0)
        n_tiles = max(1, M // (target or SHADOW_POINTS_PER_TILE))
        span = np.maximum(hi - lo, 1e-3)
        nu = int(np.clip(round(math.sqrt(n_tiles * span[0] / span[1])), 1, 64))
        nv = max(1, min(64, n_tiles // nu))
        cell = span * (1 + 1e-6) / np.array([nu, nv])
        iu = np.minimum(((uv[:, 0] - lo[0]) / cell[0]).astype(np.int64), nu - 1)
        iv = np.minimum(((uv[:, 1] - lo[1]) / cell[1]).astype(np.int64), nv - 1)
        tile = iu * nv + iv
        order = _bucket_order(tile, nu * nv)
        counts = np.bincount(tile, minlength=nu * nv)
        starts = np.concatenate([[0], np.cumsum(counts)])
        Ps = _f32(P[order] - pc)  # float32 relative to the points' centre keeps precision

        preps = self._prepare_direction(pc, s, basis, P, max_dist)
        overlaps = []
        for fn, packed, (plo, phi) in preps:
            a0 = np.clip(np.floor((plo - lo) / cell), -1, [nu, nv]).astype(np.int64)
            a1 = np.clip(np.floor((phi - lo) / cell), -1, [nu, nv]).astype(np.int64)
            ku = np.arange(nu)[:, None]
            kv = np.arange(nv)[:, None]
            ou = (ku >= a0[None, :, 0]) & (ku <= a1[None, :, 0])
            ovv = (kv >= a0[None, :, 1]) & (kv <= a1[None, :, 1])
            overlaps.append((fn, packed, (ou[:, None, :] & ovv[None, :, :]).reshape(nu * nv, -1)))
        res = np.zeros(M, dtype=bool)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for tile_id in np.flatnonzero(counts):
                sl = slice(int(starts[tile_id]), int(starts[tile_id + 1]))
                p = Ps[sl]
                acc = np.zeros(p.shape[0], dtype=bool)
                for fn, packed, ov in overlaps:
                    sel = np.flatnonzero(ov[tile_id])
                    if sel.size:
                        acc |= fn(p, packed[sel], max_dist)
                res[sl] = acc
        out[order] = res
        return out

    def _prepare_direction(self, pc: np.ndarray, s: np.ndarray, basis: np.ndarray,
                           P: np.ndarray, max_dist: float):
        """Per kind: (occlusion function, packed float32 terms relative to ``pc``, projected
        bounds (lo (N, 2), hi (N, 2)) in light space) for primitives that can occlude."""
        out = []
        zmin_pts = float(P[:, 2].min())
        pmin, pmax = P.min(axis=0) - max_dist, P.max(axis=0) + max_dist

        def proj_bounds(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            uv = (pts - pc) @ basis  # (N, K, 2)
            return uv.min(axis=1), uv.max(axis=1)

        b = self.prims.boxes
        if len(b):
            corners, rxy, zmin, zmax = b.bounds()
            keep = (zmax > zmin_pts) & np.all((b.center[:, :2] + rxy[:, None] >= pmin[:2])
                                              & (b.center[:, :2] - rxy[:, None] <= pmax[:2]), axis=1)
            ids = np.flatnonzero(keep)
            if ids.size:
                c, sn = np.cos(b.yaw[ids]), np.sin(b.yaw[ids])
                ctr = b.center[ids] - pc
                h = b.half[ids]
                dl = np.stack([c * s[0] + sn * s[1], -sn * s[0] + c * s[1],
                               np.full(ids.size, s[2])], axis=1)
                inv = 1.0 / np.where(np.abs(dl) < 1e-9, 1e-9, dl)
                zero = np.zeros(ids.size)
                # Row k of each 3 x 3 block maps a point to its box-frame coordinate on axis k.
                rows = np.stack([np.stack([c, sn, zero], 1), np.stack([-sn, c, zero], 1),
                                 np.stack([zero, zero, zero + 1], 1)], axis=1)  # (q, 3, 3)
                lc = np.einsum("qij,qj->qi", rows, ctr)  # box centres in their own frames
                packed = _f32(np.concatenate([
                    (rows * inv[:, :, None]).transpose(0, 2, 1).reshape(-1, 9),
                    (-h + lc) * inv, (h + lc) * inv], axis=1))
                box3 = np.concatenate([np.concatenate([corners[ids], zmin[ids, None, None]
                                                       .repeat(4, 1)], axis=2),
                                       np.concatenate([corners[ids], zmax[ids, None, None]
                                                       .repeat(4, 1)], axis=2)], axis=1)
                out.append((_boxes_along_dir(s), packed, proj_bounds(box3)))
        cy = self.prims.cylinders
        if len(cy):
            keep = (cy.z1 > zmin_pts) & np.all((cy.xy + cy.radius[:, None] >= pmin[:2])
                                               & (cy.xy - cy.radius[:, None] <= pmax[:2]), axis=1)
            ids = np.flatnonzero(keep)
            if ids.size:
                xy = cy.xy[ids] - pc[:2]
                r = cy.radius[ids]
                packed = _f32(np.stack([xy[:, 0], xy[:, 1], (xy ** 2).sum(1) - r ** 2,
                                        cy.z0[ids] - pc[2], cy.z1[ids] - pc[2]], axis=1))
                sq = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]], dtype=np.float64)
                ring = cy.xy[ids, None, :] + sq[None] * r[:, None, None]
                pts = np.concatenate([np.concatenate([ring, cy.z0[ids, None, None].repeat(4, 1)], 2),
                                      np.concatenate([ring, cy.z1[ids, None, None].repeat(4, 1)], 2)], 1)
                out.append((_cylinders_along_dir(s), packed, proj_bounds(pts)))
        e = self.prims.ellipsoids
        if len(e):
            rmax = e.radii.max(axis=1)
            keep = ((e.center[:, 2] + e.radii[:, 2] > zmin_pts)
                    & np.all((e.center[:, :2] + rmax[:, None] >= pmin[:2])
                             & (e.center[:, :2] - rmax[:, None] <= pmax[:2]), axis=1))
            ids = np.flatnonzero(keep)
            if ids.size:
                ctr = e.center[ids] - pc
                inv_r2 = 1.0 / e.radii[ids] ** 2
                packed = _f32(np.concatenate([ctr, inv_r2, (s[None] * inv_r2),
                                              ((s ** 2)[None] * inv_r2).sum(1, keepdims=True)], axis=1))
                uvc = ctr @ basis
                rr = rmax[ids, None]
                out.append((_ellipsoids_along_dir(s), packed, (uvc - rr, uvc + rr)))
        return out

    # -- surface attributes ---------------------------------------------------------------------

    def surface(self, origin: np.ndarray, dirs: np.ndarray, hits: Hits) -> Surface:
        """Attributes at every hit of a ``cast`` from ``origin`` along ``dirs``."""
        o = np.asarray(origin, dtype=np.float64)
        ray = np.flatnonzero(hits.hit)
        m = ray.size
        point = o + np.asarray(dirs, dtype=np.float64)[ray] * hits.t[ray, None].astype(np.float64)
        normal = np.zeros((m, 3), dtype=np.float32)
        raw = np.zeros(m, dtype=np.uint32)
        albedo = np.zeros((m, 3), dtype=np.float32)
        refl = np.zeros(m, dtype=np.float32)
        tex = np.zeros(m, dtype=np.int16)
        var = np.zeros(m, dtype=np.float32)
        u = np.zeros(m, dtype=np.float32)
        height = np.zeros(m, dtype=np.float32)
        top = np.zeros(m, dtype=np.float32)
        kind = hits.kind[ray]
        idx = hits.index[ray]

        def fill_mat(sel: np.ndarray, mat: Material, i: np.ndarray) -> None:
            raw[sel], albedo[sel], refl[sel] = mat.raw[i], mat.albedo[i], mat.refl[i]
            tex[sel], var[sel] = mat.tex[i], mat.var[i]

        g = np.flatnonzero(kind == KIND_GROUND)
        if g.size:
            normal[g] = (0.0, 0.0, 1.0)
            raw[g], albedo[g], refl[g], tex[g] = self.ground.classify(point[g, :2])
            u[g] = point[g, 0]
        sel = np.flatnonzero(kind == KIND_BOX)
        if sel.size:
            b, i = self.prims.boxes, idx[sel]
            c, s = np.cos(b.yaw[i]), np.sin(b.yaw[i])
            rel = point[sel] - b.center[i]
            pl = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], 1)
            axis = np.argmax(np.abs(pl) / b.half[i], axis=1)  # the face the point lies on
            sign = np.sign(pl[np.arange(sel.size), axis])
            nl = np.zeros((sel.size, 3))
            nl[np.arange(sel.size), axis] = sign
            normal[sel] = np.stack([c * nl[:, 0] - s * nl[:, 1], s * nl[:, 0] + c * nl[:, 1], nl[:, 2]], 1)
            u[sel] = np.where(axis == 0, pl[:, 1], pl[:, 0])
            height[sel] = pl[:, 2] + b.half[i, 2]
            top[sel] = 2 * b.half[i, 2]
            fill_mat(sel, b.mat, i)
        sel = np.flatnonzero(kind == KIND_CYLINDER)
        if sel.size:
            cy, i = self.prims.cylinders, idx[sel]
            rel = point[sel, :2] - cy.xy[i]
            on_top = point[sel, 2] >= cy.z1[i] - 1e-3
            rn = rel / np.maximum(np.hypot(rel[:, 0], rel[:, 1]), 1e-9)[:, None]
            normal[sel] = np.where(on_top[:, None], [0.0, 0.0, 1.0],
                                   np.concatenate([rn, np.zeros((sel.size, 1))], 1))
            u[sel] = np.arctan2(rel[:, 1], rel[:, 0]) * cy.radius[i]
            height[sel] = point[sel, 2] - cy.z0[i]
            top[sel] = cy.z1[i] - cy.z0[i]
            fill_mat(sel, cy.mat, i)
        sel = np.flatnonzero(kind == KIND_ELLIPSOID)
        if sel.size:
            e, i = self.prims.ellipsoids, idx[sel]
            rel = point[sel] - e.center[i]
            n = rel / e.radii[i] ** 2
            normal[sel] = n / np.linalg.norm(n, axis=1, keepdims=True)
            u[sel] = np.arctan2(rel[:, 1], rel[:, 0]) * e.radii[i, 0]
            height[sel] = rel[:, 2] + e.radii[i, 2]
            top[sel] = 2 * e.radii[i, 2]
            fill_mat(sel, e.mat, i)
        # Normals face the viewer (thin boxes are seen from both sides).
        d = _f32(dirs)[ray]
        flip = (normal * d).sum(1) > 0
        normal[flip] *= -1
        return Surface(ray, point, normal, raw, albedo, refl, tex, var, u, height, top, kind)


# ------------------------------------------------------------------------------------ kernels
# Each kernel returns (n, p) float32 hit distances (inf: miss) for n rays x p primitives.


def _boxes_from_origin(d: np.ndarray, pk: np.ndarray) -> np.ndarray:
    """Slab test. d (n, 3) unit directions; pk (p, 8): cos, sin, slab numerators x-, x+, y-, y+,
    z-, z+ (the shared origin's offsets to each face, in the box frame)."""
    dx = d[:, :2] @ np.stack([pk[:, 0], pk[:, 1]])  # (n, p): d . box x axis
    dy = d[:, 1:2] * pk[None, :, 0] - d[:, 0:1] * pk[None, :, 1]
    inv = 1.0 / dx
    t1, t2 = pk[None, :, 2] * inv, pk[None, :, 3] * inv
    tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
    inv = 1.0 / dy
    t1, t2 = pk[None, :, 4] * inv, pk[None, :, 5] * inv
    np.maximum(tn, np.minimum(t1, t2), out=tn)
    np.minimum(tf, np.maximum(t1, t2), out=tf)
    iz = 1.0 / d[:, 2:3]
    t1, t2 = pk[None, :, 6] * iz, pk[None, :, 7] * iz
    np.maximum(tn, np.minimum(t1, t2), out=tn)
    np.minimum(tf, np.maximum(t1, t2), out=tf)
    return np.where((tn <= tf) & (tn > T_MIN), tn, np.float32(np.inf))


def _cylinders_from_origin(d: np.ndarray, pk: np.ndarray) -> np.ndarray:
    """Side and top cap of vertical cylinders. pk (p, 6): origin x, y relative to the axis,
    |rel|^2 - r^2, z0 - oz, z1 - oz, r^2."""
    a = (d[:, 0] ** 2 + d[:, 1] ** 2)[:, None]  # (n, 1)
    hb = d[:, :2] @ pk[:, :2].T  # (n, p): half of the quadratic's b
    c = pk[None, :, 2]
    disc = hb * hb - a * c
    t = (-hb - np.sqrt(np.maximum(disc, 0))) / a
    z = t * d[:, 2:3]
    side = (disc >= 0) & (c > 0) & (z >= pk[None, :, 3]) & (z <= pk[None, :, 4]) & (t > T_MIN)
    # Top cap: seen from above only (bottoms stand on the ground).
    tc = pk[None, :, 4] / d[:, 2:3]
    x = pk[None, :, 0] + tc * d[:, 0:1]
    y = pk[None, :, 1] + tc * d[:, 1:2]
    cap = (tc > T_MIN) & (x * x + y * y <= pk[None, :, 5]) & (pk[None, :, 4] < 0)
    return np.where(side, t, np.where(cap, tc, np.float32(np.inf)))


def _ellipsoids_from_origin(d: np.ndarray, pk: np.ndarray) -> np.ndarray:
    """pk (p, 7): origin in unit-sphere space divided by radii (3), 1 / radii^2 (3), |o'|^2 - 1."""
    hb = d @ pk[:, 0:3].T  # (n, p)
    a = (d * d) @ pk[:, 3:6].T
    c = pk[None, :, 6]
    disc = hb * hb - a * c
    t = (-hb - np.sqrt(np.maximum(disc, 0))) / a
    return np.where((disc >= 0) & (t > T_MIN), t, np.float32(np.inf))


def _boxes_along_dir(s: np.ndarray):
    def fn(p: np.ndarray, pk: np.ndarray, max_dist: float) -> np.ndarray:
        """Slab test of rays from points p (n, 3) along the shared direction. pk (q, 15): the
        matmul columns (3 x 3: the point's box-frame coordinate on each axis times 1 / direction
        on that axis), then the slab bounds (-h + c) / dir and (h + c) / dir per axis (c: the box
        centre in the box frame). Returns (n,) any hit."""
        q = pk.shape[0]
        qi = p @ pk[:, :9].reshape(q, 3, 3).transpose(1, 2, 0).reshape(3, 3 * q)  # (n, 3q)
        k1 = pk[:, 9:12].T.reshape(1, 3 * q)
        k2 = pk[:, 12:15].T.reshape(1, 3 * q)
        t1, t2 = k1 - qi, k2 - qi
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        tn = np.maximum(np.maximum(lo[:, :q], lo[:, q:2 * q]), lo[:, 2 * q:])
        tf = np.minimum(np.minimum(hi[:, :q], hi[:, q:2 * q]), hi[:, 2 * q:])
        return ((tn <= tf) & (tf > T_MIN) & (tn < max_dist)).any(axis=1)
    return fn


def _cylinders_along_dir(s: np.ndarray):
    sxy = _f32(s[:2])
    a = max(float(sxy @ sxy), 1e-9)  # a sun at the zenith would make the 2-D test degenerate
    sz = float(s[2])

    def fn(p: np.ndarray, pk: np.ndarray, max_dist: float) -> np.ndarray:
        """pk (q, 5): axis x, y, |axis|^2 - r^2, z0, z1 (relative to the points' centre)."""
        # rel = p_xy - axis: hb = rel . s_xy ; c = |rel|^2 - r^2, expanded into matmuls.
        hb = (p[:, :2] @ sxy)[:, None] - pk[None, :, :2] @ sxy
        c = (p[:, :2] ** 2).sum(1, keepdims=True) - 2 * (p[:, :2] @ pk[:, :2].T) + pk[None, :, 2]
        disc = hb * hb - a * c
        sq = np.sqrt(np.maximum(disc, 0))
        t0, t1 = (-hb - sq) / a, (-hb + sq) / a
        z0, z1 = p[:, 2:3] + t0 * sz, p[:, 2:3] + t1 * sz
        # The ray is inside the infinite cylinder for t in [t0, t1]; its z-range overlaps the cylinder's.
        ok = (disc > 0) & (t1 > T_MIN) & (t0 < max_dist)
        ok &= (np.maximum(z0, z1) >= pk[None, :, 3]) & (np.minimum(z0, z1) <= pk[None, :, 4])
        return ok.any(axis=1)
    return fn


def _ellipsoids_along_dir(s: np.ndarray):
    def fn(p: np.ndarray, pk: np.ndarray, max_dist: float) -> np.ndarray:
        """pk (q, 10): centre (3), 1 / r^2 (3), s / r^2 (3), sum s^2 / r^2."""
        # rel = p - c ; hb = sum rel s / r^2 ; c = sum rel^2 / r^2 - 1, expanded into matmuls.
        hb = p @ pk[:, 6:9].T - (pk[:, 0:3] * pk[:, 6:9]).sum(1)[None]
        cc = ((p * p) @ pk[:, 3:6].T - 2 * (p @ (pk[:, 0:3] * pk[:, 3:6]).T)
              + (pk[:, 0:3] ** 2 * pk[:, 3:6]).sum(1)[None] - 1.0)
        a = pk[None, :, 9]
        disc = hb * hb - a * cc
        t1 = (-hb + np.sqrt(np.maximum(disc, 0))) / a
        t0 = (-hb - np.sqrt(np.maximum(disc, 0))) / a
        return ((disc > 0) & (t1 > T_MIN) & (t0 < max_dist)).any(axis=1)
    return fn
