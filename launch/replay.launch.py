"""Replay a camera+LiDAR bag through the pl3d_ros node on sim time, with RViz.

    ros2 launch pl3d_ros replay.launch.py bag:=/tmp/s00 model:=/path/model.safetensors

Runs ``ros2 bag play <bag> --clock 40 --rate R`` (the bag before the options: ``--clock`` takes an
optional frequency and would swallow a path written after it), the node with use_sim_time:=true
(pipeline latency is then measured against the bag's clock) and RViz. The bag starts after
``start_delay`` seconds so that the node has loaded its model; /tf_static is replayed latched,
so the extrinsics arrive whenever the node subscribes.
"""

from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription,
                            TimerAction)
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare

PACKAGE = "pl3d_ros"


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    play = ExecuteProcess(
        cmd=["ros2", "bag", "play", LaunchConfiguration("bag"), "--clock", "40",
             "--rate", LaunchConfiguration("rate")],
        output="screen",
    )
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch", "pl3d.launch.py"])),
        launch_arguments={
            "params_file": LaunchConfiguration("params_file"),
            "model": LaunchConfiguration("model"),
            "use_sim_time": "true",
            "rviz": LaunchConfiguration("rviz"),
            "image_topic": LaunchConfiguration("image_topic"),
            "camera_info_topic": LaunchConfiguration("camera_info_topic"),
            "pointcloud_topic": LaunchConfiguration("pointcloud_topic"),
        }.items(),
    )
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="bag folder, .mcap or .db3 (e.g. from pl3d kitti2bag)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate"),
        DeclareLaunchArgument("start_delay", default_value="3.0",
                              description="seconds between starting the node and the bag"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([share, "config", "pl3d.yaml"])),
        DeclareLaunchArgument("model", default_value=""),
        DeclareLaunchArgument("rviz", default_value="true"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw"),
        DeclareLaunchArgument("camera_info_topic", default_value="/camera/camera_info"),
        DeclareLaunchArgument("pointcloud_topic", default_value="/lidar/points"),
        node,
        TimerAction(period=LaunchConfiguration("start_delay"), actions=[play]),
    ])
