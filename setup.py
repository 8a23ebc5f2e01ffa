"""depthkd_ros: one ament_python package holding depthkd_core and depthkd_ros."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "depthkd_ros"

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
TRAINING = TORCH + [
    "timm==1.0.31",
    "tensorboard==2.21.0",
    "tqdm==4.70.1",
    "onnx==1.23.2",
    "onnxscript==0.7.2",
    "kornia==0.9.0",
    "onnx2torch==1.5.15",
]
DATA = ["h5py==3.16.0", "rosbags==0.11.9"]
HF = ["transformers==5.23.0"]
# The PyPI ROS 2 Kilted wheels, for machines without a ROS install.
ROS = [
    "ros-rclpy",
    "ros-sensor-msgs",
    "ros-std-msgs",
    "ros-geometry-msgs",
    "ros-diagnostic-msgs",
    "ros-rmw-fastrtps-cpp",
]
# pytest 8: launch_testing (../shared/ros2_tools, or apt on a ROS install) is a pytest
# plugin that pytest 9 refuses (PluginValidationError on every run).
DEV = ["pytest==8.4.2", "pytest-timeout==2.4.0", "ruff==0.17.6"]
SERVE = ["fastapi==0.165.0", "uvicorn==0.54.0", "httpx==0.28.1"]
# What the two optional nodes need beyond the live depth_node (numpy, OpenCV, onnxruntime,
# rclpy). package.xml names the ones that have rosdep keys (tqdm, fastapi, uvicorn);
# torch, timm, kornia, tensorboard, onnx, onnxscript and httpx have none (or, for timm,
# only a pip key that would pull torch onto every robot): these extras install them.
# distill_node: its fine-tuning round is a training run, its gate exports ONNX, and it
# talks to the teacher over HTTP.
DISTILL = TRAINING + ["httpx==0.28.1"]
# teacher_server: torch teachers are timm models; onnxruntime serves ONNX teachers.
TEACHER = TORCH + ["timm==1.0.31"] + SERVE

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=["depthkd_core", "depthkd_core.*", "depthkd_ros", "depthkd_ros.*"]),
    package_data={"depthkd_ros": ["models/*.onnx", "models/*.pt", "models/*.json", "demo_data/**/*"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz")
         + glob("config/*.xml")),
        (f"share/{PACKAGE}/config/train", glob("config/train/*.yaml")),
        (f"share/{PACKAGE}/config/distill", glob("config/distill/*.yaml")),
        (f"share/{PACKAGE}/config/bench", glob("config/bench/*.yaml")),
    ],
    python_requires=">=3.10",
    install_requires=["numpy", "opencv-python-headless", "onnxruntime", "pyyaml", "tqdm", "setuptools"],
    extras_require={
        "training": TRAINING + DATA,
        "data": DATA,
        "hf": HF,
        "ros": ROS,
        "gpu": ["onnxruntime-gpu"],
        "serve": SERVE,
        "distill": DISTILL,
        "teacher": TEACHER,
        "dev": DEV + HF + DATA + SERVE,
    },
    zip_safe=True,
    maintainer="depthkd developers",
    maintainer_email="depthkd@example.org",
    description="Knowledge distillation of small monocular depth networks, and a ROS 2 node that runs them.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "depthkd = depthkd_core.cli:main",
            "depth_node = depthkd_ros.depth_node:main",
            "distill_node = depthkd_ros.distill_node:main",
            "teacher_server = depthkd_ros.teacher_server:main",
        ],
        # `depthkd` verbs owned by this package (depthkd_core/cli.py reads the group).
        "depthkd.verbs": ["ros = depthkd_ros.verbs:VERBS"],
    },
)
