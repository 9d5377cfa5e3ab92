"""The pl3d_ros ROS 2 node: parameters, subscriptions, publishers, services, diagnostics.

    ros2 run pl3d_ros pl3d_node --ros-args --params-file config/pl3d.yaml \\
        -p runtime.model:=model.safetensors -r ~/input/image:=/camera/image_raw ...
    ros2 launch pl3d_ros pl3d.launch.py model:=model.safetensors

Thin glue, and the only module that imports rclpy, message_filters, tf2_ros, diagnostic_updater,
std_srvs or the ROS message packages. Everything that decides something lives in ROS-free code
the tests run: ``app.py`` (segmenter, adapter, weight deployer), ``runner.py`` (inference
thread, latest-frame slot), ``health.py`` (diagnostics), ``cpu_budget.py`` (threads and
priorities), ``ros_params.py`` (parameters from the settings' declarations, QoS presets),
``io/extrinsics.py`` (tf2 cache), ``io/odometry.py`` (odometry poses: validation, counts),
``io/frames.py`` (messages -> Frame, Prediction -> output clouds), ``io/point_cloud2.py``
(PointCloud2 layouts) and ``io/ros_msgs.py`` (every other message layout, the builders).

Threads: a SingleThreadedExecutor runs the subscriptions (the synchronizer callback only converts
a synced set into a Frame and puts it in the runner's depth-1 slot), the tf2 retry timer, the
services and the diagnostics timer; the runner's inference thread publishes the outputs and the
debug topics (publishing from a non-executor thread is allowed); the adapter has its own thread;
service work (reset, save) runs on the runner's service thread and the services answer at once.
Every callback is wrapped by a CallbackGuard: an exception is logged (throttled) and counted in
the diagnostics, and never ends ``spin()``. The library's Python logging goes to the ROS logger.

Topics (relative to the node, remappable):
    in   ~/input/image, ~/input/camera_info, ~/input/pointcloud   (QoS: qos.input)
    out  ~/output/pointcloud/segmentation    x y z intensity label(uint8) confidence(float32)
         ~/output/pointcloud/visualization   the same + rgb (packed float32)   (QoS: qos.output)
         ~/debug/processing_time/{preprocess,inference,postprocess,output,total}_ms,
         ~/debug/pipeline_latency_ms, ~/debug/cyclic_time_ms   (std_msgs/Float64)
    /diagnostics: "processing_time" and "adaptation"
Services: ~/reset_adaptation, ~/save_checkpoint (std_srvs/Trigger; accepted at once, done in the
background, outcome logged).
"""

from __future__ import annotations

import array
import logging
import sys
from dataclasses import dataclass
from typing import Any

import message_filters
import numpy as np
import rclpy
import rclpy.logging
import rclpy.time
import tf2_ros
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import Quaternion, Transform, TransformStamped, Vector3
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField, RegionOfInterest
from std_msgs.msg import Float64, Header
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from pl3d_ros.app import build
from pl3d_ros.config import Config, ConfigError
from pl3d_ros.frame import FrameError
from pl3d_ros.guard import CallbackGuard
from pl3d_ros.health import FrameTiming
from pl3d_ros.io.extrinsics import Extrinsics
from pl3d_ros.io.frames import frame_from_messages, output_arrays
from pl3d_ros.io.msg_common import MessageError
from pl3d_ros.io.odometry import OdometryPoses
from pl3d_ros.io.ros_msgs import MessageFactory, make_cloud, make_header
from pl3d_ros.ros_logging import bridge_logging
from pl3d_ros.ros_params import config_from_parameters, parameter_specs, qos_settings
from pl3d_ros.runner import Runner, RunnerSettings

NODE_NAME = "pl3d_node"
DEBUG_STAGES = ("preprocess", "inference", "postprocess", "output", "total")
_LEVELS = {0: DiagnosticStatus.OK, 1: DiagnosticStatus.WARN, 2: DiagnosticStatus.ERROR}


@dataclass(frozen=True)
class RclpyMessageFactory(MessageFactory):
    """ros_msgs' builders, making rclpy messages.

    rclpy's uint8[] setter keeps an ``array.array('B')`` as is but checks any other value element
    by element; ``frombytes`` fills one from the numpy buffer in a single copy (the
    ``array.array('B', memoryview(...))`` constructor iterates, ~40x slower for a cloud).
    """

    def bytes_field(self, data: np.ndarray) -> Any:
        out = array.array("B")
        out.frombytes(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1))
        return out


def rclpy_factory() -> RclpyMessageFactory:
    return RclpyMessageFactory(
        Header=Header, Time=Time, PointCloud2=PointCloud2, PointField=PointField, Image=Image,
        CameraInfo=CameraInfo, RegionOfInterest=RegionOfInterest, TFMessage=TFMessage,
        TransformStamped=TransformStamped, Transform=Transform, Vector3=Vector3,
        Quaternion=Quaternion,
    )


def make_qos(preset: str, depth: int) -> QoSProfile:
    """rclpy QoSProfile of a ``qos.*`` preset (mapping in ros_params.qos_settings)."""
    s = qos_settings(preset, depth)
    return QoSProfile(
        depth=s["depth"], history=HistoryPolicy.KEEP_LAST,
        reliability=(ReliabilityPolicy.RELIABLE if s["reliability"] == "reliable"
                     else ReliabilityPolicy.BEST_EFFORT),
        durability=DurabilityPolicy.VOLATILE,
    )


class Pl3dNode(Node):
    """Glue between ROS and the Runner (module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.cfg = self._declare_and_read_parameters()
        cfg = self.cfg
        log = self.get_logger()

        try:
            self.app = build(cfg)
        except ConfigError:
            raise
        except Exception as exc:  # labels first: run without adaptation rather than not at all
            log.error(f"adaptation ({cfg.adapt.method}) unavailable, running the source model: "
                      f"{type(exc).__name__}: {exc}")
            self.app = build(cfg, adapt=False)
        app = self.app
        self.segmenter = app.segmenter
        self.class_set = app.header.class_set
        adapter = app.adapter
        budget = app.budget
        self.factory = rclpy_factory()
        self.guard = CallbackGuard(logger=logging.getLogger("pl3d_ros.node"))
        guard = self.guard.wrap
        self.extrinsics = Extrinsics.from_config(cfg)
        self.odometry = OdometryPoses.from_config(cfg)
        self._seq = 0
        self._waiting_tf = 0
        self._rejected = 0

        out_qos = make_qos(cfg.qos.output, cfg.qos.output_depth)
        self.pub_seg = self.create_publisher(PointCloud2, "~/output/pointcloud/segmentation", out_qos)
        self.pub_vis = self.create_publisher(PointCloud2, "~/output/pointcloud/visualization", out_qos)
        self.pub_debug: dict[str, Any] = {}
        if cfg.node.debug_topics:
            for stage in DEBUG_STAGES:
                self.pub_debug[stage] = self.create_publisher(
                    Float64, f"~/debug/processing_time/{stage}_ms", 1)
            self.pub_debug["latency"] = self.create_publisher(Float64, "~/debug/pipeline_latency_ms", 1)
            self.pub_debug["cyclic"] = self.create_publisher(Float64, "~/debug/cyclic_time_ms", 1)

        self.runner = Runner(
            self.segmenter, self._publish, adapter, deployer=app.deployer,
            settings=RunnerSettings.from_config(cfg, adapting=adapter is not None),
            on_timing=self._publish_timing if self.pub_debug else None,
            stamp_clock=lambda: self.get_clock().now().nanoseconds,  # sim time: 0 until the first /clock
        )

        if self.extrinsics.static is None or self.odometry.enabled:
            self.tf_buffer = tf2_ros.Buffer()
            self.tf_listener = tf2_ros.TransformListener(self.tf_buffer, self)
        if self.extrinsics.static is None:
            self.tf_timer = self.create_timer(cfg.frames.tf_retry_s, guard("tf_lookup", self._lookup_transforms))

        in_qos = make_qos(cfg.qos.input, cfg.qos.input_depth)  # explicit: the default is RELIABLE
        self.subs = [
            message_filters.Subscriber(self, Image, cfg.topics.image, qos_profile=in_qos),
            message_filters.Subscriber(self, CameraInfo, cfg.topics.camera_info, qos_profile=in_qos),
            message_filters.Subscriber(self, PointCloud2, cfg.topics.pointcloud, qos_profile=in_qos),
        ]
        self.sync = message_filters.ApproximateTimeSynchronizer(
            self.subs, cfg.sync.queue_size, cfg.sync.slop_s)
        self.sync.registerCallback(guard("synced_input", self._on_synced))

        self.create_service(Trigger, "~/reset_adaptation",
                            guard("reset_adaptation", self._srv_reset, fallback=_failed_response))
        self.create_service(Trigger, "~/save_checkpoint",
                            guard("save_checkpoint", self._srv_save, fallback=_failed_response))
        self._setup_diagnostics()
        log.info(f"backend {cfg.runtime.backend}, classes {self.class_set.name}, adaptation "
                 f"{'on (' + cfg.adapt.method + ')' if adapter else 'off'}, threads {budget}; "
                 f"inputs {[s.sub.topic_name for s in self.subs]}")

    # -- parameters ---------------------------------------------------------------------------------

    def _declare_and_read_parameters(self) -> Config:
        """Declare every Config leaf (read-only: settings are read once), read back, validate."""
        specs = parameter_specs()
        declarations = []
        for spec in specs:
            descriptor = ParameterDescriptor(description=spec.description,
                                             additional_constraints=spec.constraints, read_only=True)
            # An empty-list default would be inferred as BYTE_ARRAY: declare those by type.
            second = Parameter.Type[spec.type_name] if spec.declare_by_type else spec.ros_default
            declarations.append((spec.name, second, descriptor))
        declared = self.declare_parameters("", declarations)
        return config_from_parameters({p.name: p.value for p in declared}, specs)

    # -- input ----------------------------------------------------------------------------------------

    def _on_synced(self, image: Image, info: CameraInfo, cloud: PointCloud2) -> None:
        """Synced set -> Frame -> the runner's slot. Runs inside the synchronizer's lock: cheap."""
        camera, lidar = self.extrinsics.frames(info.header.frame_id or image.header.frame_id,
                                               cloud.header.frame_id)
        T = self.extrinsics.get(camera, lidar)
        if T is None:
            self._waiting_tf += 1
            self.get_logger().warning(f"waiting for the transform {lidar} -> {camera} (tf2, or set "
                                   "frames.static_extrinsics); frame skipped",
                                   throttle_duration_sec=5.0)
            return
        try:
            frame = frame_from_messages(image, info, cloud, T, seq=self._seq,
                                        intensity_field=self.cfg.node.intensity_field or None,
                                        camera_frame=camera)
        except (FrameError, MessageError) as exc:
            self._rejected += 1
            self.get_logger().warning(f"synced set rejected: {exc}", throttle_duration_sec=5.0)
            return
        if self.odometry.enabled:
            frame.pose = self._odometry_pose(lidar, cloud)
        self._seq += 1
        self.runner.submit(frame)

    def _odometry_pose(self, lidar: str, cloud: PointCloud2) -> np.ndarray | None:
        """T_odom_lidar at the cloud's stamp from tf2, or None (counted). Buffer.lookup_transform's
        timeout defaults to zero: it checks the buffer once and never waits, so the executor
        (and the synchronizer's lock) is never held here. tf2 interpolates between the
        neighbouring samples; a stamp past the newest one raises an ExtrapolationException."""
        try:
            ts = self.tf_buffer.lookup_transform(self.odometry.odom_frame, lidar, cloud.header.stamp)
        except tf2_ros.TransformException as exc:
            self.odometry.missed(str(exc))
            self.get_logger().warning(f"no odometry {lidar} -> {self.odometry.odom_frame} at the cloud's "
                                      f"stamp: {exc}; frame goes on without a pose",
                                      throttle_duration_sec=5.0)
            return None
        return self.odometry.found(ts)

    def _lookup_transforms(self) -> None:
        """Timer: look up wanted camera <- LiDAR transforms (latest, non-blocking), cache them."""
        for camera, lidar in self.extrinsics.wanted():
            try:
                ts = self.tf_buffer.lookup_transform(camera, lidar, rclpy.time.Time())
            except tf2_ros.TransformException as exc:
                self.get_logger().warning(f"transform {lidar} -> {camera} not available yet: {exc}",
                                       throttle_duration_sec=5.0)
                continue
            try:
                self.extrinsics.store_transform(ts)
            except (FrameError, MessageError) as exc:
                self.get_logger().error(f"transform {lidar} -> {camera} unusable: {exc}",
                                        throttle_duration_sec=5.0)
                continue
            self.get_logger().info(f"extrinsics {lidar} -> {camera} found in tf2 and cached")

    # -- output (inference thread) ------------------------------------------------------------------

    def _publish(self, frame: Any, prediction: Any) -> None:
        want_seg = self.pub_seg.get_subscription_count() > 0
        want_vis = self.pub_vis.get_subscription_count() > 0
        if not (want_seg or want_vis):
            return
        seg, vis = output_arrays(frame, prediction, self.class_set, segmentation=want_seg,
                                 visualization=want_vis)
        header = make_header(self.factory, frame.stamp_ns, frame.lidar_frame_id)
        if seg is not None:
            self.pub_seg.publish(make_cloud(self.factory, header, seg))
        if vis is not None:
            self.pub_vis.publish(make_cloud(self.factory, header, vis))

    def _publish_timing(self, timing: FrameTiming) -> None:
        for stage, ms in timing.stages_ms.items():
            pub = self.pub_debug.get(stage)
            if pub is not None:
                pub.publish(Float64(data=float(ms)))
        if timing.pipeline_latency_ms is not None:
            self.pub_debug["latency"].publish(Float64(data=float(timing.pipeline_latency_ms)))
        if timing.cyclic_ms is not None:
            self.pub_debug["cyclic"].publish(Float64(data=float(timing.cyclic_ms)))

    # -- services --------------------------------------------------------------------------------------
    # A reset or save waits for the adaptation step in progress (seconds on a CPU): they run on the
    # runner's service thread, and the service answers at once, so the single executor thread
    # keeps taking frames, retrying tf and publishing diagnostics meanwhile.

    def _srv_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.runner.adapter is None:
            response.success, response.message = False, "adaptation is off (adapt.method is source)"
            return response
        self.runner.in_background("reset_adaptation", self.runner.reset_adaptation)
        response.success = True
        response.message = "reset to the source model requested (applied after the adaptation step in progress)"
        return response

    def _srv_save(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        path = self.cfg.adapt.checkpoint_path
        if self.runner.adapter is None or not path:
            response.success = False
            response.message = ("adaptation is off (adapt.method is source)" if self.runner.adapter is None
                                else "adapt.checkpoint_path is empty: no place to save to")
            return response
        self.runner.in_background("save_checkpoint", self.runner.save_adaptation, path)
        response.success, response.message = True, f"saving the adapted model to {path} (logged when written)"
        return response

    # -- diagnostics -----------------------------------------------------------------------------------

    def _setup_diagnostics(self) -> None:
        from diagnostic_updater import Updater

        self.updater = Updater(self, period=self.cfg.node.diagnostics_period_s)  # every release takes period
        self.updater.setHardwareID("pl3d_ros")
        guard = self.guard.wrap
        self.updater.add("processing_time", guard("diagnostics", self._diag_processing, fallback=lambda stat: stat))
        self.updater.add("adaptation", guard("diagnostics", self._diag_adaptation, fallback=lambda stat: stat))

    def _diag_processing(self, stat: Any) -> Any:
        health = self.runner.health()
        level, message = health.processing_status()
        stat.summary(_LEVELS[level], message)
        for key, value in health.processing_values().items():
            stat.add(key, value)
        stat.add("frames_waiting_for_tf", str(self._waiting_tf))
        stat.add("synced_sets_rejected", str(self._rejected))
        for key, value in self.odometry.values().items():
            stat.add(key, value)
        stat.add("callback_errors", str(self.guard.total))
        return stat

    def _diag_adaptation(self, stat: Any) -> Any:
        health = self.runner.health()
        level, message = health.adaptation_status()
        stat.summary(_LEVELS[level], message)
        for key, value in health.adaptation_values().items():
            stat.add(key, value)
        return stat

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.runner.start()

    def shutdown(self) -> None:
        """Stop the threads within node.stop_timeout_s; the adapter writes its final checkpoint
        to adapt.checkpoint_path (when set) as it stops."""
        if not self.runner.stop(self.cfg.node.stop_timeout_s):
            self.get_logger().warning(f"threads did not stop within {self.cfg.node.stop_timeout_s} s")


def _failed_response(request: Any, response: Any) -> Any:
    """What a guarded service answers when its callback raised (the error is logged)."""
    response.success, response.message = False, "failed: see the node's log"
    return response


def main(args: list[str] | None = None) -> int:
    """Entry point of ``ros2 run pl3d_ros pl3d_node`` (console script ``pl3d_node``)."""
    rclpy.init(args=args)
    bridge_logging(rclpy.logging.get_logger(NODE_NAME))  # library logs -> console, /rosout, log file
    node: Pl3dNode | None = None
    try:
        try:
            node = Pl3dNode()
        except ConfigError as exc:
            rclpy.logging.get_logger(NODE_NAME).fatal(f"invalid configuration: {exc}")
            return 2
        except Exception as exc:  # unreadable model, missing backend, ...: say what, then leave
            rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {type(exc).__name__}: {exc}")
            return 1
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        node.start()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()  # a Ctrl-C may have shut the context down already
    return 0


if __name__ == "__main__":
    sys.exit(main())
