"""package.xml and setup.py as a robot installs them: rosdep keys, the MCAP storage plugin, no
declared-but-unused ROS packages, numpy below 2, TensorRT extras per CUDA major."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

#: pip requirement -> its rosdep key (ros/rosdistro rosdep/python.yaml; Ubuntu package names).
ROSDEP_KEYS = {"numpy": "python3-numpy", "pyyaml": "python3-yaml", "pillow": "python3-pil",
               "scipy": "python3-scipy", "scikit-image": "python3-skimage",
               "matplotlib": "python3-matplotlib", "tqdm": "python3-tqdm", "numba": "python3-numba"}
#: ROS packages that are Python modules: declared only if something imports them.
ROS_PYTHON_PACKAGES = ("rclpy", "message_filters", "tf2_ros", "diagnostic_updater",
                       "sensor_msgs_py", "ament_index_python", "launch", "launch_ros")


def exec_depends() -> list[str]:
    root = ET.parse(REPO / "package.xml").getroot()
    return [e.text.strip() for e in root.iter("exec_depend")]


def setup_kwargs() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("install_requires", "extras_require")}


def imported_modules() -> set[str]:
    names = set()
    for path in list((REPO / "pl3d_ros").rglob("*.py")) + list((REPO / "launch").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_mcap_storage_plugin_is_a_dependency():
    assert "rosbag2_storage_mcap" in exec_depends()  # Humble's defaults are sqlite3 only


def test_python_dependencies_have_their_rosdep_keys():
    deps = exec_depends()
    reqs = {Requirement(r).name.lower() for r in setup_kwargs()["install_requires"]}
    for pip_name, key in ROSDEP_KEYS.items():
        assert pip_name in reqs
        assert key in deps, f"{pip_name} has rosdep key {key}, not in package.xml"


def test_no_ros_python_package_declared_that_nothing_imports():
    used = imported_modules()
    unused = [d for d in exec_depends() if d in ROS_PYTHON_PACKAGES and d not in used]
    assert not unused, f"declared in package.xml but never imported: {unused}"
    assert len(set(exec_depends())) == len(exec_depends())  # no duplicates


def test_numpy_stays_below_2():
    (numpy,) = [Requirement(r) for r in setup_kwargs()["install_requires"] if r.startswith("numpy")]
    assert "1.26.4" in numpy.specifier  # Jazzy's python3-numpy
    assert "2.0.0" not in numpy.specifier and "2.3.1" not in numpy.specifier


@pytest.mark.parametrize("extra,dist", [("trt-cu12", "tensorrt-cu12"), ("trt-cu13", "tensorrt-cu13"),
                                        ("trt", "tensorrt-cu12")])
def test_tensorrt_extras_name_their_cuda_build(extra, dist):
    (req,) = [Requirement(r) for r in setup_kwargs()["extras_require"][extra]]
    assert req.name == dist  # never the bare `tensorrt`, which resolves to the newest CUDA build
    assert "10.16.1.11" in req.specifier and "11.0.0" not in req.specifier
    assert re.fullmatch(r"tensorrt-cu1[23]", req.name)
