"""One synchronized Image + CameraInfo + PointCloud2 <-> Frame, and a Prediction -> the output
clouds: the conversions the node, the bag reader and the labeled-bag writer share.

Message layouts themselves live in ``io/point_cloud2.py`` (clouds) and ``io/ros_msgs.py`` (the
rest); this module composes them. Messages may be rclpy or rosbags objects (duck-typed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pl3d_ros.frame import Frame, Prediction
from pl3d_ros.io import point_cloud2, ros_msgs


def frame_from_messages(image: Any, camera_info: Any, cloud: Any, T_cam_lidar: np.ndarray, *,
                        seq: int = 0, intensity_field: str | None = None,
                        camera_frame: str | None = None, with_labels: bool = False) -> Frame:
    """One synchronized Image + CameraInfo + PointCloud2 -> Frame.

    The stamp is the cloud's. ``with_labels`` reads a per-point ``label`` field as ground truth
    (recorded evaluation bags). Raises FrameError / msg_common.MessageError on malformed input.
    """
    camera = ros_msgs.camera_model_from_info(camera_info, T_cam_lidar, frame_id=camera_frame)
    points, extra = point_cloud2.cloud_to_points(cloud, intensity_field or None)
    return Frame(ros_msgs.stamp_to_ns(cloud.header), points, ros_msgs.image_to_rgb(image), camera,
                 labels=extra.get("label") if with_labels else None, seq=seq,
                 lidar_frame_id=str(cloud.header.frame_id))


def output_arrays(frame: Frame, prediction: Prediction, palette: Any | None = None, *,
                  segmentation: bool = True, visualization: bool = True
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The two output clouds as structured arrays, each built only if wanted (has subscribers):
    segmentation (x y z intensity label confidence) and visualization (the same + packed rgb).

    palette: a ``labels.ClassSet`` (its ``colorize``) for the visualization cloud's rgb field.
    """
    seg = vis = None
    if segmentation:
        seg = point_cloud2.segmentation_cloud_array(frame.points, prediction.labels, prediction.confidence)
    if visualization:
        if palette is None:
            from pl3d_ros.labels import load_class_set

            palette = load_class_set()
        vis = point_cloud2.segmentation_cloud_array(frame.points, prediction.labels, prediction.confidence,
                                                    rgb=palette.colorize(prediction.labels))
    return seg, vis
