"""Bad input, as an adversarial user feeds it: every case is rejected with a clear error of the
project's own classes, or handled with nothing lost (whatever is dropped is counted).

Add a case by appending one line to ``CASES``:

    Case("<kind>/<what>", <kind>, <builder>, <ErrorClass or None>, "<regex the message matches>",
         check=<for handled cases: fn(result, logs) asserting nothing was lost>)

``kind`` picks the code under test (``RUNNERS``): ``cloud`` (point_cloud2.cloud_to_points),
``cloud_frame`` (cloud_to_points then Frame), ``image`` (image_to_rgb), ``camera_info``
(camera_model_from_info), ``frame`` (Frame(**kwargs)), ``tf`` (tf_message_transforms), ``bag``
(BagReader(path): all frames, then its stats), ``checkpoint`` (load_checkpoint(path)),
``config`` (Config.from_dict), ``config_yaml`` (Config.from_yaml(path)), ``training_config``
(TrainingConfig.from_dict) and ``replay`` (pl3d replay of (inputs, settings) with a tiny model,
metrics dict back). A builder
takes the case's ``Ctx`` (a temp directory, shared fixtures) and returns the input. The error
must be exactly what ``expect`` names (or a subclass): a bare ValueError / TypeError / numpy
error escaping is a failure. ``logs`` are the WARNING records of ``pl3d_ros`` loggers.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pl3d_ros.config import Config, ConfigError, TrainingConfig
from pl3d_ros.eval.replay import ReplayError
from pl3d_ros.frame import CameraModel, Frame, FrameError
from pl3d_ros.io import point_cloud2 as pc2
from pl3d_ros.io import ros_msgs as rm
from pl3d_ros.io.bag import BagError, BagReader, BagWriter
from pl3d_ros.io.msg_common import MessageError
from pl3d_ros.io.point_cloud2 import CloudError
from pl3d_ros.io.ros_msgs import ImageError
from pl3d_ros.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

NS = types.SimpleNamespace
F32, U8, U16, I16, U32 = 7, 2, 4, 3, 6
W, H = 8, 6
K = np.array([[5.0, 0, 3.5], [0, 5.0, 2.5], [0, 0, 1]])
CAM = CameraModel(K, W, H)


# ------------------------------------------------------------------------------------ builders

def fields(*specs: tuple[str, int, int, int]) -> list[NS]:
    return [NS(name=n, offset=o, datatype=d, count=c) for n, o, d, c in specs]


XYZI = fields(("x", 0, F32, 1), ("y", 4, F32, 1), ("z", 8, F32, 1), ("intensity", 12, F32, 1))


def points(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-20, 20, (n, 4)).astype(np.float32)


def cloud(pts: np.ndarray | None = None, **over: Any) -> NS:
    """A valid x y z intensity cloud (rclpy-like duck type); ``over`` replaces any attribute."""
    pts = points() if pts is None else np.asarray(pts, np.float32)
    base = dict(height=1, width=len(pts), fields=XYZI, is_bigendian=False, point_step=16,
                row_step=16 * len(pts), data=pts.tobytes(), is_dense=False)
    base.update(over)
    return NS(**base)


def with_values(**cols: Any) -> np.ndarray:
    """points() with some entries replaced: with_values(i3=np.nan) sets intensity of point 3."""
    pts = points()
    for key, value in cols.items():
        col, row = "xyzi".index(key[0]), int(key[1:])
        pts[row, col] = value
    return pts


def image(**over: Any) -> NS:
    rgb = np.arange(W * H * 3, dtype=np.uint8).reshape(H, W, 3)
    base = dict(height=H, width=W, encoding="rgb8", is_bigendian=0, step=W * 3, data=rgb.tobytes())
    base.update(over)
    return NS(**base)


def info(**over: Any) -> NS:
    base = dict(height=H, width=W, distortion_model="plumb_bob", d=np.zeros(5), k=K.reshape(-1),
                r=np.eye(3).reshape(-1), p=np.hstack([K, np.zeros((3, 1))]).reshape(-1),
                binning_x=0, binning_y=0, roi=NS(x_offset=0, y_offset=0, width=0, height=0),
                header=NS(frame_id="cam"))
    base.update(over)
    return NS(**base)


def frame_kwargs(**over: Any) -> dict[str, Any]:
    base = dict(stamp_ns=1, points=points(), image=np.zeros((H, W, 3), np.uint8), camera=CAM)
    base.update(over)
    return base


def tf(t=(0.0, 0.0, 0.0), q=(0.0, 0.0, 0.0, 1.0)) -> NS:
    return NS(transforms=[NS(header=NS(stamp=NS(sec=1, nanosec=0), frame_id="cam"),
                             child_frame_id="lidar",
                             transform=NS(translation=NS(x=t[0], y=t[1], z=t[2]),
                                          rotation=NS(x=q[0], y=q[1], z=q[2], w=q[3])))])


@dataclass
class Ctx:
    tmp: Path

    def bag(self, name: str = "bag", frames: int = 6, *, big: bool = True, tf_static: bool = True,
            image_size: tuple[int, int] = (W, H), info: bool = True, cloud_fn=None) -> Path:
        """A bag through BagWriter. ``big``: 60k-point clouds and 256x192 images, so each cloud
        lies in its own MCAP chunk (rosbags closes a chunk past 1 MiB)."""
        path = self.tmp / name
        rng = np.random.default_rng(1)
        n, (iw, ih) = (60_000, (256, 192)) if big else (50, image_size)
        cam = CAM.resized(iw, ih) if big else CAM  # image_size != (W, H): they disagree
        with BagWriter(path) as w:
            f = w.factory
            if tf_static:
                w.write_static_transform(10**9, "lidar", "cam", np.eye(4))
            for i in range(frames):
                ns = (100 + i) * 10**8
                hdr_c, hdr_l = rm.make_header(f, ns, "cam"), rm.make_header(f, ns, "lidar")
                w.write("/camera/image_raw", rm.make_image(f, hdr_c, np.full((ih, iw, 3), i, np.uint8)), ns)
                if info:
                    w.write("/camera/camera_info", rm.make_camera_info(f, hdr_c, cam), ns)
                pts = rng.uniform(1, 30, (n, 4)).astype(np.float32)
                arr = pc2.points_cloud_array(pts, {"label": np.full(n, i, np.uint32)})
                msg = rm.make_cloud(f, hdr_l, arr) if cloud_fn is None else cloud_fn(f, hdr_l, arr, i)
                w.write("/lidar/points", msg, ns)
        return path

    def checkpoint(self, name: str = "m.safetensors") -> Path:
        from fakes import header, small_model

        return save_checkpoint(self.tmp / name, small_model(), header())


def mcap_of(bag: Path) -> Path:
    return next(bag.glob("*.mcap"))


def flip_chunk(bag: Path, ordinal: int, *, zero_crc: bool = False, bad_length: bool = False) -> Path:
    from pl3d_ros.io.mcap_chunks import McapChunkReader

    mcap = mcap_of(bag)
    with McapChunkReader(mcap) as r:
        start = r.chunks[ordinal].chunk_start_offset
    data = bytearray(mcap.read_bytes())
    content = start + 9
    if zero_crc:
        struct.pack_into("<I", data, content + 24, 0)
    if bad_length:
        (n,) = struct.unpack_from("<I", data, content + 28)
        struct.pack_into("<Q", data, content + 32 + n + 8 + 1, 2**40)
    else:
        for i in range(content + 2000, content + 2200):
            data[i] ^= 0xFF
    mcap.write_bytes(bytes(data))
    return bag


def cloud_chunks(bag: Path) -> list[int]:
    from pl3d_ros.io.mcap_chunks import McapChunkReader

    with McapChunkReader(mcap_of(bag)) as r:
        return [ck.ordinal for ck in r.chunks
                if any(r.channels[c].topic == "/lidar/points" for c, _ in r.indexed_messages(ck))]


def pickle_bomb(path: Path) -> Path:
    """A pickle that would create ``path.marker`` when unpickled (it must never be)."""
    marker = path.with_suffix(".marker")

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path.write_bytes(pickle.dumps({"state_dict": Bomb()}))
    return path


def safetensors_with(path: Path, metadata: dict[str, str] | None) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


def ckpt_header(ctx: Ctx, edit: Callable[[dict], None]) -> Path:
    """A real checkpoint whose JSON header is edited by ``edit``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = ctx.checkpoint("src.safetensors")
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["pl3d"])
    edit(header)
    out = ctx.tmp / "edited.safetensors"
    save_file(tensors, str(out), metadata={"pl3d": json.dumps(header)})
    return out


# ------------------------------------------------------------------------------------ checks

def all_frames_accounted(result: tuple[list[Frame], Any], frames: int = 6, **expect: int) -> None:
    got, stats = result
    assert len(got) + stats.frames_skipped == frames, (len(got), stats.skipped_frames)
    for reason, n in expect.items():
        assert stats.skipped_frames[reason] == n, stats.skipped_frames


def kept(n: int, **counts: int) -> Callable[[Any, list], None]:
    def check(fr: Frame, logs: list) -> None:
        assert fr.num_points == n
        for name, value in counts.items():
            assert getattr(fr, name) == value, (name, getattr(fr, name))
    return check


# ------------------------------------------------------------------------------------ the cases

@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    build: Callable[[Ctx], Any]
    expect: type[Exception] | None
    match: str = ""
    check: Callable[[Any, list], None] | None = None


P = points()
CASES = [
    # PointCloud2
    Case("cloud/field-count-2^31", "cloud", lambda c: cloud(fields=fields(("x", 0, U8, 2**31), ("y", 4, F32, 1), ("z", 8, F32, 1)), point_step=2**32 - 1, row_step=2**32 - 1, width=1), CloudError, "count 2147483648"),
    Case("cloud/field-count-2^31-empty-cloud", "cloud", lambda c: cloud(np.zeros((0, 4)), fields=fields(("x", 0, U8, 2**31), ("y", 4, F32, 1), ("z", 8, F32, 1))), CloudError, "count"),
    Case("cloud/field-count-2^32-1", "cloud", lambda c: cloud(fields=fields(("x", 0, U8, 2**32 - 1), ("y", 4, F32, 1), ("z", 8, F32, 1))), CloudError, "count"),
    Case("cloud/width-smaller-than-data", "cloud", lambda c: cloud(width=3, row_step=48), CloudError, "more than height \\* row_step"),
    Case("cloud/height-smaller-than-data", "cloud", lambda c: cloud(points(8), height=1, width=4, row_step=64), CloudError, "more than"),
    Case("cloud/data-truncated", "cloud", lambda c: cloud(data=P.tobytes()[:-1]), CloudError, "truncated"),
    Case("cloud/2^31-point-memory-bomb", "cloud", lambda c: cloud(width=2**31, row_step=16 * 2**31), CloudError, "truncated"),
    Case("cloud/row-step-too-small", "cloud", lambda c: cloud(row_step=40), CloudError, "row_step 40 is smaller"),
    Case("cloud/point-step-zero", "cloud", lambda c: cloud(point_step=0), CloudError, "point_step is 0"),
    Case("cloud/field-beyond-point-step", "cloud", lambda c: cloud(fields=fields(("x", 0, F32, 1), ("y", 4, F32, 1), ("z", 14, F32, 1))), CloudError, "beyond point_step 16"),
    Case("cloud/negative-offset", "cloud", lambda c: cloud(fields=fields(("x", -4, F32, 1), ("y", 4, F32, 1), ("z", 8, F32, 1))), CloudError, "negative offset"),
    Case("cloud/unknown-datatype", "cloud", lambda c: cloud(fields=fields(("x", 0, 9, 1), ("y", 4, F32, 1), ("z", 8, F32, 1))), CloudError, "unknown PointField datatype 9"),
    Case("cloud/duplicate-field", "cloud", lambda c: cloud(fields=fields(("x", 0, F32, 1), ("x", 4, F32, 1), ("z", 8, F32, 1))), CloudError, "appears twice"),
    Case("cloud/no-z", "cloud", lambda c: cloud(fields=fields(("x", 0, F32, 1), ("y", 4, F32, 1), ("intensity", 12, F32, 1))), CloudError, "no z field"),
    Case("cloud/multi-count-x", "cloud", lambda c: cloud(fields=fields(("x", 0, F32, 2), ("y", 8, F32, 1), ("z", 12, F32, 1))), CloudError, "'x' has count 2"),
    Case("cloud/big-endian", "cloud", lambda c: cloud(data=P.astype(">f4").tobytes(), is_bigendian=True), None, check=lambda r, logs: np.testing.assert_array_equal(r[0], P)),
    Case("cloud/int16-xyz", "cloud", lambda c: cloud(fields=fields(("x", 0, I16, 1), ("y", 2, I16, 1), ("z", 4, I16, 1)), point_step=6, row_step=12, width=2, data=np.array([1, 2, 3, -4, 5, -6], "<i2").tobytes()), None, check=lambda r, logs: np.testing.assert_array_equal(r[0][:, :3], [[1, 2, 3], [-4, 5, -6]])),
    # PointCloud2 -> Frame: what is dropped is counted, geometry is never dropped for intensity
    Case("cloud_frame/nan-intensity-keeps-geometry", "cloud_frame", lambda c: cloud(with_values(i2=np.nan)), None, check=kept(5, zeroed_intensity=1, dropped_points=0)),
    Case("cloud_frame/all-intensities-nan", "cloud_frame", lambda c: cloud(np.c_[P[:, :3], np.full(5, np.nan)]), None, check=kept(5, zeroed_intensity=5)),
    Case("cloud_frame/inf-intensity", "cloud_frame", lambda c: cloud(with_values(i0=np.inf)), None, check=kept(5, zeroed_intensity=1)),
    Case("cloud_frame/point-at-3e38-m", "cloud_frame", lambda c: cloud(with_values(x1=3e38)), None, check=kept(4, dropped_far=1, dropped_points=1)),
    Case("cloud_frame/nan-x", "cloud_frame", lambda c: cloud(with_values(x4=np.nan)), None, check=kept(4, dropped_points=1, dropped_far=0)),
    Case("cloud_frame/all-points-nan", "cloud_frame", lambda c: cloud(np.full((5, 4), np.nan)), FrameError, "no usable points.*empty cloud"),
    Case("cloud_frame/all-points-far", "cloud_frame", lambda c: cloud(np.full((5, 4), 1e6)), FrameError, "5 beyond 1000 m"),
    Case("cloud_frame/zero-points", "cloud_frame", lambda c: cloud(np.zeros((0, 4))), FrameError, "empty cloud"),
    # Image
    Case("image/unknown-encoding", "image", lambda c: image(encoding="yuv422"), ImageError, "unsupported image encoding 'yuv422'"),
    Case("image/zero-size", "image", lambda c: image(width=0, step=0, data=b""), ImageError, "zero size"),
    Case("image/step-smaller-than-row", "image", lambda c: image(step=W * 3 - 1), ImageError, "step 23 is smaller"),
    Case("image/data-truncated", "image", lambda c: image(data=bytes(W * H * 3 - 1)), ImageError, "truncated"),
    Case("image/bgr8", "image", lambda c: image(encoding="bgr8"), None, check=lambda r, logs: np.testing.assert_array_equal(r, np.arange(W * H * 3, dtype=np.uint8).reshape(H, W, 3)[:, :, ::-1])),
    Case("image/padded-rows", "image", lambda c: image(step=W * 3 + 5, data=np.pad(np.arange(W * H * 3, dtype=np.uint8).reshape(H, W * 3), ((0, 0), (0, 5))).tobytes()), None, check=lambda r, logs: np.testing.assert_array_equal(r, np.arange(W * H * 3, dtype=np.uint8).reshape(H, W, 3))),
    # CameraInfo
    Case("camera_info/uncalibrated", "camera_info", lambda c: info(k=np.zeros(9)), FrameError, "camera not calibrated"),
    Case("camera_info/nan-in-k", "camera_info", lambda c: info(k=np.r_[np.nan, K.reshape(-1)[1:]]), FrameError, "NaN or inf"),
    Case("camera_info/k-8-values", "camera_info", lambda c: info(k=np.ones(8)), FrameError, "must have 9 values"),
    Case("camera_info/p-11-values", "camera_info", lambda c: info(p=np.ones(11)), FrameError, "must have 12 values"),
    Case("camera_info/r-not-a-rotation", "camera_info", lambda c: info(p=np.hstack([K, [[1.0], [0], [0]]]).reshape(-1), r=(2 * np.eye(3)).reshape(-1)), FrameError, "not rigid"),
    Case("camera_info/singular-p", "camera_info", lambda c: info(p=np.hstack([np.zeros((3, 3)), [[1.0], [0], [0]]]).reshape(-1)), FrameError, "singular"),
    Case("camera_info/unknown-distortion", "camera_info", lambda c: info(distortion_model="equidistant", d=np.ones(4)), FrameError, "unsupported distortion_model"),
    Case("camera_info/zero-width", "camera_info", lambda c: info(width=0), FrameError, "must be positive"),
    Case("camera_info/p-disagrees-with-k", "camera_info", lambda c: info(p=np.hstack([K * [[1.1], [1], [1]], np.zeros((3, 1))]).reshape(-1)), None, check=lambda r, logs: (_assert(np.array_equal(r.K, K)), _assert_logged(logs, "differs from K"))),
    # Frame
    Case("frame/points-n-by-3", "frame", lambda c: frame_kwargs(points=P[:, :3]), FrameError, r"\(N, 4\)"),
    Case("frame/integer-points", "frame", lambda c: frame_kwargs(points=P.astype(np.int32)), FrameError, "floating"),
    Case("frame/image-size-vs-camera", "frame", lambda c: frame_kwargs(image=np.zeros((H + 1, W, 3), np.uint8)), FrameError, "does not belong"),
    Case("frame/labels-shape", "frame", lambda c: frame_kwargs(labels=np.zeros(4, np.uint32)), FrameError, "labels must have shape"),
    Case("frame/float-labels", "frame", lambda c: frame_kwargs(labels=np.zeros(5, np.float32)), FrameError, "integer ids"),
    Case("frame/negative-stamp", "frame", lambda c: frame_kwargs(stamp_ns=-1), FrameError, "non-negative"),
    Case("camera_model/non-rigid-extrinsics", "camera_model", lambda c: dict(K=K, width=W, height=H, T_cam_lidar=np.diag([2.0, 1, 1, 1])), FrameError, "not rigid"),
    Case("camera_model/negative-focal-length", "camera_model", lambda c: dict(K=K * [[-1], [1], [1]], width=W, height=H), FrameError, "positive focal lengths"),
    # TF
    Case("tf/zero-quaternion", "tf", lambda c: tf(q=(0, 0, 0, 0)), MessageError, "is invalid"),
    Case("tf/nan-translation", "tf", lambda c: tf(t=(np.nan, 0, 0)), MessageError, "is invalid"),
    # Bags
    Case("bag/does-not-exist", "bag", lambda c: c.tmp / "nothing", BagError, "does not exist"),
    Case("bag/junk-mcap", "bag", lambda c: _write(c.tmp / "junk.mcap", b"\x89MCAP0\r\n" + bytes(range(256)) * 8), BagError, "cannot open"),
    Case("bag/truncated-mcap", "bag", lambda c: _truncate(mcap_of(c.bag(big=False))), BagError, "cannot open.*interrupted"),
    Case("bag/no-camera-info-topic", "bag", lambda c: c.bag(big=False, info=False), BagError, "no sensor_msgs/msg/CameraInfo topic"),
    Case("bag/no-extrinsics", "bag", lambda c: c.bag(big=False, tf_static=False), BagError, "no extrinsics"),
    Case("bag/flipped-bytes-in-a-cloud-chunk", "bag", lambda c: flip_chunk(b := c.bag(), cloud_chunks(b)[2]), None, check=lambda r, logs: all_frames_accounted(r, corrupt_chunk=1)),
    Case("bag/corrupt-record-without-crc", "bag", lambda c: flip_chunk(b := c.bag(), cloud_chunks(b)[3], zero_crc=True, bad_length=True), None, check=lambda r, logs: (all_frames_accounted(r), _assert(r[1].chunk_errors[0]["reason"] == "malformed"))),
    Case("bag/image-size-vs-camera-info", "bag", lambda c: c.bag(big=False, image_size=(W + 2, H)), None, check=lambda r, logs: all_frames_accounted(r, bad_frame=6)),
    Case("bag/cloud-with-count-2^31-field", "bag", lambda c: c.bag(big=False, cloud_fn=_poisoned_cloud), None, check=lambda r, logs: (all_frames_accounted(r, bad_frame=1), _assert("count" in next(s["detail"] for s in r[1].skip_log if s["reason"] == "bad_frame")))),
    # Checkpoints (never unpickled)
    Case("checkpoint/does-not-exist", "checkpoint", lambda c: c.tmp / "none.safetensors", CheckpointError, "does not exist"),
    Case("checkpoint/random-bytes", "checkpoint", lambda c: _write(c.tmp / "r.safetensors", bytes(range(256)) * 4), CheckpointError, "not a readable safetensors"),
    Case("checkpoint/truncated", "checkpoint", lambda c: _truncate(c.checkpoint()), CheckpointError, "not a readable safetensors|cannot read weights"),
    Case("checkpoint/pickle-payload", "checkpoint", lambda c: pickle_bomb(c.tmp / "bomb.safetensors"), CheckpointError, "not a readable safetensors", check=None),
    Case("checkpoint/plain-safetensors", "checkpoint", lambda c: safetensors_with(c.tmp / "plain.safetensors", None), CheckpointError, "no pl3d_ros header"),
    Case("checkpoint/header-not-json", "checkpoint", lambda c: safetensors_with(c.tmp / "h.safetensors", {"pl3d": "{not json"}), CheckpointError, "not valid JSON"),
    Case("checkpoint/other-format", "checkpoint", lambda c: ckpt_header(c, lambda h: h.update(format="other")), CheckpointError, "is not a pl3d_ros checkpoint"),
    Case("checkpoint/lying-architecture", "checkpoint", lambda c: ckpt_header(c, lambda h: h["model"].update(image_widths=[8, 16, 16])), CheckpointError, "do not fit the architecture"),
    Case("checkpoint/lying-input-spec", "checkpoint", lambda c: ckpt_header(c, lambda h: h.update(input={"image": [1, 3, 1, 1]})), CheckpointError, "input spec"),
    Case("checkpoint/stale-temp-of-a-killed-write", "checkpoint", lambda c: _with_stale_temp(c.checkpoint()), None, check=lambda r, logs: _assert(r[1].class_set.num_classes == 10)),
    # Settings (params files, --config): clear ConfigError at load, numbers as YAML 1.1 writes them
    Case("config/nan-lr", "config", lambda c: {"adapt": {"lr": float("nan")}}, ConfigError, "adapt.lr must be a finite"),
    Case("config/inf-lr", "config", lambda c: {"adapt": {"lr": float("inf")}}, ConfigError, "adapt.lr must be a finite"),
    Case("config/nan-loss-weight", "config", lambda c: {"adapt": {"weight_xm": float("nan")}}, ConfigError, "weight_xm"),
    Case("config/inf-stop-timeout", "config", lambda c: {"node": {"stop_timeout_s": float("inf")}}, ConfigError, "stop_timeout_s"),
    Case("config/zero-slop", "config", lambda c: {"sync": {"slop_s": 0.0}}, ConfigError, "slop_s must be > 0"),
    Case("config/negative-depth", "config", lambda c: {"qos": {"input_depth": -1}}, ConfigError, "input_depth"),
    Case("config/extrinsics-text-item", "config", lambda c: {"frames": {"static_extrinsics": ["one"] + [0.0] * 15}}, ConfigError, r"static_extrinsics\[0\]"),
    Case("config/extrinsics-not-rigid", "config", lambda c: {"frames": {"static_extrinsics": [2.0] + [0.0] * 15}}, ConfigError, "static_extrinsics"),
    Case("config/unknown-method", "config", lambda c: {"adapt": {"method": "cotta"}}, ConfigError, "adapt.method must be one of"),
    Case("config/unknown-key", "config", lambda c: {"adapt": {"learning_rate": 0.1}}, ConfigError, "unknown setting"),
    Case("config/sam-without-checkpoint", "config", lambda c: {"refine": {"mask_provider": "sam"}}, ConfigError, "needs refine.sam_checkpoint"),
    Case("config/missing-sam-checkpoint", "config", lambda c: {"refine": {"sam_checkpoint": str(c.tmp / "none.pth")}}, ConfigError, "does not exist"),
    Case("config/numeric-string-lr", "config", lambda c: {"adapt": {"lr": "1e-3"}}, None,
         check=lambda cfg, logs: cfg.adapt.lr == 1e-3 or pytest.fail(str(cfg.adapt.lr))),
    Case("config_yaml/yaml11-exponent", "config_yaml", lambda c: _yaml(c, "/**:\n  ros__parameters:\n    adapt:\n      lr: 1e-3\n"), None,
         check=lambda cfg, logs: cfg.adapt.lr == 1e-3 or pytest.fail(str(cfg.adapt.lr))),
    Case("config_yaml/not-a-mapping", "config_yaml", lambda c: _yaml(c, "[1, 2]\n"), ConfigError, "must hold a mapping"),
    Case("config_yaml/broken-yaml", "config_yaml", lambda c: _yaml(c, "adapt: {lr: [\n"), ConfigError, "cannot read config"),
    Case("training_config/zero-image-width", "training_config", lambda c: {"model": {"image_width": 0}}, ConfigError, "image_width must be >= 1"),
    # Replay: what it skipped is reported, nothing usable is an error, unlabelled input still runs
    Case("replay/every-camera-info-disagrees", "replay", lambda c: (c.bag("badinfo", 3, big=False, image_size=(16, 12)), {}), ReplayError, "no frame could be used"),
    Case("replay/missing-input", "replay", lambda c: (c.tmp / "nonexistent", {}), FileNotFoundError, "does not exist"),
    Case("replay/no-labels", "replay", lambda c: (_synthetic(c, "nolabels", labels=False), {}), None,
         check=lambda m, logs: (m["frames_processed"], m["frames_scored"]) == (3, 0) or pytest.fail(str(m))),
    Case("replay/nan-slop-option", "replay", lambda c: (c.bag("nanslop", 2, big=False), {"sync.slop_s": float("nan")}), ConfigError, "finite"),

]


def _assert(cond: bool) -> None:
    assert cond


def _assert_logged(logs: list[str], pattern: str) -> None:
    assert any(re.search(pattern, m) for m in logs), logs


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _with_stale_temp(path: Path) -> Path:
    (path.parent / f".{path.name}.999999999.abcdefgh.tmp").write_bytes(b"half a checkpoint")
    return path


def _poisoned_cloud(f, header, arr, i):
    """Frame 2's cloud declares a field of count 2^31 (the rest are fine)."""
    msg = rm.make_cloud(f, header, arr)
    if i == 2:
        msg.fields[-1].count = 2**31
    return msg


def _run_bag(path: Path) -> tuple[list[Frame], Any]:
    reader = BagReader(path)
    return list(reader.frames()), reader.stats


def _run_cloud_frame(msg: Any) -> Frame:
    pts, _ = pc2.cloud_to_points(msg)
    return Frame(1, pts, np.zeros((H, W, 3), np.uint8), CAM)


def _synthetic(ctx: Ctx, name: str, **kw: Any) -> Path:
    from fakes import write_synthetic_bag

    return write_synthetic_bag(ctx.tmp / name, 3, **kw)


def _yaml(ctx: Ctx, text: str) -> Path:
    path = ctx.tmp / "params.yaml"
    path.write_text(text)
    return path


def _run_replay(built: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    from fakes import SMALL, SENSOR, small_model
    from pl3d_ros.config import Config
    from pl3d_ros.eval.replay import ReplayOptions, replay
    from pl3d_ros.labels import load_class_set
    from pl3d_ros.models.checkpoint import CheckpointHeader

    inputs, settings = built
    # a tiny network for the bags' 8x6 camera: 8x8 input image, 16 x 64 range image
    small = SMALL.__class__(preset="test", image_width=8, image_height=8, image_widths=[4, 4],
                            range_widths=[4, 8])
    ckpt = save_checkpoint(inputs.parent / "tiny.safetensors", _tiny(small),
                           CheckpointHeader(small, load_class_set("xmuda10"), SENSOR, {}))
    cfg = Config().replace(**{"adapt.method": "source", "runtime.backend": "torch", "runtime.threads": 1,
                              **settings})
    return replay(inputs, ckpt, inputs.parent / "replay_out", ReplayOptions(config=cfg, write_bag=False, plots=False))


def _tiny(model_cfg):
    from pl3d_ros.models.two_stream import build_model

    return build_model(model_cfg, 10)


RUNNERS: dict[str, Callable[[Any], Any]] = {
    "cloud": pc2.cloud_to_points,
    "cloud_frame": _run_cloud_frame,
    "image": rm.image_to_rgb,
    "camera_info": lambda msg: rm.camera_model_from_info(msg, np.eye(4)),
    "frame": lambda kw: Frame(**kw),
    "camera_model": lambda kw: CameraModel(**kw),
    "tf": rm.tf_message_transforms,
    "bag": _run_bag,
    "checkpoint": load_checkpoint,
    "config": lambda d: Config.from_dict(d),
    "config_yaml": lambda p: Config.from_yaml(p),
    "training_config": lambda d: TrainingConfig.from_dict(d),
    "replay": _run_replay,
}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    assert case.kind in RUNNERS, f"unknown kind {case.kind!r}; add a runner to RUNNERS"
    rm._warned_calibrations.clear()
    built = case.build(Ctx(tmp_path))
    capture = _Capture()
    logger = logging.getLogger("pl3d_ros")
    logger.addHandler(capture)
    try:
        if case.expect is None:
            result = RUNNERS[case.kind](built)
            assert case.check is not None, "a handled case must check that nothing was lost"
            case.check(result, capture.messages)
        else:
            with pytest.raises(case.expect, match=case.match) as info:
                RUNNERS[case.kind](built)
            # a clear error names its problem: no bare repr of some inner exception
            assert str(info.value).strip(), "empty error message"
    finally:
        logger.removeHandler(capture)


def test_case_ids_are_unique_and_kinds_known():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert all(c.id.startswith(c.kind + "/") and c.kind in RUNNERS for c in CASES)


def test_pickle_payload_never_runs(tmp_path):
    bomb = pickle_bomb(tmp_path / "bomb.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(bomb)
    assert not bomb.with_suffix(".marker").exists()
    pickle.loads(bomb.read_bytes())  # the bomb is real: unpickling it does create the marker
    assert bomb.with_suffix(".marker").exists()
