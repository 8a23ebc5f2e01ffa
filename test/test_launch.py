"""launch/depth.launch.py, config/depth.yaml, config/depthkd.rviz and the node doc agree.

The launch file runs for real (colcon + ``ros2 launch``) in test_ros2_launch.py; here it
is executed against tiny recording stand-ins for ``launch``/``launch_ros`` for what those
runs cannot show without more processes: remapped topics, another params file and
model, an installed rviz2, ``distill:=true``.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ros_domain

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "depth.launch.py"
PARAMS_YAML = REPO / "config" / "depth.yaml"
RVIZ = REPO / "config" / "depthkd.rviz"
FASTDDS_XML = REPO / "config" / "fastdds.xml"
DOC = REPO / "docs" / "depth_node.md"
DOMAIN_ID = ros_domain(49)


class _Recorder:
    """Stand-in for a launch action: keeps its arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name: str) -> None:
        self.name = name

    def perform(self, context: Any) -> str:
        return context.launch_configurations[self.name]


class _PackageNotFoundError(KeyError):
    pass


def _fake_launch_modules(installed: frozenset[str]) -> dict[str, types.ModuleType]:
    modules = {name: types.ModuleType(name) for name in
               ("launch", "launch.actions", "launch.substitutions", "launch_ros",
                "launch_ros.actions", "ament_index_python", "ament_index_python.packages")}

    def get_package_prefix(package: str) -> str:
        if package not in installed:
            raise _PackageNotFoundError(package)
        return f"/opt/ros/test/{package}"
    modules["ament_index_python.packages"].PackageNotFoundError = _PackageNotFoundError
    modules["ament_index_python.packages"].get_package_prefix = get_package_prefix
    modules["launch"].LaunchDescription = _Recorder
    modules["launch.actions"].DeclareLaunchArgument = type("DeclareLaunchArgument",
                                                           (_Recorder,), {})
    modules["launch.actions"].OpaqueFunction = type("OpaqueFunction", (_Recorder,), {})
    modules["launch.substitutions"].LaunchConfiguration = _LaunchConfiguration
    modules["launch_ros.actions"].Node = type("Node", (_Recorder,), {})
    return modules


def _load_launch_file(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_fake(monkeypatch: pytest.MonkeyPatch, installed: frozenset[str] = frozenset({"rviz2"}),
              environment: dict[str, str] | None = None, **overrides: str) -> list[_Recorder]:
    """generate_launch_description() with recording stand-ins -> the actions it launches;
    ``installed`` names the packages the stand-in ament index finds, ``environment`` is
    the launch's environment (empty by default)."""
    for name, module in _fake_launch_modules(installed).items():
        monkeypatch.setitem(sys.modules, name, module)
    description = _load_launch_file("depth_launch_fake").generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities
                if type(e).__name__ == "DeclareLaunchArgument"}
    assert set(overrides) <= set(declared), f"unknown launch arguments {set(overrides)}"
    context = types.SimpleNamespace(launch_configurations={**declared, **overrides},
                                    environment=environment or {})
    (opaque,) = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
    return opaque.kwargs["function"](context)


def test_launch_file_parses_and_names_the_node() -> None:
    tree = ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))
    functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert {"depthkd_ros", "depth_node", "depth.yaml", "depthkd.rviz", "rviz2"} <= strings


def test_several_cameras_with_model_transport_and_rviz(monkeypatch: pytest.MonkeyPatch) -> None:
    actions = _run_fake(monkeypatch, cameras="front, rear", model_path="/models/s.onnx",
                        input_transport="compressed", image="image_rect",
                        camera_info="info", rviz="true", params_file="/etc/depth.yaml")
    nodes = [a.kwargs for a in actions if a.kwargs["executable"] == "depth_node"]
    assert [n["namespace"] for n in nodes] == ["front", "rear"]
    for n in nodes:
        assert n["parameters"] == ["/etc/depth.yaml", {"input_transport": "compressed",
                                                       "model_path": "/models/s.onnx"}]
        assert n["remappings"] == [("image", "image_rect"),
                                   ("image/compressed", "image_rect/compressed"),
                                   ("camera_info", "info")]
    (rviz,) = [a.kwargs for a in actions if a.kwargs["executable"] == "rviz2"]
    assert rviz["package"] == "rviz2" and rviz["namespace"] == "front"
    assert rviz["arguments"][0] == "-d" and Path(rviz["arguments"][1]).resolve() == RVIZ
    with pytest.raises(RuntimeError, match="needs RViz 2 .*nothing was started"):
        _run_fake(monkeypatch, installed=frozenset(), cameras="front", rviz="true")


def test_yaml_holds_every_parameter_with_its_declared_type_and_default() -> None:
    pytest.importorskip("rclpy")
    from depthkd_ros.depth_node import PARAMS

    loaded = yaml.safe_load(PARAMS_YAML.read_text())
    values = loaded["/**"]["ros__parameters"]
    assert set(values) == {spec.name for spec in PARAMS}
    for spec in PARAMS:
        assert type(values[spec.name]) is type(spec.default), spec.name
        assert values[spec.name] == spec.default, spec.name


def test_yaml_reaches_a_namespaced_node_through_rcl(tmp_path: Path) -> None:
    rclpy = pytest.importorskip("rclpy")
    from rclpy.context import Context
    from rclpy.parameter import Parameter

    from depthkd_ros.depth_node import DepthNode
    from test_inference import write_linear_onnx

    loaded = yaml.safe_load(PARAMS_YAML.read_text())
    loaded["/**"]["ros__parameters"]["max_depth"] = 7.5
    params_file = tmp_path / "depth.yaml"
    params_file.write_text(yaml.safe_dump(loaded))
    model = write_linear_onnx(tmp_path / "m.onnx", 1.0, 1.0)
    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    try:
        node = DepthNode(context=context, namespace="front",
                         cli_args=["--ros-args", "--params-file", str(params_file)],
                         parameter_overrides=[Parameter("model_path", value=str(model))])
        assert node.get_parameter("max_depth").value == 7.5
        assert node.get_parameter("input_reliability").value == "auto"
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_rviz_config_shows_the_node_outputs() -> None:
    pytest.importorskip("rclpy")
    from depthkd_ros.depth_node import PARAMS

    config = yaml.safe_load(RVIZ.read_text())
    manager = config["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "camera_optical_frame"
    topics = {d["Topic"]["Value"]: (d["Class"], d["Topic"]["Reliability Policy"])
              for d in manager["Displays"] if "Topic" in d}
    defaults = {spec.name: spec.default for spec in PARAMS}
    output = {"reliable": "Reliable", "best_effort": "Best Effort"}[defaults["output_reliability"]]
    assert topics == {"image": ("rviz_default_plugins/Image", "Best Effort"),
                      "depth/colored": ("rviz_default_plugins/Image", output),
                      "points": ("rviz_default_plugins/PointCloud2", output)}


def test_doc_lists_every_parameter_and_topic() -> None:
    pytest.importorskip("rclpy")
    from depthkd_ros.depth_node import PARAMS

    doc = DOC.read_text()
    missing = [spec.name for spec in PARAMS if f"`{spec.name}`" not in doc]
    assert not missing, f"docs/depth_node.md does not describe {missing}"
    for topic in ("image", "image/compressed", "camera_info", "sparse_depth", "depth",
                  "depth/camera_info", "depth/colored", "points", "/diagnostics"):
        assert f"`{topic}`" in doc, topic


def test_distill_true_adds_a_distill_node_per_camera(monkeypatch: pytest.MonkeyPatch) -> None:
    actions = _run_fake(monkeypatch, cameras="front,rear", distill="true",
                        teacher_url="https://ws:8443", token_file="/etc/token",
                        store_dir="/var/distill", input_transport="compressed", image="image_rect")
    depth = [a.kwargs for a in actions if a.kwargs["executable"] == "depth_node"]
    distill = [a.kwargs for a in actions if a.kwargs["executable"] == "distill_node"]
    assert [n["namespace"] for n in distill] == ["front", "rear"] == [n["namespace"] for n in depth]
    for d, n in zip(distill, depth):
        assert (d["package"], d["name"]) == ("depthkd_ros", "distill_node")
        assert d["remappings"] == n["remappings"]  # the same camera topics as the depth node
        assert d["parameters"] == [{"teacher_url": "https://ws:8443", "token_file": "/etc/token",
                                    "store_dir": f"/var/distill/{d['namespace']}",
                                    "input_transport": "compressed"}]
    assert not [a for a in _run_fake(monkeypatch) if a.kwargs["executable"] == "distill_node"]


@pytest.mark.parametrize("variable", ["FASTDDS_DEFAULT_PROFILES_FILE",
                                      "FASTRTPS_DEFAULT_PROFILES_FILE"])
def test_fast_dds_profile_only_when_the_user_has_none(monkeypatch: pytest.MonkeyPatch,
                                                      variable: str) -> None:
    actions = _run_fake(monkeypatch, cameras="front,rear", distill="true", rviz="true")
    assert len(actions) == 5
    for action in actions:
        env = action.kwargs["additional_env"]
        # Fast DDS 3: the old name would only add a deprecation warning to every start.
        assert set(env) == {"FASTDDS_DEFAULT_PROFILES_FILE"}
        assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]).resolve() == FASTDDS_XML
    # Fast DDS 2 (Humble to Jazzy) reads only the old name.
    jazzy = _run_fake(monkeypatch, environment={"ROS_DISTRO": "jazzy"})
    for action in jazzy:
        env = action.kwargs["additional_env"]
        assert set(env) == {"FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE"}
        assert {Path(v).resolve() for v in env.values()} == {FASTDDS_XML}
    # Either variable (Fast DDS 3 or 2) is the user's choice of transports: nothing is added.
    own = _run_fake(monkeypatch, environment={variable: "/etc/my_profile.xml"}, distill="true")
    assert own and all(a.kwargs["additional_env"] == {} for a in own)
    # Set but empty means unset, as Fast DDS reads it.
    empty = _run_fake(monkeypatch, environment={variable: ""})
    assert all(a.kwargs["additional_env"] for a in empty)


def test_fast_dds_profile_is_valid_and_installed() -> None:
    import xml.etree.ElementTree as ET

    root = ET.parse(FASTDDS_XML).getroot()
    ns = {"d": "http://www.eprosima.com"}
    transports = {t.findtext("d:transport_id", namespaces=ns): t
                  for t in root.iterfind(".//d:transport_descriptor", ns)}
    shm = [t for t in transports.values() if t.findtext("d:type", namespaces=ns) == "SHM"]
    # A camera-resolution VGA cloud (4.9 MB) with depth and image in flight must fit.
    assert len(shm) == 1 and int(shm[0].findtext("d:segment_size", namespaces=ns)) >= 16 << 20
    udp = [t for t in transports.values() if t.findtext("d:type", namespaces=ns) == "UDPv4"]
    # Every interface: RViz on another host must still get the outputs.
    assert len(udp) == 1 and udp[0].find("d:interfaceWhiteList", ns) is None
    (participant,) = root.iterfind(".//d:participant", ns)
    assert participant.get("is_default_profile") == "true"
    assert participant.findtext(".//d:useBuiltinTransports", namespaces=ns) == "false"
    used = {t.text for t in participant.iterfind(".//d:userTransports/d:transport_id", ns)}
    assert used == set(transports)
    assert "glob(\"config/*.xml\")" in (REPO / "setup.py").read_text()
