"""Input/output: ROS message <-> numpy conversion, rosbag2 reading/writing, dataset folders."""
