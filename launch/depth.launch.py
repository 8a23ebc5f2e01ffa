"""Run depth_node for one or several cameras, optionally with RViz.

    ros2 launch depthkd_ros depth.launch.py camera:=front image:=image_rect rviz:=true
    ros2 launch depthkd_ros depth.launch.py cameras:=front,rear input_transport:=compressed
    ros2 launch depthkd_ros depth.launch.py distill:=true teacher_url:=http://ws:8000 \
        token_file:=~/.config/depthkd/token

Each camera gets a depth_node in its own namespace, so ``image`` resolves to
``/<camera>/<image>`` and the outputs to ``/<camera>/depth``, ``/<camera>/points``.
"""

from __future__ import annotations

from pathlib import Path

from ament_index_python.packages import PackageNotFoundError, get_package_prefix
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from depthkd_ros.dds import profile_env

PACKAGE = "depthkd_ros"
DISTILL_SIGTERM_TIMEOUT_S = "30"
# Installed, this file is share/depthkd_ros/launch/depth.launch.py and the configs
# are in share/depthkd_ros/config; the source tree has the same layout, so the
# launch file also runs from a checkout.
CONFIG = Path(__file__).parent.parent / "config"

ARGUMENTS = {
    "camera": ("", "namespace of the camera (one node)"),
    "cameras": ("", "comma-separated namespaces, one node each (overrides camera)"),
    "model_path": ("", "ONNX model; empty keeps params_file's value (packaged student)"),
    "params_file": (str(CONFIG / "depth.yaml"), "depth_node parameters (YAML)"),
    "input_transport": ("raw", "raw (image) or compressed (image/compressed)"),
    "image": ("image", "image topic the node reads, relative to the camera namespace"),
    "camera_info": ("camera_info", "camera_info topic, relative to the camera namespace"),
    "rviz": ("false", "true opens RViz with config/depthkd.rviz on the first camera"),
    "distill": ("false", "true starts a distill_node beside each depth_node"),
    "teacher_url": ("http://127.0.0.1:8000", "distill: teacher server URL"),
    "token_file": ("", "distill: file holding the teacher's bearer token"),
    "store_dir": ("~/.ros/depthkd_distill", "distill: state directory (one subfolder per "
                  "camera namespace)"),
}


def _check_rviz() -> None:
    """Fail before any node starts: a Node action for a missing package raises only once
    the nodes before it are running, and launch then leaves those behind as orphans."""
    try:
        get_package_prefix("rviz2")
    except PackageNotFoundError:
        raise RuntimeError("rviz:=true needs RViz 2 (package rviz2), which is not installed: "
                           "install it (apt: ros-$ROS_DISTRO-rviz2) or launch without "
                           "rviz:=true; nothing was started") from None


def _nodes(context: object) -> list:
    def value(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    rviz = value("rviz").lower() in ("true", "1", "yes")
    if rviz:
        _check_rviz()
    namespaces = [ns.strip() for ns in value("cameras").split(",") if ns.strip()]
    namespaces = namespaces or [value("camera")]
    overrides = {"input_transport": value("input_transport")}
    if value("model_path"):
        overrides["model_path"] = value("model_path")
    image = value("image")
    # Fast DDS's default transports lose megabyte images and clouds (docs/depth_node.md,
    # "DDS transport"); a profile file the user chose is left alone.
    env = profile_env(CONFIG / "fastdds.xml", context.environment)
    remappings = [("image", image), ("image/compressed", f"{image}/compressed"),
                  ("camera_info", value("camera_info"))]
    actions = [Node(package=PACKAGE, executable="depth_node", name="depth_node", namespace=ns,
                    parameters=[value("params_file"), overrides], remappings=remappings,
                    additional_env=env, output="screen")
               for ns in namespaces]
    if value("distill").lower() in ("true", "1", "yes"):
        # On Ctrl-C distill_node stops a running round's trainer (its process group) and joins
        # its threads, each within shutdown_timeout_s: more than launch's default 5 s before
        # SIGTERM when several are busy.
        actions += [Node(package=PACKAGE, executable="distill_node", name="distill_node",
                         namespace=ns, remappings=remappings, output="screen",
                         additional_env=env,
                         sigterm_timeout=DISTILL_SIGTERM_TIMEOUT_S,
                         parameters=[{"teacher_url": value("teacher_url"),
                                      "token_file": value("token_file"),
                                      "store_dir": str(Path(value("store_dir")) / ns),
                                      "input_transport": value("input_transport")}])
                    for ns in namespaces]
    if rviz:
        # The RViz config uses relative topic names, resolved in this namespace.
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2",
                            namespace=namespaces[0],
                            arguments=["-d", str(CONFIG / "depthkd.rviz")],
                            additional_env=env, output="screen"))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in ARGUMENTS.items()]
        + [OpaqueFunction(function=_nodes)])
