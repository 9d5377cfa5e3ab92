"""pl3d_ros: online camera+LiDAR 3D semantic segmentation with source-free adaptation for ROS 2."""

__version__ = "0.1.0"
