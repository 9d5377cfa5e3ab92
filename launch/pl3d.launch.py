"""Launch the pl3d_ros node (and optionally RViz).

    ros2 launch pl3d_ros pl3d.launch.py model:=/path/model.safetensors \\
        image_topic:=/camera/image_raw camera_info_topic:=/camera/camera_info \\
        pointcloud_topic:=/lidar/points rviz:=true

Arguments: params_file (default: the installed config/pl3d.yaml), model (a checkpoint; empty keeps
the params file's runtime.model), use_sim_time, rviz, rviz_config, and the three input topics,
remapped onto the node's ~/input/image, ~/input/camera_info and ~/input/pointcloud.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "pl3d_ros"
TRUE = ("true", "1", "yes", "on")


def _node(context, *args, **kwargs):
    """The node, built once the arguments are known: ``model`` overrides only when given, so an
    empty argument does not clobber runtime.model from the params file."""
    cfg = context.launch_configurations
    use_sim_time = cfg["use_sim_time"].lower() in TRUE
    overrides = {"use_sim_time": use_sim_time}
    if cfg["model"]:
        overrides["runtime.model"] = cfg["model"]
    return [Node(
        package=PACKAGE,
        executable="pl3d_node",
        name="pl3d_node",
        output="screen",
        emulate_tty=True,
        parameters=[cfg["params_file"], overrides],  # later entries win
        remappings=[
            ("~/input/image", cfg["image_topic"]),
            ("~/input/camera_info", cfg["camera_info_topic"]),
            ("~/input/pointcloud", cfg["pointcloud_topic"]),
        ],
    )]


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([share, "config", "pl3d.yaml"]),
                              description="ROS parameters file (pl3d_node: ros__parameters: ...)"),
        DeclareLaunchArgument("model", default_value="",
                              description="checkpoint (.safetensors); empty: the params file's "
                                          "runtime.model"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="follow /clock (true when replaying a bag with --clock)"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz"),
        DeclareLaunchArgument("rviz_config",
                              default_value=PathJoinSubstitution([share, "rviz", "pl3d.rviz"])),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw"),
        DeclareLaunchArgument("camera_info_topic", default_value="/camera/camera_info"),
        DeclareLaunchArgument("pointcloud_topic", default_value="/lidar/points"),
        OpaqueFunction(function=_node),
        Node(
            package="rviz2",
            executable="rviz2",
            name="rviz2",
            arguments=["-d", LaunchConfiguration("rviz_config")],
            parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
            condition=IfCondition(LaunchConfiguration("rviz")),
            output="log",
        ),
    ])
