"""pl3d_ros: an ament_python package that also installs with plain pip (no ROS needed).

ROS 2 dependencies (rclpy, message_filters, ...) come from package.xml / rosdep, never from pip:
they are imported only by pl3d_ros/node.py.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "pl3d_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Online camera+LiDAR 3D semantic segmentation with source-free adaptation for ROS 2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(exclude=["test", "test.*", "bench", "bench.*"]),
    package_data={PACKAGE: ["classes/*.yaml", "weights/*.safetensors", "weights/*.md"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    install_requires=[
        # Below 2: ROS 2's generated message modules (rosidl_generator_py's C extensions) are
        # compiled against the distro's numpy 1.x (Humble 1.21, Jazzy 1.26) and fail to import
        # under numpy 2. A 1.x installed over Humble's 1.21 is ABI-compatible with them.
        "numpy>=1.24,<2",
        "pyyaml>=6.0",
        "pillow>=9.0",
        "rosbags>=0.10.4",
        "tqdm>=4.60",
        # The PyPI torch build (CUDA-enabled; runs on CPU where there is no GPU). torchvision,
        # which segment-anything needs, only works with this build, not a local CPU-only wheel.
        "torch>=2.1",
        "torchvision>=0.16",
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "safetensors>=0.4",
        # The per-point passes of pre- and postprocessing on the CPU (pl3d_ros/cpu_kernels.py)
        "numba>=0.58",
        "scipy>=1.10",  # KD-trees for propagation
        "scikit-image>=0.21",  # Felzenszwalb superpixels, the default mask provider
        "matplotlib>=3.7",  # report plots (Agg backend, headless)
        # `pl3d bench` runs each cell of its grid as a Ray task: locally (ray.init with N workers)
        # or on a cluster (--address / RAY_ADDRESS). The core package only; no dashboard extras.
        "ray>=2.40",
        # Mask providers: SAM (vit_b/l/h) and MobileSAM (vit_t; its module needs timm).
        "segment-anything>=1.0",
        "mobilesam-mirror",
        "timm>=0.9",
        "setuptools",
    ],
    extras_require={
        # GPU inference: TensorRT 10 (11 dropped the FP16 builder flag this code uses). GPU buffers
        # are torch CUDA tensors, so CuPy is not needed. Install where an NVIDIA GPU is present,
        # the build for torch's CUDA major (python -c "import torch; print(torch.version.cuda)"):
        # plain `tensorrt>=10,<11` now resolves to a CUDA 13 build (10.16 needs tensorrt_cu13 and
        # driver R580+), which a CUDA 12 torch or machine cannot use. The backend refuses a
        # mismatch with the extra to install. Jetson (JetPack 6: TensorRT 10.3, CUDA 12.6): no pip
        # wheel works there; use JetPack's TensorRT (README, "Running on a robot").
        "trt-cu12": ["tensorrt-cu12>=10.0,<11"],
        "trt-cu13": ["tensorrt-cu13>=10.13.2,<11"],  # 10.13.2: the first CUDA 13 wheels
        "trt": ["tensorrt-cu12>=10.0,<11"],  # the CUDA 12 build; kept for '.[trt]' instructions
        # mcap: the reference MCAP reader, which the tests use to check the bags' CRCs.
        "dev": ["pytest>=7.4", "mcap>=1.1"],
    },
    zip_safe=True,
    entry_points={
        "console_scripts": [
            "pl3d = pl3d_ros.cli:main",
            "pl3d_node = pl3d_ros.node:main",
        ],
    },
)
