"""ROS 2 bags without ROS: write camera+LiDAR bags, and read them back as synchronized Frames.

Reading pairs each LiDAR cloud with the image nearest in header stamp (within ``slop_s``) and the
CameraInfo nearest that image, streaming: memory stays bounded by ``queue_size`` messages whatever
the bag's length. Extrinsics come from /tf_static (any path through the tree between the cloud's
and the camera's frames), from /tf when the bag has no static transforms, or from the caller.
Each Frame's odometry pose T_odom_lidar (``Frame.pose``) comes from /tf (and /tf_static for the
fixed part of the chain) at the cloud's stamp, interpolated between the two neighbouring samples
as tf2 does (``io.odometry``); None when the bag has no path from the odometry frame to the cloud's
frame at that stamp.
Everything that can go wrong with a real bag (missing topics, out-of-order or duplicate stamps,
undecodable messages, truncation, corrupt MCAP chunks) is a clear BagError or a counted skip in
``SyncStats``; every cloud that gives no Frame is counted under its reason.

MCAP bags written here carry CRCs (chunk, data section, summary: ``io.mcap_chunks.add_crcs``,
since rosbags writes none). MCAP bags are read chunk by chunk through the summary's chunk index
(``io.mcap_chunks.McapChunkReader``): a chunk that fails its CRC, does not decompress or holds
malformed records is skipped, what it held is counted from its message index, and reading goes
on with the next chunk. Other bags (sqlite3, MCAP without a summary) are read by rosbags; there a
failure mid-file ends the pass (``SyncStats.truncated``).
"""

from __future__ import annotations

import heapq
import logging
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pl3d_ros.frame import CameraModel, Frame, FrameError, check_rigid
from pl3d_ros.io import ros_msgs
from pl3d_ros.io.frames import frame_from_messages
from pl3d_ros.io.mcap_chunks import ChunkError, McapChunkReader, McapFormatError, add_crcs
from pl3d_ros.io.msg_common import MessageError
from pl3d_ros.io.odometry import ODOM_FRAME, TfHistory
from pl3d_ros.io.point_cloud2 import points_cloud_array
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
    """Writes a camera+LiDAR bag (MCAP or sqlite3, rosbag2 format version 8). MCAP files get
    their chunk, data-section and summary CRCs.

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
            if exc_type is None and self.storage == "mcap":
                # rosbags writes every MCAP CRC as 0 ("not available"): fill them in before the
                # bag is renamed into place, so a reader can tell altered bytes.
                for mcap in (self._tmp_parent / self.path.name).glob("*.mcap"):
                    add_crcs(mcap)
            if exc_type is None:
                (self._tmp_parent / self.path.name).rename(self.path)
        finally:
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

    def write_transform(self, stamp_ns: int, parent: str, child: str,
                        T_parent_child: np.ndarray) -> None:
        """One /tf transform stamped (and logged at) ``stamp_ns``, e.g. odom -> LiDAR."""
        msg = ros_msgs.make_tf_message(self.factory, [(stamp_ns, parent, child, T_parent_child)])
        self.write(self.topics.tf, msg, stamp_ns)

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
        cloud = points_cloud_array(points, extra_fields or {})
        lidar_header = ros_msgs.make_header(f, stamp_ns, lidar_frame)
        self.write(self.topics.cloud, ros_msgs.make_cloud(f, lidar_header, cloud), stamp_ns)


# ------------------------------------------------------------------------------------- reading


#: Skip records kept in ``SyncStats.skip_log`` / ``chunk_errors`` (the counts stay complete).
MAX_SKIP_LOG = 1000

#: Reasons a cloud gives no Frame (keys of ``SyncStats.skipped_frames``).
SKIP_REASONS = ("corrupt_chunk", "undecodable", "out_of_order", "duplicate", "no_image",
                "no_camera_info", "bad_frame")


@dataclass
class SyncStats:
    """What a pass over a bag saw and why messages were skipped.

    Every cloud of the bag ends in exactly one place: a Frame (``synced - bad_frame`` of them),
    or ``skipped_frames[reason]`` with ``reason`` one of :data:`SKIP_REASONS`:

    - ``corrupt_chunk``: in an MCAP chunk that could not be used (CRC mismatch, decompression
      failure, malformed records); counted from the chunk's message index;
    - ``undecodable``: the CDR does not deserialise;
    - ``out_of_order`` / ``duplicate``: stamped before / at the previous cloud's stamp;
    - ``no_image``: no image within the slop; ``no_camera_info``: no CameraInfo seen yet;
    - ``bad_frame``: the synced set is rejected (Frame / message validation, e.g. an image whose
      size disagrees with its CameraInfo, a malformed cloud).

    The one exception: the clouds of a corrupt chunk whose message index is unreadable too are
    not known, ``lost_unknown_chunks`` counts such chunks. ``skip_log`` has one record per skipped
    cloud ({"reason", "stamp_ns" (header stamp, None if the message was never read),
    "log_time_ns", "detail"}) and ``chunk_errors`` one per skipped chunk ({"file", "offset",
    "start_ns", "end_ns", "reason", "detail", "lost"}), the first :data:`MAX_SKIP_LOG` of each.
    ``dropped_points``, ``dropped_far`` and ``zeroed_intensity`` sum what Frame construction
    dropped or repaired in the frames produced (see ``frame.Frame``); ``frames_without_pose``
    counts the frames produced without an odometry pose.

    Message-level counts as before: ``clouds`` / ``images`` / ``camera_infos`` decoded,
    ``duplicate`` clouds and images, ``undecodable`` messages of any topic, ``lost_messages``
    per topic in corrupt chunks; ``truncated`` / ``error`` when a read through rosbags (sqlite3,
    MCAP without a chunk index) broke off, after which nothing more is read or counted.
    ``to_dict()`` is what a replay puts into metrics.json.
    """

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
    corrupt_chunks: int = 0  # MCAP chunks skipped
    lost_unknown_chunks: int = 0  # of those, chunks whose message index is unreadable too
    lost_messages: dict[str, int] = field(default_factory=dict)  # topic -> messages in them
    skipped_frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    skip_log: list[dict[str, Any]] = field(default_factory=list)
    chunk_errors: list[dict[str, Any]] = field(default_factory=list)
    summary_error: str | None = None  # an MCAP summary that fails its CRC
    dropped_points: int = 0
    dropped_far: int = 0
    zeroed_intensity: int = 0
    frames_without_pose: int = 0  # Frames without an odometry pose (off, or no /tf path at the stamp)

    @property
    def skipped(self) -> int:
        """Messages skipped (clouds, images, CameraInfos together; kept for bag-info)."""
        return (self.no_image + self.no_camera_info + self.out_of_order + self.duplicate
                + self.undecodable + self.bad_frame + sum(self.lost_messages.values()))

    @property
    def frames_skipped(self) -> int:
        """Clouds that gave no Frame, all reasons."""
        return sum(self.skipped_frames.values())

    def skip_frame(self, reason: str, stamp_ns: int | None, log_time_ns: int | None,
                   detail: str = "") -> None:
        """Count one cloud that gives no Frame (and log it in ``skip_log`` while there is room)."""
        self.skipped_frames[reason] = self.skipped_frames.get(reason, 0) + 1
        if len(self.skip_log) < MAX_SKIP_LOG:
            self.skip_log.append({"reason": reason, "stamp_ns": stamp_ns,
                                  "log_time_ns": log_time_ns, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped, "frames_skipped": self.frames_skipped}


@dataclass
class _Synced:
    cloud: Any
    image: Any
    info: Any
    stamp_ns: int
    log_time_ns: int | None = None


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
        odom_frame: the odometry frame of ``Frame.pose`` (T_odom_lidar from the bag's TF at each
            cloud's stamp); "" = no poses. Its edges never serve as extrinsics.
        distro: typestore for bags that carry no message definitions (old sqlite3 bags).
        strict: raise BagError on a truncated/corrupt bag instead of ending with a warning.
    """

    path: str | Path
    topics: BagTopics = field(default_factory=BagTopics)
    slop_s: float = 0.05
    queue_size: int = 10
    T_cam_lidar: np.ndarray | None = None
    odom_frame: str = ODOM_FRAME
    distro: str = "humble"
    strict: bool = False
    stats: SyncStats = field(default_factory=SyncStats, init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.exists():
            raise BagError(f"bag {self.path} does not exist")
        if self.slop_s <= 0 or self.queue_size < 1:
            raise BagError(f"slop_s must be > 0 and queue_size >= 1, got {self.slop_s}, {self.queue_size}")
        self._reset(None)

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
            for conn, log_time, raw in self._iter(reader, conns):
                msg = self._deserialize(reader, raw, conn, log_time)
                for _, parent, child, T in ros_msgs.tf_message_transforms(msg) if msg else ():
                    # An odometry edge moves: its first value is no camera-LiDAR mount.
                    if self.odom_frame and self.odom_frame in (parent, child):
                        continue
                    if (parent, child) not in seen:
                        seen.add((parent, child))
                        tree.add(parent, child, T)
        return tree

    def _tf_history(self, reader, topics: BagTopics) -> TfHistory | None:
        """Every /tf_static edge and /tf sample of the bag (one pass over the TF topics), for the
        poses; None when poses are off or the bag has no /tf. A malformed transform is skipped
        with a warning (its frames may then lack a pose)."""
        if not self.odom_frame:
            return None
        conns = [c for c in reader.connections
                 if c.topic in (topics.tf_static, topics.tf) and c.msgtype == TF_TYPE]
        if not any(c.topic == topics.tf for c in conns):
            return None
        history = TfHistory()
        for conn, log_time, raw in self._iter(reader, conns):
            msg = self._deserialize(reader, raw, conn, log_time)
            if msg is None:
                continue
            try:
                transforms = ros_msgs.tf_message_transforms(msg)
            except MessageError as exc:
                log.warning("%s message at %.3f s skipped: %s", conn.topic, log_time * 1e-9, exc)
                continue
            for stamp, parent, child, T in transforms:
                if conn.topic == topics.tf_static:
                    history.add_static(parent, child, T)
                else:
                    history.add(stamp, parent, child, T)
        return history

    # -- streaming sync -----------------------------------------------------------------------------

    def _mcap_files(self) -> list[Path] | None:
        """The bag's MCAP storage files in order, or None when the bag is not (only) MCAP or
        is file-compressed (then rosbags reads it)."""
        if self.path.is_file():
            return [self.path] if self.path.suffix == ".mcap" else None
        meta_path = self.path / "metadata.yaml"
        try:
            import yaml

            meta = yaml.safe_load(meta_path.read_text(encoding="utf-8"))["rosbag2_bagfile_information"]
            if meta.get("storage_identifier") != "mcap":
                return None
            if str(meta.get("compression_mode", "") or "").lower() not in ("", "none"):
                return None  # file or message compression: rosbags decompresses it
            files = [self.path / Path(str(name)).name for name in meta["relative_file_paths"]]
        except Exception:
            return None  # rosbags' own open decides what is wrong with it
        return files if files and all(f.suffix == ".mcap" and f.is_file() for f in files) else None

    def _iter(self, reader, conns) -> Iterator[tuple[Any, int, bytes]]:
        """(connection, log time ns, raw CDR) of ``conns`` in log-time order.

        MCAP bags go chunk by chunk (corrupt chunks skipped and counted, see the module
        docstring); other bags through rosbags, a mid-file failure becoming a recorded (or,
        with ``strict``, raised) truncation.
        """
        files = self._mcap_files()
        if files is not None:
            readers: list[McapChunkReader] | None = []
            try:
                for f in files:
                    readers.append(McapChunkReader(f))
            except (McapFormatError, OSError) as exc:
                log.debug("%s: chunk-level reading unavailable (%s); reading through rosbags",
                          self.path, exc)
                for r in readers:
                    r.close()
                readers = None
            if readers is not None:
                try:
                    yield from self._iter_mcap(readers, conns)
                finally:
                    for r in readers:
                        r.close()
                return
        try:
            yield from reader.messages(connections=conns)
        except Exception as exc:
            self.stats.truncated = True
            self.stats.error = f"{type(exc).__name__}: {exc}"
            if self.strict:
                raise BagError(f"bag {self.path} is corrupt or truncated: {self.stats.error}") from exc
            log.warning("bag %s ended early (corrupt or truncated): %s", self.path, self.stats.error)

    def _iter_mcap(self, readers: list[McapChunkReader], conns) -> Iterator[tuple[Any, int, bytes]]:
        """Merge the chunks of every file in log-time order, opening a chunk only when the
        merge reaches its start time (memory: the chunks that overlap in time)."""
        wanted: dict[tuple[str, str], Any] = {}
        for c in conns:
            wanted.setdefault((c.topic, c.msgtype), c)
        order = []
        for fi, r in enumerate(readers):
            if r.summary_error and self.stats.summary_error is None:
                self.stats.summary_error = f"{r.path.name}: {r.summary_error}"
            cmap = {cid: conn for cid, ch in r.channels.items()
                    if (conn := wanted.get((ch.topic, ch.schema_name))) is not None}
            # Only the chunks that hold a wanted channel (a chunk index without message index
            # offsets says nothing: read it).
            order += [(ck.message_start_time, fi, ck.ordinal, r, ck, cmap) for ck in r.chunks
                      if cmap and (not ck.message_index_offsets
                                   or any(cid in cmap for cid in ck.message_index_offsets))]
        order.sort(key=lambda e: e[:3])
        heap: list[tuple[int, int, int, int, Any, bytes]] = []
        nxt = 0
        while heap or nxt < len(order):
            # Open every chunk that starts no later than the earliest pending message.
            while nxt < len(order) and (not heap or order[nxt][0] <= heap[0][0]):
                _, fi, ordinal, r, ck, cmap = order[nxt]
                nxt += 1
                try:
                    msgs = r.messages(ck)
                except ChunkError as exc:
                    self._lost_chunk(r, fi, ck, cmap, exc)
                    continue
                for i, (cid, log_time, raw) in enumerate(msgs):
                    conn = cmap.get(cid)
                    if conn is not None:
                        heapq.heappush(heap, (log_time, fi, ordinal, i, conn, raw))
            if heap:
                log_time, _, _, _, conn, raw = heapq.heappop(heap)
                yield conn, log_time, raw

    def _lost_chunk(self, r: McapChunkReader, fi: int, ck, cmap: dict[int, Any],
                    exc: ChunkError) -> None:
        """Count a chunk that cannot be used and what it held (for this pass's connections)."""
        s = self.stats
        key = (fi, ck.ordinal)
        first = key not in self._bad_chunks
        self._bad_chunks.add(key)
        if self.strict:
            raise BagError(f"bag {self.path}: chunk {ck.ordinal} of {r.path.name} (offset "
                           f"{ck.chunk_start_offset}) is unusable: {exc}") from exc
        held = r.indexed_messages(ck)
        lost: dict[str, int] = {}
        for cid, log_time in held or ():
            conn = cmap.get(cid)
            if conn is None or (key, cid) in self._lost_counted:
                continue
            lost[conn.topic] = lost.get(conn.topic, 0) + 1
            if conn.topic == self._cloud_topic:
                s.skip_frame("corrupt_chunk", None, log_time,
                             f"chunk {ck.ordinal} of {r.path.name}: {exc.reason}")
        for cid in cmap:  # this pass's channels: a later pass over them counts nothing twice
            self._lost_counted.add((key, cid))
        for topic, n in lost.items():
            s.lost_messages[topic] = s.lost_messages.get(topic, 0) + n
        if first:
            s.corrupt_chunks += 1
            if held is None:
                s.lost_unknown_chunks += 1
            if len(s.chunk_errors) < MAX_SKIP_LOG:
                s.chunk_errors.append({
                    "file": r.path.name, "offset": ck.chunk_start_offset,
                    "start_ns": ck.message_start_time, "end_ns": ck.message_end_time,
                    "reason": exc.reason, "detail": str(exc), "lost": dict(lost)})
            log.warning("bag %s: chunk %d of %s (%.3f-%.3f s) skipped: %s; %s", self.path,
                        ck.ordinal, r.path.name, ck.message_start_time * 1e-9,
                        ck.message_end_time * 1e-9, exc,
                        f"it held {sum(lost.values())} of the messages read ({lost})"
                        if held is not None else "its message index is unreadable too")
        elif lost:
            for rec in s.chunk_errors:
                if rec["file"] == r.path.name and rec["offset"] == ck.chunk_start_offset:
                    for topic, n in lost.items():
                        rec["lost"][topic] = rec["lost"].get(topic, 0) + n

    def _deserialize(self, reader, raw: bytes, conn, log_time: int) -> Any | None:
        try:
            return reader.deserialize(raw, conn.msgtype)
        except Exception as exc:
            self.stats.undecodable += 1
            log.warning("undecodable %s message on %s skipped: %s", conn.msgtype, conn.topic, exc)
            if conn.topic == self._cloud_topic:
                self.stats.skip_frame("undecodable", None, log_time, f"{type(exc).__name__}: {exc}")
            return None

    def _synced(self, reader, topics: BagTopics) -> Iterator[_Synced]:
        conns = [c for c in reader.connections
                 if c.topic in (topics.image, topics.camera_info, topics.cloud)]
        slop = int(round(self.slop_s * 1e9))
        images: deque[tuple[int, Any]] = deque()
        infos: deque[tuple[int, Any]] = deque(maxlen=self.queue_size)
        pending: deque[tuple[int, int, Any]] = deque()
        last_cloud: int | None = None
        s = self.stats

        def resolve(final: bool) -> Iterator[_Synced]:
            while pending:
                stamp, log_time, cloud = pending[0]
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
                    s.skip_frame("no_image", stamp, log_time,
                                 "no image within the slop" if best is None else
                                 f"nearest image {abs(best[0] - stamp) * 1e-6:.1f} ms away")
                    continue
                info = min(infos, key=lambda m: abs(m[0] - best[0]), default=None)
                if info is None:
                    s.no_camera_info += 1
                    s.skip_frame("no_camera_info", stamp, log_time, "no CameraInfo seen yet")
                    continue
                s.synced += 1
                yield _Synced(cloud, best[1], info[1], stamp, log_time)

        for conn, log_time, raw in self._iter(reader, conns):
            msg = self._deserialize(reader, raw, conn, log_time)
            if msg is None:
                continue
            stamp = ros_msgs.stamp_to_ns(msg.header)
            if conn.topic == topics.cloud:
                s.clouds += 1
                if last_cloud is not None and stamp <= last_cloud:
                    if stamp == last_cloud:
                        s.duplicate += 1
                        s.skip_frame("duplicate", stamp, log_time, "same stamp as the previous cloud")
                    else:
                        s.out_of_order += 1
                        s.skip_frame("out_of_order", stamp, log_time,
                                     f"{(last_cloud - stamp) * 1e-6:.1f} ms before the previous cloud")
                    log.debug("cloud at %d after %d skipped", stamp, last_cloud)
                    continue
                last_cloud = stamp
                pending.append((stamp, log_time, msg))
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

    def _reset(self, cloud_topic: str | None) -> None:
        self.stats = SyncStats()
        self._cloud_topic = cloud_topic
        self._bad_chunks: set[tuple[int, int]] = set()
        self._lost_counted: set[tuple[tuple[int, int], int]] = set()

    def frames(self) -> Iterator[Frame]:
        """Synchronized Frames in stamp order. ``self.stats`` counts what was skipped and why
        (see :class:`SyncStats`: every cloud that gives no Frame is counted with its reason)."""
        self._reset(None)
        reader = self._open()
        try:
            topics = self._resolve_topics(reader)
            self._cloud_topic = topics.cloud
            tree = self._transform_tree(reader, topics) if self.T_cam_lidar is None else None
            history = self._tf_history(reader, topics)
            extrinsics: dict[tuple[str, str], np.ndarray] = {}
            seq = 0
            for synced in self._synced(reader, topics):
                try:
                    frame = self._to_frame(synced, tree, extrinsics, seq)
                    if history is not None:
                        pose = history.lookup(self.odom_frame, frame.lidar_frame_id, synced.stamp_ns)
                        frame.pose = None if pose is None else check_rigid(pose, "odometry pose")
                except (FrameError, MessageError) as exc:
                    self.stats.bad_frame += 1
                    self.stats.skip_frame("bad_frame", synced.stamp_ns, synced.log_time_ns, str(exc))
                    log.warning("frame at %d s skipped: %s", synced.stamp_ns * 1e-9, exc)
                    continue
                self.stats.dropped_points += frame.dropped_points
                self.stats.dropped_far += frame.dropped_far
                self.stats.zeroed_intensity += frame.zeroed_intensity
                self.stats.frames_without_pose += frame.pose is None
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
        self._reset(None)
        reader = self._open()
        try:
            try:
                self._cloud_topic = self._resolve_topics(reader).cloud
            except BagError:
                pass  # reported below as sync_error
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
