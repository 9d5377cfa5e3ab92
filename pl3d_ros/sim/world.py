"""A procedural street world, generated from a seed along the ego vehicle's drive.

The street runs along +x (straight, or gently curving: the centreline is y = A sin(2 pi x / L + phi)
with A of a few metres and L of hundreds). Road coordinates are (s, d): s the x of the centreline
point, d the signed lateral offset (left positive, metres). Across the street, from the centreline
out on each side: driving lanes (right-hand traffic: lanes with d < 0 run towards +x), an optional
parking strip, a curb and a raised sidewalk, a grass strip (setback) and buildings, with trees,
hedges, fences, poles and signs in between; parked cars and trucks in the parking strips, moving
cars in the lanes, pedestrians on the sidewalks, cyclists at the lane edges.

Everything is an analytic primitive of ``sim/raycast.py``: the ground plane classifies each point
by its road coordinates (road, lane marking, parking, terrain); sidewalks, buildings, fences,
hedges, sign plates and vehicles are boxes; trunks, poles and people are vertical cylinders;
crowns and heads are ellipsoids. Labels are raw SemanticKITTI ids, so ``labels.ClassSet`` maps them
like real data; things (vehicles, people, bikes) carry an instance id in the upper 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pl3d_ros.sim.raycast import (TEX_ASPHALT, TEX_BARK, TEX_BUILDING, TEX_COBBLE, TEX_FENCE,
                                  TEX_FOLIAGE, TEX_GLASS, TEX_GRASS, TEX_MARKING, TEX_PAVING,
                                  TEX_PLAIN, Boxes, Cylinders, Ellipsoids, Material, PrimSet, Scene)

# Raw SemanticKITTI semantic ids (config/semantic-kitti.yaml of the dataset).
UNLABELED, OUTLIER = 0, 1
CAR, BICYCLE, TRUCK = 10, 11, 18
PERSON, BICYCLIST = 30, 31
ROAD, PARKING, SIDEWALK = 40, 44, 48
BUILDING, FENCE = 50, 51
LANE_MARKING = 60
VEGETATION, TRUNK, TERRAIN = 70, 71, 72
POLE, TRAFFIC_SIGN, OTHER_OBJECT = 80, 81, 99

RGB = tuple[float, float, float]

#: Camera albedos (sRGB, [0, 1]) and LiDAR reflectivities of the stuff classes. Reflectivities are
#: typical of a 905 nm sensor: dark asphalt low, paint and leaves high, retro-reflective signs highest.
GROUND_STYLE: dict[int, tuple[RGB, float, int]] = {
    ROAD: ((0.30, 0.30, 0.31), 0.12, TEX_ASPHALT),
    LANE_MARKING: ((0.88, 0.88, 0.84), 0.55, TEX_MARKING),
    PARKING: ((0.40, 0.36, 0.33), 0.18, TEX_COBBLE),
    TERRAIN: ((0.33, 0.44, 0.19), 0.40, TEX_GRASS),
}

DAY_BUILDINGS: tuple[RGB, ...] = (
    (0.78, 0.71, 0.58), (0.60, 0.32, 0.24), (0.62, 0.62, 0.60), (0.86, 0.84, 0.78),
    (0.85, 0.74, 0.50), (0.52, 0.42, 0.33), (0.70, 0.55, 0.45))
DAY_CARS: tuple[RGB, ...] = (
    (0.75, 0.76, 0.78), (0.92, 0.92, 0.90), (0.08, 0.08, 0.09), (0.62, 0.08, 0.07),
    (0.12, 0.22, 0.52), (0.35, 0.36, 0.38), (0.55, 0.55, 0.50))


@dataclass(frozen=True)
class WorldConfig:
    """What the procedural street looks like. Ranges are (low, high) of uniform draws; lengths
    in metres, speeds in m/s, densities per 100 m of street and side."""

    lanes: int = 2  # total driving lanes, half each way
    lane_width: float = 3.5
    parking_width: float = 2.3  # 0: no parking strips
    parking_prob: float = 0.8  # chance that a side has a parking strip
    sidewalk_width: tuple[float, float] = (2.0, 3.5)
    curb_height: float = 0.15
    curve_amplitude: tuple[float, float] = (0.0, 4.0)
    curve_wavelength: float = 350.0
    building_setback: tuple[float, float] = (0.5, 7.0)
    building_length: tuple[float, float] = (8.0, 28.0)
    building_depth: tuple[float, float] = (8.0, 18.0)
    building_height: tuple[float, float] = (5.0, 20.0)
    building_gap_prob: float = 0.3
    building_colors: tuple[RGB, ...] = DAY_BUILDINGS
    car_colors: tuple[RGB, ...] = DAY_CARS
    foliage_color: RGB = (0.22, 0.38, 0.12)
    tree_spacing: float = 8.0  # mean spacing of trees along a side (0: none)
    sidewalk_tree_prob: float = 0.5  # trees in sidewalk pits where there is no grass strip
    crown_radius: tuple[float, float] = (1.2, 2.8)
    hedge_prob: float = 0.35
    bushes_per_100m: float = 4.0  # per side, in grass strips and open lots
    fence_prob: float = 0.5
    pole_spacing: float = 30.0
    sign_spacing: float = 45.0
    bins_per_100m: float = 1.5
    parked_fill: float = 0.6  # share of parking slots taken
    truck_share: float = 0.08
    moving_cars_per_100m: float = 1.5  # per direction
    pedestrians_per_100m: float = 4.0  # per side
    cyclists_per_100m: float = 0.8
    parked_bikes_per_100m: float = 1.0
    ego_speed: tuple[float, float] = (6.0, 10.0)
    lead_car_prob: float = 0.7


@dataclass(frozen=True)
class Road:
    """Cross-section and centreline of the street. ``parking`` and ``sidewalk`` are
    (right, left) widths in metres (d < 0 is the right side)."""

    lanes: int = 2
    lane_width: float = 3.5
    parking: tuple[float, float] = (2.3, 2.3)
    sidewalk: tuple[float, float] = (2.5, 2.5)
    curb_height: float = 0.15
    amplitude: float = 0.0
    wavelength: float = 350.0
    phase: float = 0.0
    marking_width: float = 0.15
    dash_length: float = 3.0
    dash_period: float = 9.0

    @property
    def half_width(self) -> float:
        """Half width of the driving lanes, metres."""
        return self.lanes * self.lane_width / 2.0

    def curb(self, side: int) -> float:
        """|d| of the curb on ``side`` (-1 right, +1 left)."""
        return self.half_width + self.parking[0 if side < 0 else 1]

    def sidewalk_outer(self, side: int) -> float:
        return self.curb(side) + self.sidewalk[0 if side < 0 else 1]

    def center_y(self, s: np.ndarray) -> np.ndarray:
        return self.amplitude * np.sin(2 * np.pi * np.asarray(s) / self.wavelength + self.phase)

    def heading(self, s: np.ndarray) -> np.ndarray:
        """Yaw of the centreline at s, radians."""
        k = 2 * np.pi / self.wavelength
        return np.arctan(self.amplitude * k * np.cos(k * np.asarray(s) + self.phase))

    def to_world(self, s, d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Road (s, d) -> world x, y and the road's yaw there."""
        s, d = np.asarray(s, dtype=np.float64), np.asarray(d, dtype=np.float64)
        th = self.heading(s)
        return s - d * np.sin(th), self.center_y(s) + d * np.cos(th), th

    def to_road(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World (x, y) -> road (s, d); two Newton-like steps, exact to millimetres for the
        gentle curves generated here."""
        s = np.asarray(x, dtype=np.float64).copy()
        for _ in range(2):
            th = self.heading(s)
            ex, ey = x - s, y - self.center_y(s)
            s = s + (ex * np.cos(th) + ey * np.sin(th)) * np.cos(th)
        th = self.heading(s)
        d = -(x - s) * np.sin(th) + (y - self.center_y(s)) * np.cos(th)
        return s, d


@dataclass
class RoadGround:
    """The ground plane of a street: its class from the road coordinates of each point."""

    road: Road
    z: float = 0.0
    style: dict[int, tuple[RGB, float, int]] = field(default_factory=lambda: dict(GROUND_STYLE))

    def classify(self, xy: np.ndarray):
        """(M, 2) world xy -> raw (M,) uint32, albedo (M, 3), refl (M,), tex (M,) int16."""
        r = self.road
        s, d = r.to_road(xy[:, 0], xy[:, 1])
        hw, half_mark = r.half_width, r.marking_width / 2
        raw = np.full(s.shape, TERRAIN, dtype=np.uint32)
        on_road = np.abs(d) <= hw
        raw[on_road] = ROAD
        parking_w = np.where(d < 0, r.parking[0], r.parking[1])
        raw[(np.abs(d) > hw) & (np.abs(d) <= hw + parking_w)] = PARKING
        # Lane lines: between lanes (dashed; the centre line of a 4+ lane road solid) and a solid
        # edge line just inside each edge of the driving lanes.
        k = np.clip(np.round((d + hw) / r.lane_width), 1, max(r.lanes - 1, 1))
        near_line = (np.abs(d - (k * r.lane_width - hw)) < half_mark) & (r.lanes > 1)
        dash_on = (s % r.dash_period) < r.dash_length
        solid = (k == r.lanes // 2) & (r.lanes >= 4)
        edge = np.abs(np.abs(d) - (hw - 2 * half_mark)) < half_mark
        raw[on_road & ((near_line & (dash_on | solid)) | edge)] = LANE_MARKING
        albedo = np.zeros((s.size, 3), dtype=np.float32)
        refl = np.zeros(s.size, dtype=np.float32)
        tex = np.zeros(s.size, dtype=np.int16)
        for cls, (color, rf, tx) in self.style.items():
            m = raw == cls
            albedo[m], refl[m], tex[m] = color, rf, tx
        return raw, albedo, refl, tex


# ------------------------------------------------------------------------------------ templates
# Object templates in their own frame: x forward, y left, z up from the ground contact, metres.


def _mat(n: int, raw: int, albedo, refl: float, tex: int, var: float, inst: int) -> Material:
    return Material.make(n, raw | (inst << 16), albedo, refl, tex, var)


def car_template(rng: np.random.Generator, color: RGB, inst: int) -> PrimSet:
    """Body, glass cabin and two wheel blocks (the wheels of each axle as one dark box)."""
    L, W = rng.uniform(3.9, 4.7), rng.uniform(1.7, 1.9)
    cab_h = rng.uniform(0.45, 0.55)
    var = rng.random()
    boxes = Boxes.concat([
        Boxes.make([0, 0, 0.3 + 0.33], [L, W, 0.66], 0.0, _mat(1, CAR, color, 0.35, TEX_PLAIN, var, inst)),
        Boxes.make([-0.08 * L, 0, 0.96 + cab_h / 2], [0.52 * L, W - 0.12, cab_h], 0.0,
                   _mat(1, CAR, color, 0.08, TEX_GLASS, var, inst)),
        Boxes.make([[L / 2 - 0.8, 0, 0.31], [-L / 2 + 0.85, 0, 0.31]], [0.62, W + 0.02, 0.62], 0.0,
                   _mat(2, CAR, (0.06, 0.06, 0.06), 0.1, TEX_PLAIN, var, inst)),
    ])
    return PrimSet(boxes=boxes)


def truck_template(rng: np.random.Generator, color: RGB, inst: int) -> PrimSet:
    """Cab, cargo box and wheel blocks; about 8 m long and 3.6 m tall."""
    cargo_L = rng.uniform(5.0, 7.0)
    W = 2.45
    var = rng.random()
    cargo_color = (0.85, 0.85, 0.83) if rng.random() < 0.6 else color
    boxes = Boxes.concat([
        Boxes.make([cargo_L / 2 + 1.1, 0, 1.75], [2.2, W - 0.1, 2.5], 0.0,
                   _mat(1, TRUCK, color, 0.35, TEX_PLAIN, var, inst)),
        Boxes.make([0, 0, 0.95 + 1.35], [cargo_L, W, 2.7], 0.0,
                   _mat(1, TRUCK, cargo_color, 0.4, TEX_PLAIN, var, inst)),
        Boxes.make([[cargo_L / 2 + 1.1, 0, 0.5], [-cargo_L / 2 + 1.2, 0, 0.5]], [1.0, W + 0.02, 1.0],
                   0.0, _mat(2, TRUCK, (0.06, 0.06, 0.06), 0.1, TEX_PLAIN, var, inst)),
    ])
    return PrimSet(boxes=boxes)


def pedestrian_template(rng: np.random.Generator, inst: int) -> PrimSet:
    """Body cylinder (legs and torso) and a spherical head."""
    h = rng.uniform(1.55, 1.9)
    cloth = tuple(rng.uniform(0.05, 0.8, 3))
    skin = (0.80, 0.62, 0.50) if rng.random() < 0.6 else (0.45, 0.32, 0.24)
    var = rng.random()
    cyl = Cylinders.make([[0.0, 0.0]], 0.0, h - 0.24, rng.uniform(0.17, 0.24),
                         _mat(1, PERSON, cloth, 0.3, TEX_PLAIN, var, inst))
    head = Ellipsoids.make([[0.0, 0.0, h - 0.12]], 0.115, _mat(1, PERSON, skin, 0.3, TEX_PLAIN, var, inst))
    return PrimSet(cylinders=cyl, ellipsoids=head)


def bicycle_template(rng: np.random.Generator, inst: int, raw: int = BICYCLE) -> PrimSet:
    """A bicycle as one thin box (frame and wheels seen side-on)."""
    color = tuple(rng.uniform(0.05, 0.8, 3))
    return PrimSet(boxes=Boxes.make([0.0, 0.0, 0.5], [1.7, 0.12, 1.0], 0.0,
                                    _mat(1, raw, color, 0.3, TEX_PLAIN, rng.random(), inst)))


def cyclist_template(rng: np.random.Generator, inst: int) -> PrimSet:
    """A bicycle and its rider (rider: bicyclist, raw 31; bicycle: bicycle, raw 11)."""
    bike = bicycle_template(rng, inst)
    cloth = tuple(rng.uniform(0.05, 0.8, 3))
    var = rng.random()
    rider = Cylinders.make([[-0.15, 0.0]], 0.75, 1.55, 0.2,
                           _mat(1, BICYCLIST, cloth, 0.3, TEX_PLAIN, var, inst))
    head = Ellipsoids.make([[-0.05, 0.0, 1.68]], 0.115,
                           _mat(1, BICYCLIST, (0.2, 0.2, 0.22), 0.3, TEX_PLAIN, var, inst))
    return PrimSet.concat([bike, PrimSet(cylinders=rider, ellipsoids=head)])


def _place(parts: list[PrimSet], poses: list[tuple[float, float, float, float]]) -> PrimSet:
    """Concatenate templates, each moved to its pose (x, y, z, yaw)."""
    if not parts:
        return PrimSet()
    merged = PrimSet.concat(parts)
    xyz, yaw = {}, {}
    for name in ("boxes", "cylinders", "ellipsoids"):
        counts = [len(getattr(p, name)) for p in parts]
        pose = np.repeat(np.asarray(poses, dtype=np.float64), counts, axis=0).reshape(-1, 4)
        xyz[name], yaw[name] = pose[:, :3], pose[:, 3]
    return merged.transformed(xyz, yaw)


# ------------------------------------------------------------------------------------ world


@dataclass
class Agents:
    """Objects that move along the road: their template primitives in their own frames, which
    agent owns each primitive, and per agent the road coordinates and speed.

    s0 (A,) road s at t = 0, d (A,) lateral offset, speed (A,) m/s along +s (negative: towards
    -x), yaw (A,) extra yaw relative to the road (pi for oncoming traffic), z (A,) base height.
    """

    parts: PrimSet = field(default_factory=PrimSet)
    owner: dict[str, np.ndarray] = field(
        default_factory=lambda: {k: np.zeros(0, dtype=np.int64)
                                 for k in ("boxes", "cylinders", "ellipsoids")})
    s0: np.ndarray = field(default_factory=lambda: np.zeros(0))
    d: np.ndarray = field(default_factory=lambda: np.zeros(0))
    speed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    yaw: np.ndarray = field(default_factory=lambda: np.zeros(0))
    z: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def at(self, road: Road, t: float) -> PrimSet:
        """The agents' primitives in world coordinates at time t (seconds)."""
        if self.s0.size == 0:
            return PrimSet()
        x, y, th = road.to_world(self.s0 + self.speed * t, self.d)
        pose = np.stack([x, y, self.z, th + self.yaw], axis=1)
        xyz = {k: pose[v, :3] for k, v in self.owner.items()}
        yaw = {k: pose[v, 3] for k, v in self.owner.items()}
        return self.parts.transformed(xyz, yaw)


@dataclass
class EgoPath:
    """The ego vehicle drives at constant ``speed`` (m/s) along the lane at lateral offset ``d``."""

    s0: float = 0.0
    d: float = -1.75
    speed: float = 8.0

    def pose(self, road: Road, t: float) -> np.ndarray:
        """(4, 4) world <- vehicle base (x forward, y left, z up, on the ground) at time t."""
        x, y, th = road.to_world(self.s0 + self.speed * t, self.d)
        T = np.eye(4)
        c, s = np.cos(float(th)), np.sin(float(th))
        T[:2, :2] = [[c, -s], [s, c]]
        T[:2, 3] = float(x), float(y)
        return T


@dataclass
class World:
    """A generated street: static primitives, agents, the ego's path, and its ground."""

    road: Road
    static: PrimSet
    agents: Agents
    ego: EgoPath
    ground: RoadGround
    config: WorldConfig
    seed: int = 0

    def scene_at(self, t: float) -> Scene:
        """Everything at time t (seconds) as one ray-castable Scene."""
        return Scene(PrimSet.concat([self.static, self.agents.at(self.road, t)]), self.ground)

    def ego_pose(self, t: float) -> np.ndarray:
        """(4, 4) world <- vehicle base at time t."""
        return self.ego.pose(self.road, t)


def generate_world(config: WorldConfig, seed: int, duration_s: float, *,
                   behind_m: float = 150.0, ahead_m: float = 250.0) -> World:
    """A street for a drive of ``duration_s`` seconds, reaching ``behind_m`` metres behind the
    start and ``ahead_m`` beyond the end (the camera sees far down the street)."""
    rng = np.random.default_rng(seed)
    c = config
    if c.lanes < 2 or c.lanes % 2:
        raise ValueError(f"lanes must be even and >= 2, got {c.lanes}")
    sides = (-1, 1)
    parking = tuple(c.parking_width if (c.parking_width > 0 and rng.random() < c.parking_prob) else 0.0
                    for _ in sides)
    sidewalk = tuple(float(rng.uniform(*c.sidewalk_width)) for _ in sides)
    road = Road(lanes=c.lanes, lane_width=c.lane_width, parking=parking, sidewalk=sidewalk,
                curb_height=c.curb_height, amplitude=float(rng.uniform(*c.curve_amplitude)),
                wavelength=c.curve_wavelength, phase=float(rng.uniform(0, 2 * np.pi)))
    speed = float(rng.uniform(*c.ego_speed))
    ego = EgoPath(0.0, -c.lane_width / 2, speed)
    s_lo, s_hi = -behind_m, speed * duration_s + ahead_m
    gen = _Generator(rng, c, road, s_lo, s_hi)
    for side in sides:
        gen.sidewalk(side)
        gen.buildings(side)
        gen.street_furniture(side)
        gen.parked(side)
        gen.pedestrians(side)
    gen.traffic(ego, duration_s)
    static = PrimSet.concat(gen.static)
    return World(road, static, gen.agents(), ego, RoadGround(road), config, seed)


class _Generator:
    """The generation steps; each appends primitives (Python loops over objects, not rays)."""

    def __init__(self, rng: np.random.Generator, c: WorldConfig, road: Road, s_lo: float, s_hi: float):
        self.rng, self.c, self.road, self.s_lo, self.s_hi = rng, c, road, s_lo, s_hi
        self.static: list[PrimSet] = []
        self.inst = 0
        self._agent_parts: list[PrimSet] = []
        self._agent_rows: list[tuple[float, float, float, float, float]] = []
        # Per side: (s_start, s_end, setback) of the frontage, for trees in the grass strips.
        self.frontage: dict[int, list[tuple[float, float, float]]] = {-1: [], 1: []}

    def next_inst(self) -> int:
        self.inst += 1
        return self.inst

    def _box(self, s, d, z, size, raw, color, refl, tex, yaw_off=0.0, var=None) -> None:
        """Boxes at road coordinates (s, d) (arrays), base z, size (N, 3), aligned with the road."""
        s, d = np.atleast_1d(np.asarray(s, dtype=np.float64)), np.atleast_1d(np.asarray(d, dtype=np.float64))
        x, y, th = self.road.to_world(s, d)
        size = np.broadcast_to(np.asarray(size, dtype=np.float64), (s.size, 3))
        center = np.stack([x, y, np.broadcast_to(z, s.shape) + size[:, 2] / 2], axis=1)
        var = self.rng.random(s.size) if var is None else var
        self.static.append(PrimSet(boxes=Boxes.make(center, size, th + yaw_off,
                                                    Material.make(s.size, raw, color, refl, tex, var))))

    # -- static ------------------------------------------------------------------------------------

    def sidewalk(self, side: int) -> None:
        """Raised sidewalk slabs in 8 m segments (short enough to follow the curve)."""
        r = self.road
        seg = 8.0
        s = np.arange(self.s_lo, self.s_hi, seg) + seg / 2
        w = r.sidewalk[0 if side < 0 else 1]
        self._box(s, side * (r.curb(side) + w / 2), 0.0, [seg + 0.05, w, r.curb_height], SIDEWALK,
                  (0.62, 0.60, 0.57), 0.25, TEX_PAVING)

    def buildings(self, side: int) -> None:
        rng, c, r = self.rng, self.c, self.road
        front0 = r.sidewalk_outer(side)
        s = self.s_lo - rng.uniform(0, 10)
        while s < self.s_hi:
            if rng.random() < c.building_gap_prob:
                gap = rng.uniform(4.0, 14.0)
                self.frontage[side].append((s, s + gap, 10.0))
                self.gap_fill(side, s, s + gap, front0)
                s += gap
                continue
            L = rng.uniform(*c.building_length)
            setback = rng.uniform(*c.building_setback)
            depth = rng.uniform(*c.building_depth)
            height = rng.uniform(*c.building_height)
            color = np.asarray(c.building_colors[rng.integers(len(c.building_colors))])
            color = np.clip(color * rng.uniform(0.85, 1.1), 0, 1)
            self._box(s + L / 2, side * (front0 + setback + depth / 2), 0.0, [L, depth, height],
                      BUILDING, color, rng.uniform(0.25, 0.45), TEX_BUILDING)
            self.frontage[side].append((s, s + L, setback))
            if setback > 2.0 and rng.random() < c.hedge_prob:
                self._box(s + L / 2, side * (front0 + 0.6), 0.0, [L * rng.uniform(0.5, 0.95),
                          rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.5)], VEGETATION,
                          c.foliage_color, 0.45, TEX_FOLIAGE)
            s += L + rng.uniform(0.0, 0.6)

    def gap_fill(self, side: int, s0: float, s1: float, front0: float) -> None:
        """An open lot between buildings: grass, often fenced, sometimes a hedge."""
        rng, c = self.rng, self.c
        if rng.random() < c.fence_prob:
            h = rng.uniform(1.0, 1.8)
            gray = rng.uniform(0.25, 0.6)
            self._box((s0 + s1) / 2, side * (front0 + 0.3), 0.0, [s1 - s0, 0.05, h], FENCE,
                      (gray, gray, gray * 0.95), 0.3, TEX_FENCE)
        elif rng.random() < c.hedge_prob * 2:
            self._box((s0 + s1) / 2, side * (front0 + 0.8), 0.0, [s1 - s0, 0.9, rng.uniform(0.9, 1.6)],
                      VEGETATION, c.foliage_color, 0.45, TEX_FOLIAGE)

    def tree(self, s: float, d: float, street: bool = False) -> None:
        """A trunk and a crown at road coordinates (s, d). Street trees (sidewalk pits) have tall
        trunks and smaller crowns: their crowns reach over the lanes, above traffic."""
        rng, c = self.rng, self.c
        x, y, _ = self.road.to_world(s, d)
        trunk_h = rng.uniform(3.5, 4.5) if street else rng.uniform(1.8, 3.5)
        r_xy = rng.uniform(c.crown_radius[0], min(c.crown_radius[1], 2.2) if street else c.crown_radius[1])
        r_z = r_xy * rng.uniform(0.9, 1.4)
        var = rng.random()
        bark = (0.30, 0.22, 0.15)
        self.static.append(PrimSet(
            cylinders=Cylinders.make([[x, y]], 0.0, trunk_h + 0.5 * r_z, rng.uniform(0.1, 0.25),
                                     Material.make(1, TRUNK, bark, 0.35, TEX_BARK, var)),
            ellipsoids=Ellipsoids.make(
                [[x, y, trunk_h + r_z * 0.8]], [r_xy, r_xy * rng.uniform(0.85, 1.15), r_z],
                Material.make(1, VEGETATION, c.foliage_color, 0.45, TEX_FOLIAGE, var))))

    def street_furniture(self, side: int) -> None:
        """Trees (grass strips and sidewalk pits), light poles, signs, bins."""
        rng, c, r = self.rng, self.c, self.road
        curb = r.curb(side)
        w = r.sidewalk[0 if side < 0 else 1]
        if c.tree_spacing > 0:
            s = self.s_lo + rng.uniform(0, c.tree_spacing)
            while s < self.s_hi:
                setback = next((sb for a, b, sb in self.frontage[side] if a <= s < b), 0.0)
                if setback >= 3.0:
                    strip = min(setback, 8.0) * rng.uniform(0.35, 0.65)
                    self.tree(s, side * (r.sidewalk_outer(side) + strip))
                elif w >= 2.0 and rng.random() < c.sidewalk_tree_prob:
                    self.tree(s, side * (curb + 0.7), street=True)
                s += c.tree_spacing * rng.uniform(0.6, 1.4)
        # Bushes: low crowns on the ground, wherever there is grass.
        n = rng.poisson(c.bushes_per_100m * (self.s_hi - self.s_lo) / 100)
        rows = []
        for s in rng.uniform(self.s_lo, self.s_hi, n):
            setback = next((sb for a, b, sb in self.frontage[side] if a <= s < b), 0.0)
            if setback >= 1.5:
                rows.append((s, side * (r.sidewalk_outer(side) + rng.uniform(0.7, min(setback, 8.0) - 0.7))))
        if rows:
            s, d = np.asarray(rows).T
            x, y, _ = r.to_world(s, d)
            rxy = rng.uniform(0.5, 1.3, s.size)
            rz = rxy * rng.uniform(0.6, 0.9, s.size)
            self.static.append(PrimSet(ellipsoids=Ellipsoids.make(
                np.stack([x, y, rz * 0.8], 1), np.stack([rxy, rxy, rz], 1),
                Material.make(s.size, VEGETATION, c.foliage_color, 0.45, TEX_FOLIAGE, rng.random(s.size)))))
        # Light poles: a tall mast with an arm over the road.
        s = np.arange(self.s_lo + rng.uniform(0, c.pole_spacing), self.s_hi, c.pole_spacing)
        if s.size:
            x, y, th = r.to_world(s, side * (curb + 0.35))
            h = rng.uniform(7.0, 9.0, s.size)
            self.static.append(PrimSet(cylinders=Cylinders.make(
                np.stack([x, y], 1), 0.0, h, 0.12, Material.make(s.size, POLE, (0.45, 0.46, 0.48), 0.4))))
            self._box(s, side * (curb - 0.5), h - 0.15, [0.15, 1.7, 0.15], POLE, (0.45, 0.46, 0.48),
                      0.4, TEX_PLAIN)
        # Signs: a thin post and a plate facing the traffic.
        s = np.arange(self.s_lo + rng.uniform(0, c.sign_spacing), self.s_hi, c.sign_spacing)
        if s.size:
            x, y, th = r.to_world(s, side * (curb + 0.3))
            top = rng.uniform(2.2, 2.8, s.size)
            self.static.append(PrimSet(cylinders=Cylinders.make(
                np.stack([x, y], 1), 0.0, top, 0.04, Material.make(s.size, POLE, (0.55, 0.55, 0.55), 0.4))))
            colors = np.array([(0.75, 0.1, 0.1), (0.1, 0.25, 0.7), (0.9, 0.9, 0.9), (0.9, 0.75, 0.1)])
            self._box(s, side * (curb + 0.3), top, [0.04, 0.6, 0.6], TRAFFIC_SIGN,
                      colors[rng.integers(len(colors), size=s.size)], 0.9, TEX_PLAIN)
        # Bins and boxes on the sidewalk: other objects.
        n = rng.poisson(c.bins_per_100m * (self.s_hi - self.s_lo) / 100)
        if n:
            s = rng.uniform(self.s_lo, self.s_hi, n)
            self._box(s, side * (curb + w - 0.5), r.curb_height, [0.6, 0.6, 1.0], OTHER_OBJECT,
                      (0.2, 0.35, 0.2), 0.3, TEX_PLAIN)
        n = rng.poisson(c.parked_bikes_per_100m * (self.s_hi - self.s_lo) / 100)
        parts, poses = [], []
        for s in rng.uniform(self.s_lo, self.s_hi, n):
            x, y, th = r.to_world(s, side * (curb + w - 0.4))
            parts.append(bicycle_template(rng, self.next_inst()))
            poses.append((float(x), float(y), r.curb_height, float(th)))
        self.static.append(_place(parts, poses))

    def parked(self, side: int) -> None:
        """Cars (and some trucks) in the parking strip."""
        rng, c, r = self.rng, self.c, self.road
        pw = r.parking[0 if side < 0 else 1]
        if pw <= 0:
            return
        parts, poses = [], []
        s = self.s_lo + rng.uniform(0, 6)
        while s < self.s_hi:
            truck = rng.random() < c.truck_share
            slot = 9.5 if truck else rng.uniform(5.6, 6.6)
            if rng.random() < c.parked_fill:
                x, y, th = r.to_world(s + slot / 2, side * (r.half_width + pw / 2 + rng.uniform(-0.15, 0.15)))
                color = c.car_colors[rng.integers(len(c.car_colors))]
                inst = self.next_inst()
                parts.append(truck_template(rng, color, inst) if truck else car_template(rng, color, inst))
                yaw = float(th) + (np.pi if rng.random() < 0.2 else 0.0) + rng.normal(0, 0.02)
                poses.append((float(x), float(y), 0.0, yaw))
            s += slot
        self.static.append(_place(parts, poses))

    # -- agents ------------------------------------------------------------------------------------

    def _agent(self, parts: PrimSet, s0: float, d: float, speed: float, yaw: float, z: float) -> None:
        self._agent_parts.append(parts)
        self._agent_rows.append((s0, d, speed, yaw, z))

    def pedestrians(self, side: int) -> None:
        rng, c, r = self.rng, self.c, self.road
        n = rng.poisson(c.pedestrians_per_100m * (self.s_hi - self.s_lo) / 100)
        w = r.sidewalk[0 if side < 0 else 1]
        for _ in range(n):
            speed = 0.0 if rng.random() < 0.3 else rng.uniform(0.8, 1.6) * rng.choice([-1, 1])
            self._agent(pedestrian_template(rng, self.next_inst()), rng.uniform(self.s_lo, self.s_hi),
                        side * (r.curb(side) + rng.uniform(0.4, max(w - 0.4, 0.5))), speed,
                        0.0 if speed >= 0 else np.pi, r.curb_height)

    def traffic(self, ego: EgoPath, duration_s: float) -> None:
        """Moving cars in every lane, a lead car ahead of the ego, cyclists at lane edges."""
        rng, c, r = self.rng, self.c, self.road
        length = self.s_hi - self.s_lo
        half = r.lanes // 2
        colors = c.car_colors
        if rng.random() < c.lead_car_prob:
            # Same lane and speed as the ego: a constant gap, so the two never collide.
            self._agent(car_template(rng, colors[rng.integers(len(colors))], self.next_inst()),
                        ego.s0 + rng.uniform(12.0, 30.0), ego.d, ego.speed, 0.0, 0.0)
        for k in range(half):
            for direction in (1, -1):
                d = -direction * (k + 0.5) * r.lane_width
                if direction == 1 and k == 0:
                    continue  # the ego's lane: only the lead car, whose speed matches
                n = rng.poisson(c.moving_cars_per_100m * length / 100)
                for _ in range(n):
                    v = direction * rng.uniform(7.0, 13.0)
                    truck = rng.random() < c.truck_share
                    color = colors[rng.integers(len(colors))]
                    inst = self.next_inst()
                    tpl = truck_template(rng, color, inst) if truck else car_template(rng, color, inst)
                    self._agent(tpl, rng.uniform(self.s_lo, self.s_hi), d, v,
                                0.0 if direction > 0 else np.pi, 0.0)
        # Cyclists ride at the outer edge of the outer lanes, never in the ego's lane (2-lane roads
        # put them on the oncoming side only).
        n = rng.poisson(c.cyclists_per_100m * length / 100)
        for _ in range(n):
            direction = -1 if half == 1 else int(rng.choice([-1, 1]))
            d = -direction * (r.half_width - 0.5)  # clear of cars at the lane centres
            self._agent(cyclist_template(rng, self.next_inst()), rng.uniform(self.s_lo, self.s_hi), d,
                        direction * rng.uniform(3.0, 6.0), 0.0 if direction > 0 else np.pi, 0.0)

    def agents(self) -> Agents:
        if not self._agent_parts:
            return Agents()
        owner = {k: np.repeat(np.arange(len(self._agent_parts)),
                              [len(getattr(p, k)) for p in self._agent_parts])
                 for k in ("boxes", "cylinders", "ellipsoids")}
        rows = np.asarray(self._agent_rows, dtype=np.float64)
        return Agents(PrimSet.concat(self._agent_parts), owner, rows[:, 0], rows[:, 1], rows[:, 2],
                      rows[:, 3], rows[:, 4])

