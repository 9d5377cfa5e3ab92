"""ROS 2 bags without ROS: write camera+LiDAR bags, and read them back as synchronized Frames.

Reading pairs each LiDAR cloud with the image nearest in header stamp (within ``slop_s``) and the
CameraInfo nearest that image, streaming: memory stays bounded by ``queue_size`` messages whatever
the bag's length. Extrinsics come from /tf_static (any path through the tree between the cloud's
and the camera's frames), from /tf when the bag has no static transforms, or from the caller.
Everything that can go wrong with a real bag (missing topics, out-of-order or duplicate stamps,
undecodable messages, truncation) is a clear BagError or a counted skip in ``SyncStats``.
"""

from __future__ import annotations

import logging
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pl3d_ros.frame import CameraModel, Frame, FrameError
from pl3d_ros.io import ros_msgs
from pl3d_ros.io.frames import frame_from_messages
from pl3d_ros.transforms import TransformError, TransformTree

log = logging.getLogger(__name__)

IMAGE_TYPE = "sensor_msgs/msg/Image"
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"
TF_TYPE = "tf2_msgs/msg/TFMessage"
STORAGES = ("mcap", "sqlite3")
DISTROS = ("humble", "jazzy")


class BagError(RuntimeError):
    """A bag cannot be opened, lacks what a replay needs, or breaks while being read."""


def typestore(distro: str = "humble"):
    """The rosbags typestore of a ROS 2 distribution ("humble" or "jazzy")."""
    from rosbags.typesys import Stores, get_typestore

    stores = {"humble": Stores.ROS2_HUMBLE, "jazzy": Stores.ROS2_JAZZY}
    if distro not in stores:
        raise BagError(f"unknown ROS distro {distro!r}; choose from {sorted(stores)}")
    return get_typestore(stores[distro])


@dataclass
class BagTopics:
    """Topic names; None means: find the only topic of that type in the bag.

    A default name that the bag lacks falls back to the bag's only topic of that type; a name in
    ``required`` (one the user gave: ``--cloud-topic``) must be in the bag, or the read fails.
    """

    image: str | None = "/camera/image_raw"
    camera_info: str | None = "/camera/camera_info"
    cloud: str | None = "/lidar/points"
    tf_static: str = "/tf_static"
    tf: str = "/tf"
    required: frozenset[str] = frozenset()

    @classmethod
    def given(cls, image: str | None = None, camera_info: str | None = None,
              cloud: str | None = None) -> BagTopics:
        """The defaults, with the names a user gave replacing them and required to exist."""
        named = {"image": image, "camera_info": camera_info, "cloud": cloud}
        d = cls()
        return cls(image or d.image, camera_info or d.camera_info, cloud or d.cloud,
                   required=frozenset(k for k, v in named.items() if v))


# ------------------------------------------------------------------------------------- writing


def _qos_profiles(transient_local: bool):
    """Offered QoS recorded in the bag: /tf_static must replay as TRANSIENT_LOCAL (latched)."""
    from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness,
                                    QosReliability, QosTime)

    never = QosTime(sec=0x7FFFFFFF, nsec=0xFFFFFFFF)
    return [Qos(
        history=QosHistory.KEEP_LAST,
        depth=1 if transient_local else 10,
        reliability=QosReliability.RELIABLE,
        durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
        deadline=never, lifespan=never, liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=never, avoid_ros_namespace_conventions=False,
    )]


class BagWriter:
    """Writes a camera+LiDAR bag (MCAP or sqlite3, rosbag2 format version 8).

    The bag is written into a hidden folder beside ``path`` and renamed into place on a clean
    close, so an interrupted conversion never leaves a bag that looks complete.
    Use as a context manager.
    """

    def __init__(self, path: str | Path, *, storage: str = "mcap", distro: str = "humble",
                 topics: BagTopics | None = None, overwrite: bool = False) -> None:
        if storage not in STORAGES:
            raise BagError(f"unknown storage {storage!r}; choose from {STORAGES}")
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise BagError(f"{self.path} exists; remove it or pass overwrite=True (--force)")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.storage = storage
        self.topics = topics or BagTopics()
        self.typestore = typestore(distro)
        self.factory = ros_msgs.rosbags_factory(self.typestore)
        self._tmp_parent = self.path.parent / f".{self.path.name}.partial"
        self._writer = None
        self._conns: dict[str, Any] = {}

    def __enter__(self) -> BagWriter:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if self._tmp_parent.exists():
            shutil.rmtree(self._tmp_parent)
        self._tmp_parent.mkdir(parents=True)
        plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3
        # Version 8 is what Humble's rosbag2 reads; Jazzy reads it too.
        self._writer = Writer(self._tmp_parent / self.path.name, version=8, storage_plugin=plugin)
        self._writer.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.close()
        finally:
            if exc_type is None:
                (self._tmp_parent / self.path.name).rename(self.path)
            shutil.rmtree(self._tmp_parent, ignore_errors=True)

    def _connection(self, topic: str, msgtype: str, transient_local: bool = False):
        if topic not in self._conns:
            self._conns[topic] = self._writer.add_connection(
                topic, msgtype, typestore=self.typestore,
                offered_qos_profiles=_qos_profiles(transient_local),
            )
        return self._conns[topic]

    def write(self, topic: str, msg: Any, stamp_ns: int, *, transient_local: bool = False) -> None:
        """Serialise ``msg`` (a message of this writer's factory) to ``topic`` at log time stamp_ns."""
        conn = self._connection(topic, msg.__msgtype__, transient_local)
        self._writer.write(conn, int(stamp_ns), self.typestore.serialize_cdr(msg, msg.__msgtype__))

    def write_static_transform(self, stamp_ns: int, parent: str, child: str,
                               T_parent_child: np.ndarray) -> None:
        """One /tf_static transform (maps ``child`` coordinates into ``parent``)."""
        msg = ros_msgs.make_tf_message(self.factory, [(stamp_ns, parent, child, T_parent_child)])
        self.write(self.topics.tf_static, msg, stamp_ns, transient_local=True)

    def write_frame(self, stamp_ns: int, points: np.ndarray, image: np.ndarray,
                    camera: CameraModel, lidar_frame: str, camera_frame: str,
                    extra_fields: dict[str, np.ndarray] | None = None) -> None:
        """Image, CameraInfo and cloud of one frame, all stamped ``stamp_ns``.

        ``points`` (N, 4) float32 x, y, z, intensity; ``extra_fields`` more per-point columns
        (e.g. ``label`` uint32) appended to the cloud.
        """
        f = self.factory
        cam_header = ros_msgs.make_header(f, stamp_ns, camera_frame)
        self.write(self.topics.image, ros_msgs.make_image(f, cam_header, image), stamp_ns)
        self.write(self.topics.camera_info, ros_msgs.make_camera_info(f, cam_header, camera), stamp_ns)
        cloud = ros_msgs.points_cloud_array(points, extra_fields or {})
        lidar_header = ros_msgs.make_header(f, stamp_ns, lidar_frame)
        self.write(self.topics.cloud, ros_msgs.make_cloud(f, lidar_header, cloud), stamp_ns)


# ------------------------------------------------------------------------------------- reading


@dataclass
class SyncStats:
    """What a pass over a bag saw and why messages were skipped (all counts)."""

    clouds: int = 0
    images: int = 0
    camera_infos: int = 0
    synced: int = 0
    no_image: int = 0  # cloud with no image within the slop
    no_camera_info: int = 0  # image without any CameraInfo seen
    out_of_order: int = 0  # cloud stamped earlier than the previous one
    duplicate: int = 0  # cloud or image with the same stamp as the previous one
    undecodable: int = 0  # message that does not deserialise
    bad_frame: int = 0  # synced set rejected by Frame validation (e.g. image size vs CameraInfo)
    truncated: bool = False  # the bag broke off while being read
    error: str | None = None

    @property
    def skipped(self) -> int:
        return (self.no_image + self.no_camera_info + self.out_of_order + self.duplicate
                + self.undecodable + self.bad_frame)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped}


@dataclass
class _Synced:
    cloud: Any
    image: Any
    info: Any
    stamp_ns: int


@dataclass
class BagReader:
    """Reads a ROS 2 bag (a bag folder, or a single .mcap / .db3 file) as synchronized Frames.

    Args:
        path: the bag.
        topics: topic names (defaults: those written by ``pl3d kitti2bag`` and ``pl3d sim``; a
            topic that is absent is looked up by type when the bag has exactly one of that type).
        slop_s: largest |image stamp - cloud stamp| that still pairs, seconds.
        queue_size: clouds waiting for a later image before they are given up, and images kept.
        T_cam_lidar: (4, 4) extrinsics to use instead of the bag's TF.
        distro: typestore for bags that carry no message definitions (old sqlite3 bags).
        strict: raise BagError on a truncated/corrupt bag instead of ending with a warning.
    """

    path: str | Path
    topics: BagTopics = field(default_factory=BagTopics)
    slop_s: float = 0.05
    queue_size: int = 10
    T_cam_lidar: np.ndarray | None = None
    distro: str = "humble"
    strict: bool = False
    stats: SyncStats = field(default_factory=SyncStats, init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.exists():
            raise BagError(f"bag {self.path} does not exist")
        if self.slop_s <= 0 or self.queue_size < 1:
            raise BagError(f"slop_s must be > 0 and queue_size >= 1, got {self.slop_s}, {self.queue_size}")

    # -- opening --------------------------------------------------------------------------------

    def _open(self):
        from rosbags.highlevel import AnyReader

        try:
            reader = AnyReader([self.path], default_typestore=typestore(self.distro))
            reader.open()
        except Exception as exc:  # rosbags raises several types for broken files
            hint = ""
            if "magic" in str(exc):
                hint = (" (an MCAP file without its footer: the recording was interrupted; "
                        "`mcap recover` or `ros2 bag reindex` can rebuild it)")
            raise BagError(f"cannot open bag {self.path}: {type(exc).__name__}: {exc}{hint}") from exc
        return reader

    @staticmethod
    def _topic_counts(reader) -> dict[str, dict[str, Any]]:
        """{topic: {"type", "count"}} from the bag's index, without reading messages."""
        table: dict[str, dict[str, Any]] = {}
        for conn in reader.connections:
            entry = table.setdefault(conn.topic, {"type": conn.msgtype, "count": 0})
            entry["count"] += conn.msgcount
        return table

    def _resolve_topics(self, reader) -> BagTopics:
        by_type: dict[str, set[str]] = {}
        present = {c.topic: c.msgtype for c in reader.connections}
        for topic, msgtype in present.items():
            by_type.setdefault(msgtype, set()).add(topic)

        def pick(name: str | None, msgtype: str, role: str) -> str:
            listing = ", ".join(f"{t} [{m}]" for t, m in sorted(present.items())) or "none"
            if name and name in present:
                if present[name] != msgtype:
                    raise BagError(f"{role} topic {name} has type {present[name]}, expected {msgtype}")
                return name
            if name and role in self.topics.required:
                raise BagError(f"bag {self.path} has no {role} topic {name}; topics: {listing}")
            candidates = sorted(by_type.get(msgtype, ()))
            if len(candidates) == 1:
                if name:
                    log.info("%s topic %s not in the bag; using %s", role, name, candidates[0])
                return candidates[0]
            if not candidates:
                raise BagError(f"bag {self.path} has no {msgtype} topic for the {role}; topics: {listing}")
            raise BagError(f"bag {self.path} has several {msgtype} topics {candidates}; choose one with "
                           f"--{role.replace('_', '-')}-topic")

        t = self.topics
        return BagTopics(pick(t.image, IMAGE_TYPE, "image"), pick(t.camera_info, INFO_TYPE, "camera_info"),
                         pick(t.cloud, CLOUD_TYPE, "cloud"), t.tf_static, t.tf)

    # -- TF ---------------------------------------------------------------------------------------

    def _transform_tree(self, reader, topics: BagTopics) -> TransformTree:
        tree = TransformTree()
        static = [c for c in reader.connections if c.topic == topics.tf_static and c.msgtype == TF_TYPE]
        dynamic = [c for c in reader.connections if c.topic == topics.tf and c.msgtype == TF_TYPE]
        # A camera-LiDAR mount is rigid: when a bag only has /tf, its first value of each edge is used.
        for conns in (static, dynamic):
            if not conns or len(tree):
                continue
            seen: set[tuple[str, str]] = set()
            for conn, _, raw in self._iter(reader, conns):
                msg = self._deserialize(reader, raw, conn.msgtype)
                for _, parent, child, T in ros_msgs.tf_message_transforms(msg) if msg else ():
                    if (parent, child) not in seen:
                        seen.add((parent, child))
                        tree.add(parent, child, T)
        return tree

    # -- streaming sync -----------------------------------------------------------------------------

    def _iter(self, reader, conns) -> Iterator[tuple[Any, int, bytes]]:
        """reader.messages, turning a mid-file failure into a recorded (or raised) truncation."""
        try:
            yield from reader.messages(connections=conns)
        except Exception as exc:
            self.stats.truncated = True
            self.stats.error = f"{type(exc).__name__}: {exc}"
            if self.strict:
                raise BagError(f"bag {self.path} is corrupt or truncated: {self.stats.error}") from exc
            log.warning("bag %s ended early (corrupt or truncated): %s", self.path, self.stats.error)

    def _deserialize(self, reader, raw: bytes, msgtype: str) -> Any | None:
        try:
            return reader.deserialize(raw, msgtype)
        except Exception as exc:
            self.stats.undecodable += 1
            log.warning("undecodable %s message skipped: %s", msgtype, exc)
            return None

    def _synced(self, reader, topics: BagTopics) -> Iterator[_Synced]:
        conns = [c for c in reader.connections
                 if c.topic in (topics.image, topics.camera_info, topics.cloud)]
        slop = int(round(self.slop_s * 1e9))
        images: deque[tuple[int, Any]] = deque()
        infos: deque[tuple[int, Any]] = deque(maxlen=self.queue_size)
        pending: deque[tuple[int, Any]] = deque()
        last_cloud: int | None = None
        s = self.stats

        def resolve(final: bool) -> Iterator[_Synced]:
            while pending:
                stamp, cloud = pending[0]
                newest = max((t for t, _ in images), default=None)
                # Wait while a later image could still be closer (or no CameraInfo has come yet),
                # unless the queue is full.
                waiting = newest is None or newest < stamp + slop or not infos
                if not final and waiting and len(pending) <= self.queue_size:
                    return
                pending.popleft()
                while images and images[0][0] < stamp - slop:
                    images.popleft()  # clouds only move forward: older images can never pair
                best = min(images, key=lambda m: abs(m[0] - stamp), default=None)
                if best is None or abs(best[0] - stamp) > slop:
                    s.no_image += 1
                    continue
                info = min(infos, key=lambda m: abs(m[0] - best[0]), default=None)
                if info is None:
                    s.no_camera_info += 1
                    continue
                s.synced += 1
                yield _Synced(cloud, best[1], info[1], stamp)

        for conn, _, raw in self._iter(reader, conns):
            msg = self._deserialize(reader, raw, conn.msgtype)
            if msg is None:
                continue
            stamp = ros_msgs.stamp_to_ns(msg.header)
            if conn.topic == topics.cloud:
                s.clouds += 1
                if last_cloud is not None and stamp <= last_cloud:
                    if stamp == last_cloud:
                        s.duplicate += 1
                    else:
                        s.out_of_order += 1
                    log.debug("cloud at %d after %d skipped", stamp, last_cloud)
                    continue
                last_cloud = stamp
                pending.append((stamp, msg))
            elif conn.topic == topics.image:
                s.images += 1
                if any(t == stamp for t, _ in images):
                    s.duplicate += 1
                    continue
                images.append((stamp, msg))
                while len(images) > 4 * self.queue_size:
                    images.popleft()
            else:
                s.camera_infos += 1
                infos.append((stamp, msg))
            yield from resolve(final=False)
        yield from resolve(final=True)

    # -- public ---------------------------------------------------------------------------------------

    def frames(self) -> Iterator[Frame]:
        """Synchronized Frames in stamp order. ``self.stats`` counts what was skipped and why."""
        self.stats = SyncStats()
        reader = self._open()
        try:
            topics = self._resolve_topics(reader)
            tree = self._transform_tree(reader, topics) if self.T_cam_lidar is None else None
            extrinsics: dict[tuple[str, str], np.ndarray] = {}
            seq = 0
            for synced in self._synced(reader, topics):
                try:
                    frame = self._to_frame(synced, tree, extrinsics, seq)
                except (FrameError, ros_msgs.MessageError) as exc:
                    self.stats.bad_frame += 1
                    log.warning("frame at %d s skipped: %s", synced.stamp_ns * 1e-9, exc)
                    continue
                seq += 1
                yield frame
        finally:
            reader.close()

    def _to_frame(self, s: _Synced, tree: TransformTree | None,
                  cache: dict[tuple[str, str], np.ndarray], seq: int) -> Frame:
        lidar_frame = s.cloud.header.frame_id
        camera_frame = s.info.header.frame_id or s.image.header.frame_id
        if self.T_cam_lidar is not None:
            T = np.asarray(self.T_cam_lidar, dtype=np.float64)
        else:
            key = (camera_frame, lidar_frame)
            if key not in cache:
                try:
                    cache[key] = tree.lookup(camera_frame, lidar_frame)
                except TransformError as exc:
                    raise BagError(
                        f"bag {self.path}: no extrinsics from LiDAR frame {lidar_frame!r} to camera "
                        f"frame {camera_frame!r} in {self.topics.tf_static} or {self.topics.tf} ({exc}); "
                        "give them with --extrinsics (16 numbers, row-major T_cam_lidar)"
                    ) from exc
            T = cache[key]
        return frame_from_messages(s.image, s.info, s.cloud, T, seq=seq, camera_frame=camera_frame,
                                   with_labels=True)

    def info(self) -> dict[str, Any]:
        """Topics (type, count, rate), and what a replay would sync, without building Frames."""
        self.stats = SyncStats()
        reader = self._open()
        try:
            table = self._topic_counts(reader)
            times: dict[str, list[int]] = {topic: [] for topic in table}
            for conn, t, _ in self._iter(reader, reader.connections):
                times[conn.topic].append(t)  # log times: no deserialisation needed
            for topic, entry in table.items():
                ts = times[topic]
                entry["rate_hz"] = (round((len(ts) - 1) / ((ts[-1] - ts[0]) * 1e-9), 3)
                                    if len(ts) > 1 and ts[-1] > ts[0] else None)
            out: dict[str, Any] = {
                "path": str(self.path),
                "duration_s": round(reader.duration * 1e-9, 3) if reader.message_count else 0.0,
                "messages": reader.message_count,
                "topics": table,
            }
            try:
                topics = self._resolve_topics(reader)
                synced = sum(1 for _ in self._synced(reader, topics))
                out["sync"] = {"image": topics.image, "camera_info": topics.camera_info,
                               "cloud": topics.cloud, "slop_s": self.slop_s}
                tree = self._transform_tree(reader, topics)
                out["tf_frames"] = tree.frames
            except BagError as exc:
                synced = 0
                out["sync_error"] = str(exc)
            out["synced_frames"] = synced
            out["stats"] = self.stats.to_dict()
            return out
        finally:
            reader.close()
