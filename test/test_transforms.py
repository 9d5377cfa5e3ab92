import numpy as np
import pytest

from pl3d_ros.transforms import (TransformError, TransformTree, invert, make_transform,
                                 matrix_to_quaternion, quaternion_to_matrix)


def random_rotation(rng):
    q = rng.normal(size=4)
    return quaternion_to_matrix(q / np.linalg.norm(q))


def test_quaternion_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(50):
        R = random_rotation(rng)
        np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(R)), R, atol=1e-12)
    # 180 degree rotations are where naive trace formulas break
    for R in (np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1])):
        np.testing.assert_allclose(quaternion_to_matrix(matrix_to_quaternion(R)), R, atol=1e-12)
    assert matrix_to_quaternion(np.eye(3)).tolist() == [0, 0, 0, 1]


def test_tree_lookup_composes_along_any_path():
    rng = np.random.default_rng(2)
    T_base_lidar = make_transform(rng.normal(size=3), rng.normal(size=4))
    T_base_cam = make_transform(rng.normal(size=3), rng.normal(size=4))
    tree = TransformTree()
    tree.add("base", "lidar", T_base_lidar)
    tree.add("base", "cam", T_base_cam)
    T_cam_lidar = tree.lookup("cam", "lidar")
    np.testing.assert_allclose(T_cam_lidar, invert(T_base_cam) @ T_base_lidar, atol=1e-12)
    np.testing.assert_allclose(tree.lookup("lidar", "cam") @ T_cam_lidar, np.eye(4), atol=1e-12)
    tree.add("other", "thing", np.eye(4))
    with pytest.raises(TransformError, match="not connected"):
        tree.lookup("cam", "thing")
    with pytest.raises(TransformError, match="unknown frame"):
        tree.lookup("cam", "nowhere")
