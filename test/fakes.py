"""Shared test doubles and synthetic data: a tiny two-stream network, a synthetic camera+LiDAR
frame that needs no dataset, and fake segmenters / adapters / clocks for the threading tests."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from pl3d_ros.config import ModelConfig, RangeImageConfig
from pl3d_ros.frame import CameraModel, Frame, Prediction
from pl3d_ros.health import AdapterHealth
from pl3d_ros.labels import load_class_set
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.models.class_map import SEMANTICKITTI_CLASSES
from pl3d_ros.models.espnetv2 import ESPNetv2
from pl3d_ros.models.mininet3d import MiniNet3D, MiniNet3DConfig, RangeInputSpec
from pl3d_ros.models.two_stream import build_model

# ----------------------------------------------------------------------------- the tiny network

SMALL = ModelConfig(preset="test", image_width=64, image_height=32, image_widths=[4, 8, 8],
                    range_widths=[4, 8, 8])
SENSOR = RangeImageConfig(rows=16, cols=64)
ROAD, CAR, BUILDING = 40, 10, 50  # SemanticKITTI raw ids (xmuda10: road=4, car=0, building=7)
NS = 1_000_000_000


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(SMALL, 10)
    # non-trivial BatchNorm statistics, so export folding is actually exercised
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def confident_model(seed: int = 0) -> torch.nn.Module:
    """The tiny network leaning towards road (class 4), so pseudo-labels and masks agree."""
    model = small_model(seed)
    with torch.no_grad():
        model.image.head.bias[4] += 2.0
        model.range.head.bias[4] += 2.0
    return model


def header() -> CheckpointHeader:
    return CheckpointHeader(SMALL, load_class_set("xmuda10"), SENSOR, {"note": "test"})


def net_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Random backend inputs of the tiny network (range image with empty cells)."""
    g = torch.Generator().manual_seed(seed)
    rng = torch.rand(1, 5, SENSOR.rows, SENSOR.cols, generator=g) * 20
    rng[:, :, :, ::7] = 0  # empty cells
    return {"image": torch.rand(1, 3, 32, 64, generator=g).numpy(), "range_image": rng.numpy()}


def bn_weights(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])


# ----------------------------------------------------------------------------- imported networks

#: A tiny 3D-MiniNet (the real tiny one has 96 features, 7/5 + 2/1 blocks) on SENSOR's 16 x 64.
MININET_SMALL = MiniNet3DConfig(features=16, enc_blocks_1=2, enc_blocks_2=3, dec_features=16,
                                dec_blocks_1=2, dec_blocks_2=1, num_classes=20)
RANGE_SPEC = RangeInputSpec("test", SENSOR.rows, SENSOR.cols, SENSOR.fov_up_deg, SENSOR.fov_down_deg,
                            (12.12, 10.88, 0.23, -1.04, 0.21), (12.32, 11.47, 6.91, 0.86, 0.16))


def _random_bn_stats(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():  # non-trivial BN statistics, so export folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def small_mininet(seed: int = 0) -> MiniNet3D:
    """A random MININET_SMALL with SemanticKITTI's 20 outputs (class names as data_cfg.yaml)."""
    torch.manual_seed(seed)
    return _random_bn_stats(MiniNet3D(MININET_SMALL, RANGE_SPEC, SEMANTICKITTI_CLASSES))


def small_espnetv2(seed: int = 0) -> ESPNetv2:
    """A random ESPNetv2 at the smallest width (s = 0.5) with Cityscapes' 20 outputs."""
    torch.manual_seed(seed)
    return _random_bn_stats(ESPNetv2(20, 0.5))


def write_bonnetal_folder(folder, model: MiniNet3D, arch_blocks_1: int | None = None):
    """``model`` as a lidar-bonnetal model folder (three weight files, arch_cfg.yaml with KNN on,
    data_cfg.yaml); arch_blocks_1 is what arch_cfg.yaml claims for backbone.block_1."""
    import yaml

    folder.mkdir()
    torch.save(model.backbone.state_dict(), folder / "backbone")
    torch.save(model.decoder.state_dict(), folder / "segmentation_decoder")
    torch.save(model.head.state_dict(), folder / "segmentation_head")
    c, s = model.cfg, model.spec
    arch = {
        "backbone": {"name": "3dmininet", "input_depth": {"range": True, "xyz": True, "remission": True},
                     "block_1": c.enc_blocks_1 if arch_blocks_1 is None else arch_blocks_1,
                     "block_2": c.enc_blocks_2, "features_bottleneck": c.features, "OS": 16},
        "decoder": {"name": "3dmininet", "block_1": c.dec_blocks_1, "block_2": c.dec_blocks_2,
                    "features_bottleneck": c.dec_features},
        "post": {"KNN": {"use": True, "params": {"knn": 7, "search": 7, "sigma": 1.0, "cutoff": 2.0}}},
        "dataset": {"sensor": {"name": s.sensor, "fov_up": s.fov_up_deg, "fov_down": s.fov_down_deg,
                               "img_prop": {"width": s.cols, "height": s.rows},
                               "img_means": list(s.means), "img_stds": list(s.stds)}},
    }
    (folder / "arch_cfg.yaml").write_text(yaml.safe_dump(arch))
    data = {"labels": dict(enumerate(model.class_names)), "learning_map_inv": {i: i for i in range(len(model.class_names))}}
    (folder / "data_cfg.yaml").write_text(yaml.safe_dump(data))
    return folder


# ----------------------------------------------------------------------------- synthetic frames

def synthetic_frame(seed: int = 0, n: int = 1500, seq: int = 0) -> Frame:
    """A 128x64 camera looking along the LiDAR's +x over a ground ring, a car-sized box and a wall.

    The image is a mosaic of 16x16 tiles of random colours, so superpixels find ~32 masks of
    ~3 % of the image each (under MLA's 25 % area cap). Ground truth in raw SemanticKITTI ids.
    """
    g = np.random.default_rng(seed)
    K = np.array([[60.0, 0, 63.5], [0, 60.0, 31.5], [0, 0, 1]])
    T = np.eye(4)
    T[:3, :3] = [[0, -1, 0], [0, 0, -1], [1, 0, 0]]  # LiDAR x fwd, y left, z up -> optical frame
    cam = CameraModel(K, 128, 64, T)
    m = n // 5
    k = n - 2 * m
    r, az = g.uniform(3, 25, k), g.uniform(-np.pi, np.pi, k)
    ground = np.stack([r * np.cos(az), r * np.sin(az), -1.7 + g.normal(0, 0.02, k), g.uniform(0, 1, k)], 1)
    car = np.stack([g.uniform(8, 10, m), g.uniform(-1, 1, m), g.uniform(-1.7, -0.2, m), g.uniform(0, 1, m)], 1)
    wall = np.stack([np.full(m, 20.0), g.uniform(-10, 10, m), g.uniform(-1.7, 3, m), g.uniform(0, 1, m)], 1)
    points = np.concatenate([ground, car, wall]).astype(np.float32)
    labels = np.concatenate([np.full(k, ROAD), np.full(m, CAR), np.full(m, BUILDING)]).astype(np.uint32)
    tiles = g.integers(0, 256, (4, 8, 3))
    image = np.repeat(np.repeat(tiles, 16, 0), 16, 1).astype(np.uint8)
    return Frame(1_000_000_000 + seq * 100_000_000, points, image, cam, labels, seq=seq,
                 lidar_frame_id="velodyne")


def clone(frame: Frame, stamp_ns: int, seq: int = 0) -> Frame:
    """A new Frame object sharing the arrays (so a producer can make many cheaply)."""
    return Frame(stamp_ns, frame.points, frame.image, frame.camera, seq=seq,
                 lidar_frame_id=frame.lidar_frame_id)


def fake_prediction(frame: Frame, ms: float = 1.0) -> Prediction:
    n = frame.num_points
    return Prediction(np.zeros(n, np.uint8), np.ones(n, np.float32), np.zeros(n, bool),
                      np.zeros(0, np.uint8), np.zeros(n, np.uint8),
                      {"preprocess": ms / 2, "inference": ms / 2, "postprocess": 0.0,
                       "total": ms}, frame.stamp_ns)


# ----------------------------------------------------------------------------- fake parts

class SleepySegmenter:
    """infer takes ``delay_s`` of wall time; records the stamps it was given, in order."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.seen: list[int] = []

    def infer(self, frame: Frame) -> Prediction:
        self.seen.append(frame.stamp_ns)
        time.sleep(self.delay_s)
        return fake_prediction(frame, self.delay_s * 1e3)


class GatedSegmenter:
    """infer blocks until released (once per frame): frames can be queued deterministically."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.seen: list[int] = []

    def infer(self, frame: Frame) -> Prediction:
        self.seen.append(frame.stamp_ns)
        self.entered.release()
        assert self.release.acquire(timeout=10)
        return fake_prediction(frame)


class FakeClock:
    """Monotonic seconds that only move when told (the segmenter advances it)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.t

    def advance(self, ms: float) -> None:
        with self.lock:
            self.t += ms / 1e3


class ClockedSegmenter:
    """Takes exactly ``durations_ms[i]`` on the fake clock for its i-th frame."""

    def __init__(self, clock: FakeClock, durations_ms: list[float]) -> None:
        self.clock = clock
        self.durations = list(durations_ms)

    def infer(self, frame: Frame) -> Prediction:
        ms = self.durations.pop(0)
        self.clock.advance(ms)
        return fake_prediction(frame, ms)


class FakeAdapter:
    """Implements the adapter interface; ``fail_offer`` makes every offer raise."""

    def __init__(self, fail_offer: bool = False) -> None:
        self.fail_offer = fail_offer
        self.offered: list[int] = []
        self.started = self.stopped = 0
        self.resets = 0
        self.saved: list[str] = []

    def offer(self, frame: Frame, inputs=None) -> None:
        if self.fail_offer:
            raise RuntimeError("adapter buffer exploded")
        self.offered.append(frame.stamp_ns)

    def start(self) -> None:
        self.started += 1

    def stop(self, timeout_s: float) -> bool:
        self.stopped += 1
        return True

    def health(self) -> AdapterHealth:
        return AdapterHealth(method="fake", running=True, steps=7, frames_offered=len(self.offered),
                             weight_swaps=1, pseudo_label_density=0.4)

    def reset(self) -> None:
        self.resets += 1

    def save(self, path) -> str:
        self.saved.append(str(path))
        return str(path)


def wait_for(cond, timeout: float = 10.0, step: float = 0.005) -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > t_end:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


def write_synthetic_bag(path, n: int = 3, *, labels: bool = True, image_offset_ns: int = 0,
                        cloud_stamps_ns: list[int] | None = None, info_width: int | None = None):
    """A bag in `pl3d kitti2bag`'s layout holding ``n`` synthetic frames (a raw ``label`` field
    unless ``labels`` is False, and the /tf_static extrinsics), for tests that need a recording
    but no dataset. ``image_offset_ns`` shifts image + CameraInfo stamps; ``cloud_stamps_ns``
    replaces the clouds' stamps (out of order, duplicates); ``info_width`` writes CameraInfos
    that disagree with the images."""
    import dataclasses

    from pl3d_ros.io import point_cloud2, ros_msgs
    from pl3d_ros.io.bag import BagWriter
    from pl3d_ros.transforms import invert

    with BagWriter(path) as w:
        f0 = synthetic_frame(0)
        w.write_static_transform(f0.stamp_ns, "velodyne", "camera_optical", invert(f0.camera.T_cam_lidar))
        for i in range(n):
            f = synthetic_frame(i, seq=i)
            cam_stamp = f.stamp_ns + image_offset_ns
            cloud_stamp = cloud_stamps_ns[i] if cloud_stamps_ns is not None else f.stamp_ns
            camera = f.camera if info_width is None else dataclasses.replace(f.camera, width=info_width)
            fac = w.factory
            header = ros_msgs.make_header(fac, cam_stamp, "camera_optical")
            w.write(w.topics.image, ros_msgs.make_image(fac, header, f.image), cam_stamp)
            w.write(w.topics.camera_info, ros_msgs.make_camera_info(fac, header, camera), cam_stamp)
            extra = {"label": f.labels.astype(np.uint32)} if labels else {}
            cloud = point_cloud2.points_cloud_array(f.points, extra)
            # logged in frame order, header stamped as asked (a recorder sees them in this order)
            w.write(w.topics.cloud, ros_msgs.make_cloud(fac, ros_msgs.make_header(fac, cloud_stamp, "velodyne"),
                                                        cloud), f.stamp_ns)
    return path


def cdr(ts, msg):
    """Serialise a rosbags message to CDR and back, as a bag or DDS would."""
    return ts.deserialize_cdr(ts.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)
