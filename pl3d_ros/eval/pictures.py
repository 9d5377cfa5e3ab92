"""Pictures of the segmentation itself: what the node labels, seen without ROS or RViz.

Three pictures per chosen frame, each an RGB uint8 array (numpy; Pillow only to draw text and
save PNGs, so nothing touches matplotlib's global state):

- ``camera_overlay``: the frame's image, dimmed and desaturated so the class colours stand out,
  with every in-view point drawn in its predicted class colour, beside (or above, for wide
  images) the same with the ground-truth colours; a legend strip of the class colours.
- ``bev``: a bird's-eye view of the whole labelled cloud (x forward is up, y left is left, the
  LiDAR at the centre, a fixed +-40 m extent with a 10 m grid), coloured by prediction, beside
  ground truth, with the camera's horizontal field of view outlined.
- ``error_view``: the camera overlay and the bird's-eye view again, with correct points grey,
  wrong points red and points without a ground-truth class in a neutral slate colour. Both forms:
  the overlay shows the errors against what the camera saw (2D-branch failures, boundaries), the
  bird's-eye view shows the ~85 % of a KITTI scan the camera never sees, where only the 3D
  branch labels.

Points are squares of (2 r + 1)^2 pixels. Where squares overlap, the point nearest the camera
(overlay) or the highest point (bird's-eye view) wins, as an eye would see it; the winner of each
pixel is found with ``np.minimum.at`` over the points' draw ranks, which is exact for repeated
indices (a plain fancy assignment does not define which of the repeated writes lands).

``PictureSampler`` chooses a few frames of a stream (first, middle, last; deterministic) and
writes ``pictures/frame_<seq>_{camera,bev,errors}.png``, holding at most four frames.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pl3d_ros.frame import CameraModel, Frame
from pl3d_ros.geometry import project_points
from pl3d_ros.labels import IGNORE_COLOR, ClassSet

MAX_WIDTH = 1600  # px: a picture stays viewable on a screen and in a report page
BEV_EXTENT_M = 40.0  # half-width of the bird's-eye view, metres
BEV_GRID_M = 10.0
BEV_SIZE_PX = 640  # one bird's-eye panel: 0.125 m per pixel at +-40 m
BACKGROUND = (24, 24, 24)
GRID_COLOR = (62, 62, 62)
TEXT_COLOR = (235, 235, 235)
FOV_COLOR = (255, 255, 255)
CORRECT_COLOR = (150, 150, 150)
WRONG_COLOR = (235, 30, 30)
UNLABELLED_COLOR = (60, 95, 130)  # ground truth has no class here: neither right nor wrong
GAP_PX = 6  # between panels
TITLE_PX = 22  # the title bar above each panel
PICTURE_KINDS = ("camera", "bev", "errors")


class Labelled(Protocol):
    """What the pictures need of a prediction: (N,) uint8 train ids and the (N,) bool in-view mask
    (a ``frame.Prediction`` has both)."""

    labels: np.ndarray
    in_view: np.ndarray


@dataclass(frozen=True)
class PredictedLabels:
    """A prediction reduced to what a picture needs, so that holding one for later does not hold
    its probabilities and network inputs."""

    labels: np.ndarray
    in_view: np.ndarray


# ----------------------------------------------------------------------------- drawing helpers

@lru_cache(maxsize=8)
def _font(size: int):
    """DejaVu Sans from matplotlib's data (a dependency already), Pillow's bitmap font otherwise."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _text(canvas: np.ndarray, items: Sequence[tuple[tuple[int, int], str]], size: int = 13,
          color: tuple[int, int, int] = TEXT_COLOR) -> np.ndarray:
    """``canvas`` (H, W, 3) uint8 with each (x, y) -> text drawn (top-left anchored), as a new array."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for xy, text in items:
        draw.text(xy, text, fill=color, font=_font(size))
    return np.asarray(img)


def _text_width(text: str, size: int = 13) -> int:
    from PIL import Image, ImageDraw

    return int(np.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=_font(size))))


@dataclass(frozen=True)
class Raster:
    """Which point shows at which pixel of an (h, w) canvas: ``pixels`` (K,) flat pixel indices,
    ``points`` (K,) the index of the point that shows there. Computed once per frame and view,
    then painted in the prediction's, the ground truth's and the errors' colours."""

    shape: tuple[int, int]
    pixels: np.ndarray
    points: np.ndarray

    def paint(self, canvas: np.ndarray, colors: np.ndarray) -> np.ndarray:
        """A copy of ``canvas`` (h, w, 3) uint8 with each pixel in its point's colour from
        ``colors`` ((N, 3) uint8, indexed like the points rasterized)."""
        out = canvas.copy()
        out.reshape(-1, 3)[self.pixels] = colors[self.points]
        return out


def rasterize(rows: np.ndarray, cols: np.ndarray, rank: np.ndarray, shape: tuple[int, int], radius: int = 1,
              keep: np.ndarray | None = None) -> Raster:
    """Points as (2 radius + 1)^2 pixel squares on an (h, w) canvas.

    rows, cols: (N,) int pixel of each point's centre (any value; squares are clipped to the
    canvas). rank: (N,) draw priority, lower wins where squares overlap (depth in metres for a
    camera view); ties go to the earlier point. keep: (N,) bool, the points to draw (all if None).
    """
    h, w = shape
    ph, pw = h + 2 * radius, w + 2 * radius  # a grid padded so that every centre touching the canvas is on it
    r = rows.astype(np.int64) + radius
    c = cols.astype(np.int64) + radius
    on = (r >= 0) & (r < ph) & (c >= 0) & (c < pw)
    idx = np.flatnonzero(on if keep is None else on & keep)
    m = idx.size
    if m == 0:
        return Raster(shape, np.zeros(0, np.int64), np.zeros(0, np.int64))
    order = np.argsort(rank[idx], kind="stable")  # place p: the p-th best of the points drawn
    place = np.empty(m, np.int64)
    place[order] = np.arange(m)
    # Points sharing a centre pixel draw the same square, so only the best of each can win any
    # pixel: keep one per centre first (a KITTI bird's-eye view: several times fewer squares).
    best = np.full(ph * pw, m, np.int64)
    np.minimum.at(best, r[idx] * pw + c[idx], place)  # exact for repeated indices, unlike best[i] = p
    wp = best[best < m]
    pts = idx[order[wp]]
    off = np.arange(-radius, radius + 1)
    dy, dx = (a.ravel() for a in np.meshgrid(off, off, indexing="ij"))
    rr = rows[pts].astype(np.int64)[:, None] + dy[None]
    cc = cols[pts].astype(np.int64)[:, None] + dx[None]
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    top = np.full(h * w, m, np.int64)
    np.minimum.at(top, (rr * w + cc)[inside], np.broadcast_to(wp[:, None], rr.shape)[inside])
    hit = np.flatnonzero(top < m)
    return Raster(shape, hit, idx[order[top[hit]]])


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` (H, W, 3) under a TITLE_PX high bar holding ``title``."""
    bar = np.full((TITLE_PX, panel.shape[1], 3), BACKGROUND, np.uint8)
    return np.concatenate([_text(bar, [((4, 3), title)], TITLE_PX - 9), panel])


def _stack(panels: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Panels side by side (axis 1, top-aligned) or one above the other (axis 0, centred) on a
    background canvas, GAP_PX apart."""
    other = 1 - axis
    shape = [0, 0, 3]
    shape[axis] = sum(p.shape[axis] for p in panels) + GAP_PX * (len(panels) - 1)
    shape[other] = max(p.shape[other] for p in panels)
    out = np.full(shape, BACKGROUND, np.uint8)
    pos = 0
    for p in panels:
        if axis == 0:
            x0 = (shape[1] - p.shape[1]) // 2
            out[pos:pos + p.shape[0], x0:x0 + p.shape[1]] = p
        else:
            out[:p.shape[0], pos:pos + p.shape[1]] = p
        pos += p.shape[axis] + GAP_PX
    return out


def arrange(panels: Sequence[np.ndarray], max_width: int = MAX_WIDTH) -> np.ndarray:
    """Side by side when that fits in ``max_width`` pixels, else one above the other."""
    width = sum(p.shape[1] for p in panels) + GAP_PX * (len(panels) - 1)
    return _stack(panels, 1 if width <= max_width else 0)


def legend_strip(entries: Sequence[tuple[str, Sequence[int]]], width: int, size: int = 12) -> np.ndarray:
    """(h, width, 3) uint8: a colour swatch and a name per entry, wrapped into as many rows as needed."""
    sw, pad, row_h = size, 6, size + 8
    x, y, places = pad, 4, []
    for name, color in entries:
        w = sw + 4 + _text_width(name, size) + 3 * pad
        if x + w > width and x > pad:
            x, y = pad, y + row_h
        places.append((x, y, name, color))
        x += w
    strip = np.full((y + row_h, width, 3), BACKGROUND, np.uint8)
    for x, y, _, color in places:
        strip[y + 1:y + 1 + sw, x:x + sw] = color
    return _text(strip, [((x + sw + 4, y), name) for x, y, name, _ in places], size)


def class_legend(class_set: ClassSet, unlabelled: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, RGB) of every class, plus the colour of points without a class."""
    entries = [(n, tuple(int(c) for c in class_set.colors[i])) for i, n in enumerate(class_set.names)]
    return entries + ([("no class (ground truth)", IGNORE_COLOR)] if unlabelled else [])


def error_colors(pred_labels: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) predicted and (N,) ground-truth train ids -> (N, 3) uint8: CORRECT_COLOR where they
    agree, WRONG_COLOR where they differ, UNLABELLED_COLOR where gt is no class of the set
    (>= num_classes: the ignore index)."""
    gt = np.asarray(gt)
    out = np.where((np.asarray(pred_labels) == gt)[:, None], np.uint8(CORRECT_COLOR), np.uint8(WRONG_COLOR))
    out[gt >= num_classes] = UNLABELLED_COLOR
    return out.astype(np.uint8)


def _error_rate(pred_labels: np.ndarray, gt: np.ndarray, num_classes: int) -> str:
    """"x % of n labelled points wrong" over the points whose gt is a class (< num_classes)."""
    labelled = gt < num_classes
    n = int(labelled.sum())
    if n == 0:
        return "no labelled points"
    wrong = int((pred_labels[labelled] != gt[labelled]).sum())
    return f"{100.0 * wrong / n:.1f} % of {n:,} labelled points wrong"


# ----------------------------------------------------------------------------- camera overlay

def _camera_base(image: np.ndarray, max_width: int) -> tuple[np.ndarray, float]:
    """The image dimmed to 45 % and mostly desaturated (class colours stay readable over any
    scene), downscaled to ``max_width`` if wider; returns it and the scale applied."""
    scale = min(1.0, max_width / image.shape[1])
    if scale < 1.0:
        from PIL import Image

        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    img = image.astype(np.float32)
    gray = img @ np.float32([0.299, 0.587, 0.114])
    return (0.45 * (0.75 * gray[..., None] + 0.25 * img)).astype(np.uint8), scale


def fov_rays(camera: CameraModel) -> np.ndarray:
    """(2, 2) unit xy directions (LiDAR frame) of the camera's left and right horizontal field-of-view
    edges: the extreme azimuths of the image border's pixel rays under the pinhole model (lens
    distortion is ignored: an outline, not a mask). Rows are (x, y); NaN when the camera looks
    straight up or down."""
    u = np.linspace(-0.5, camera.width - 0.5, 9)  # pixel edges of the image border
    v = np.linspace(-0.5, camera.height - 0.5, 9)
    border = np.concatenate([np.stack([np.full(9, u[0]), v], 1), np.stack([np.full(9, u[-1]), v], 1),
                             np.stack([u, np.full(9, v[0])], 1), np.stack([u, np.full(9, v[-1])], 1)])
    rays = np.linalg.solve(camera.K, np.column_stack([border, np.ones(len(border))]).T).T
    R = camera.T_cam_lidar[:3, :3]
    xy = (rays @ R)[:, :2]  # R^T d: camera directions in the LiDAR frame
    if not np.all(np.linalg.norm(xy, axis=1) > 1e-6):
        return np.full((2, 2), np.nan)
    az = np.arctan2(xy[:, 1], xy[:, 0])
    axis = R.T @ [0.0, 0.0, 1.0]
    centre = np.arctan2(axis[1], axis[0])  # the optical axis' azimuth
    rel = np.angle(np.exp(1j * (az - centre)))  # unwrapped around the optical axis
    edges = centre + np.array([rel.max(), rel.min()])  # left (larger azimuth: +y) then right
    return np.stack([np.cos(edges), np.sin(edges)], 1)


@dataclass(frozen=True)
class PictureGeometry:
    """What every picture of one frame shares: the dimmed camera image, which in-view point shows
    at each of its pixels (nearest the camera on top), and which point shows at each pixel of
    the bird's-eye view (highest on top), with the view's grid, field of view and scale.

    The bird's-eye view covers [-extent_m, extent_m] metres on x and y in size_px pixels, x
    forward up and y left to the left, the LiDAR at the centre."""

    base: np.ndarray  # (h, w, 3) uint8
    camera: Raster
    bev: Raster
    bev_base: np.ndarray  # (size_px, size_px, 3) uint8: background and grid
    bev_overlay: tuple[Any, ...]  # (origin, fov ray ends, ego triangle, grid labels) in pixels
    in_view: int

    @classmethod
    def of(cls, frame: Frame, in_view: np.ndarray, *, radius: int = 1, max_width: int = MAX_WIDTH,
           extent_m: float = BEV_EXTENT_M, size_px: int = BEV_SIZE_PX) -> PictureGeometry:
        """in_view: (N,) bool, the points the prediction scored as in the camera's view.
        radius: half-size of a point's square in pixels (1: 3 x 3). Images wider than
        ``max_width`` pixels are downscaled."""
        base, scale = _camera_base(frame.image, max_width)
        proj = project_points(frame.points, frame.camera)
        view = in_view & np.isfinite(proj.uv).all(1)
        uv = (np.nan_to_num(proj.uv) + 0.5) * scale - 0.5  # pixel-centre convention of CameraModel.resized
        pix = np.floor(uv + 0.5).astype(np.int64)
        camera = rasterize(pix[:, 1], pix[:, 0], proj.depth, base.shape[:2], radius, keep=view)

        res = 2.0 * extent_m / size_px  # metres per pixel
        x, y, z = (frame.points[:, i].astype(np.float64) for i in range(3))
        rows = np.floor((extent_m - x) / res).astype(np.int64)  # x forward is up
        cols = np.floor((extent_m - y) / res).astype(np.int64)  # y left is left
        bev = rasterize(rows, cols, -z, (size_px, size_px), radius)  # highest point on top
        grid_base = np.full((size_px, size_px, 3), BACKGROUND, np.uint8)
        grid = np.arange(-extent_m, extent_m + 1e-9, BEV_GRID_M)
        lines = np.clip(np.round((extent_m - grid) / res).astype(int), 0, size_px - 1)
        grid_base[lines, :] = GRID_COLOR
        grid_base[:, lines] = GRID_COLOR

        c = size_px / 2.0
        cam_xy = np.linalg.inv(frame.camera.T_cam_lidar)[:2, 3]  # the camera's position in the LiDAR frame
        origin = (c - cam_xy[1] / res, c - cam_xy[0] / res)
        reach = 2.0 * size_px  # beyond the panel; Pillow clips the lines
        rays = [(origin[0] - dy * reach, origin[1] - dx * reach) for dx, dy in fov_rays(frame.camera) if np.isfinite(dx)]
        s = max(4.0, 1.6 / res)  # the ego marker: a triangle ~3 m long pointing forward
        ego = [(c, c - s), (c - 0.6 * s, c + 0.6 * s), (c + 0.6 * s, c + 0.6 * s)]
        labels = []
        for g, line in zip(grid, lines):
            if 0 < abs(g) < extent_m:  # the centre lines cross the ego marker, the outer ones the border
                labels += [((2, line - 12 if line > 12 else line + 1), f"x {g:+.0f} m"),
                           ((line + 2, size_px - 12), f"y {g:+.0f}")]
        return cls(base, camera, bev, grid_base, (origin, rays, ego, labels), int(view.sum()))


def _camera_panel(geom: PictureGeometry, colors: np.ndarray, title: str) -> np.ndarray:
    """The dimmed image with the in-view points in ``colors`` ((N, 3) uint8, all points), titled."""
    return _titled(geom.camera.paint(geom.base, colors), title)


def _bev_panel(geom: PictureGeometry, colors: np.ndarray, title: str) -> np.ndarray:
    """The bird's-eye view with the points in ``colors`` ((N, 3) uint8), the camera's field of
    view, the ego marker and the grid's labels, titled."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(geom.bev.paint(geom.bev_base, colors))
    draw = ImageDraw.Draw(img)
    origin, rays, ego, labels = geom.bev_overlay
    for end in rays:
        draw.line([origin, end], fill=FOV_COLOR, width=1)
    draw.polygon(ego, fill=FOV_COLOR)
    for xy, text in labels:
        draw.text(xy, text, fill=TEXT_COLOR, font=_font(10))
    return _titled(np.asarray(img), title)


def _with_legend(panels: Sequence[np.ndarray], entries: Sequence[tuple[str, Sequence[int]]],
                 max_width: int) -> np.ndarray:
    body = arrange(panels, max_width)
    return np.concatenate([body, legend_strip(entries, body.shape[1])])


def camera_overlay(frame: Frame, pred: Labelled, class_set: ClassSet, gt: np.ndarray | None = None, *,
                   geometry: PictureGeometry | None = None, max_width: int = MAX_WIDTH) -> np.ndarray:
    """(H', W', 3) uint8: in-view points in the predicted class colours over the dimmed camera
    image, beside the ground truth's colours when ``gt`` ((N,) train ids) is given, over a legend.
    Two panels go side by side when they fit in ``max_width`` pixels, else one above the other.
    geometry: the frame's ``PictureGeometry`` (computed with the defaults if None)."""
    geom = geometry or PictureGeometry.of(frame, pred.in_view, max_width=max_width)
    panels = [_camera_panel(geom, class_set.colorize(pred.labels),
                            f"prediction (fused), frame {frame.seq}, {geom.in_view:,} points in view")]
    if gt is not None:
        panels.append(_camera_panel(geom, class_set.colorize(gt), "ground truth"))
    return _with_legend(panels, class_legend(class_set, gt is not None), max_width)


def bev(frame: Frame, pred: Labelled, class_set: ClassSet, gt: np.ndarray | None = None, *,
        geometry: PictureGeometry | None = None, max_width: int = MAX_WIDTH) -> np.ndarray:
    """(H', W', 3) uint8 bird's-eye view of all points (not only those in view) in the predicted
    class colours, beside the ground truth's colours when ``gt`` ((N,) train ids) is given: the
    LiDAR at the centre, +-40 m, grid lines every 10 m, white lines the camera's field of view."""
    geom = geometry or PictureGeometry.of(frame, pred.in_view, max_width=max_width)
    title = f"bird's-eye view, prediction, {frame.num_points:,} points (grid {BEV_GRID_M:.0f} m)"
    panels = [_bev_panel(geom, class_set.colorize(pred.labels), title)]
    if gt is not None:
        panels.append(_bev_panel(geom, class_set.colorize(gt), "ground truth"))
    return _with_legend(panels, class_legend(class_set, gt is not None), max_width)


def error_view(frame: Frame, pred: Labelled, class_set: ClassSet, gt: np.ndarray, *,
               geometry: PictureGeometry | None = None, max_width: int = MAX_WIDTH) -> np.ndarray:
    """(H', W', 3) uint8: the camera overlay (in-view points) and the bird's-eye view (all points)
    with correct points grey, wrong ones red and points without a ground-truth class slate;
    ``gt``: (N,) train ids. The titles give the share of labelled points that are wrong."""
    geom = geometry or PictureGeometry.of(frame, pred.in_view, max_width=max_width)
    colors = error_colors(pred.labels, gt, class_set.num_classes)
    v = pred.in_view
    panels = [_camera_panel(geom, colors, f"errors in view: {_error_rate(pred.labels[v], gt[v], class_set.num_classes)}"),
              _bev_panel(geom, colors, f"errors, all points: {_error_rate(pred.labels, gt, class_set.num_classes)}")]
    entries = [("correct", CORRECT_COLOR), ("wrong", WRONG_COLOR), ("no class in ground truth", UNLABELLED_COLOR)]
    return _with_legend(panels, entries, max_width)


# ----------------------------------------------------------------------------- files

def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 RGB array as PNG (zlib level 1: the dimmed photo in the camera
    pictures compresses poorly at any level, and level 1 writes several times faster than 6)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, compress_level=1)
    return path


def write_frame_pictures(frame: Frame, pred: Labelled, class_set: ClassSet, gt: np.ndarray | None,
                         out_dir: str | Path, subdir: str = "pictures", stem: str = "") -> dict[str, Any]:
    """Draw and save one frame's pictures as OUT/pictures/<stem>_{camera,bev,errors}.png, stem
    frame_<seq> by default (no errors picture without ground truth). Returns {"seq", "files":
    {kind: path relative to out_dir}, "draw_ms": drawing + saving wall time}."""
    t0 = time.perf_counter()
    stem = stem or f"frame_{frame.seq:06d}"
    geom = PictureGeometry.of(frame, pred.in_view)
    images = {"camera": camera_overlay(frame, pred, class_set, gt, geometry=geom),
              "bev": bev(frame, pred, class_set, gt, geometry=geom)}
    if gt is not None:
        images["errors"] = error_view(frame, pred, class_set, gt, geometry=geom)
    files = {}
    for kind, img in images.items():
        rel = f"{subdir}/{stem}_{kind}.png"
        save_png(img, Path(out_dir) / rel)
        files[kind] = rel
    return {"seq": int(frame.seq), "files": files, "draw_ms": round((time.perf_counter() - t0) * 1e3, 1)}


def expected_count(lengths: Sequence[int | None], cap: int | None = None) -> int | None:
    """How many frames a stream of inputs of these lengths (None: unknown, e.g. a bag) will give,
    at most ``cap``; None when unknown."""
    total = None if None in lengths else sum(int(n) for n in lengths)  # type: ignore[arg-type]
    if cap is not None:
        return cap if total is None else min(total, cap)
    return total


@dataclass
class _Held:
    """A chosen frame until drawn; then only what was written (frame, pred and gt let go)."""

    index: int
    frame: Frame | None
    pred: PredictedLabels | None
    gt: np.ndarray | None
    drawn: dict[str, Any] | None = None


@dataclass
class PictureSampler:
    """Chooses the first, a middle and the last of the frames offered, deterministically, and
    writes their pictures into ``out_dir`` (see ``write_frame_pictures``).

    expected: how many frames will be offered, when known (a KITTI folder, --max-frames): the
    middle one is then frame (expected - 1) // 2. When unknown (a bag), the middle is the frame
    at a power-of-two position nearest the middle of what came (only the last two such
    candidates can win, so at most two are kept). The last frame offered is held until
    ``close``. draw_now: draw a chosen frame when it comes (lockstep); False holds it for
    ``close`` instead, so that drawing does not stall a realtime inference thread. Either way at
    most four frames are held, with none of their probabilities or network inputs.
    """

    out_dir: Path
    class_set: ClassSet
    expected: int | None = None
    draw_now: bool = True
    count: int = 0
    _kept: list[_Held] = field(default_factory=list)
    _last: _Held | None = None
    _stems: set[str] = field(default_factory=set)

    def _is_candidate(self, i: int) -> bool:
        if i == 0:
            return True
        if self.expected is not None:
            return i == (self.expected - 1) // 2
        return i & (i - 1) == 0  # 1, 2, 4, 8, ...

    def offer(self, frame: Frame, pred: Labelled, gt: np.ndarray | None) -> None:
        """One frame as it comes, with the prediction made for it and its (N,) train-id ground
        truth (None when unlabelled)."""
        held = _Held(self.count, frame, PredictedLabels(pred.labels, pred.in_view), gt)
        self.count += 1
        if self._is_candidate(held.index):
            if self.expected is None and held.index > 1:
                # of the earlier power-of-two candidates only index/2 can still be nearest the middle
                self._discard([k for k in self._kept if 0 < k.index < held.index // 2])
            if self.draw_now:
                self._draw(held)
            self._kept.append(held)
            self._last = None
        else:
            self._last = held

    def _draw(self, held: _Held) -> None:
        if held.drawn is None:
            assert held.frame is not None and held.pred is not None
            stem = f"frame_{held.frame.seq:06d}"
            if stem in self._stems:  # inputs evaluated one after another can repeat a seq (pl3d eval)
                stem += f"_{held.index}"
            self._stems.add(stem)
            held.drawn = write_frame_pictures(held.frame, held.pred, self.class_set, held.gt, self.out_dir,
                                              stem=stem)
            held.frame, held.pred, held.gt = None, None, None  # drawn: let the arrays go

    def _discard(self, items: list[_Held]) -> None:
        for k in items:
            self._kept.remove(k)
            for rel in (k.drawn or {}).get("files", {}).values():
                (Path(self.out_dir) / rel).unlink(missing_ok=True)

    def close(self) -> list[dict[str, Any]]:
        """Draw what is still held; returns, in stream order, per chosen frame {"seq", "role"
        (first | middle | last), "files", "draw_ms"}."""
        if self._last is not None:
            self._kept.append(self._last)
            self._last = None
        last = self.count - 1
        middles = [k for k in self._kept if 0 < k.index < last]
        if middles:
            best = min(middles, key=lambda k: (abs(k.index - last / 2), k.index))
            self._discard([k for k in middles if k is not best])
        out = []
        for k in sorted(self._kept, key=lambda k: k.index):
            self._draw(k)
            role = "first" if k.index == 0 else "last" if k.index == last else "middle"
            out.append({**k.drawn, "role": role})
        return out


def pictures_markdown(pictures: Sequence[dict[str, Any]], prefix: str = "") -> str:
    """A report section embedding the pictures (paths relative to the report, under ``prefix``)."""
    if not pictures:
        return ""
    lines = ["## Pictures", "",
             "Camera: in-view points in the predicted class colour over the dimmed image, beside ground "
             "truth. Bird's-eye view: every point, x forward up, LiDAR at the centre, +-40 m, 10 m grid, "
             "white lines the camera's field of view. Errors: grey correct, red wrong, slate no ground-truth "
             "class.", ""]
    for p in pictures:
        lines += [f"### Frame {p['seq']} ({p['role']})", ""]
        lines += [f"![frame {p['seq']} {kind}]({prefix}{rel})\n" for kind, rel in p["files"].items()]
    return "\n".join(lines)
