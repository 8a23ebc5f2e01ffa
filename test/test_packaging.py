"""The robot install path is honest.

A robot gets what ``rosdep install`` (package.xml) and ``colcon build`` give it, not this
venv: depth_node must start with numpy, OpenCV, onnxruntime and rclpy alone; distill_node
must start without the training stack (it used to die with ``No module named 'tqdm'``
through data/__init__ -> data/simulator); and everything the distill and teacher paths
import must be declared, in package.xml or in the pip extras the README names.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[1]
# What the robot does not have unless it asked for it: the training stack, the server,
# the optional readers.
HEAVY = ("torch", "torchvision", "timm", "kornia", "tensorboard", "tqdm", "onnx", "onnxscript",
         "transformers", "h5py", "rosbags", "fastapi", "uvicorn", "httpx")
# rosdep keys in package.xml -> the PyPI distribution they install.
ROSDEP_PIP = {"python3-numpy": "numpy", "python3-opencv": "opencv-python-headless",
              "python3-yaml": "PyYAML", "python3-onnxruntime-pip": "onnxruntime",
              "python3-tqdm": "tqdm", "python3-fastapi": "fastapi", "python3-uvicorn": "uvicorn"}

# Runs in a fresh interpreter: blocks `blocked` (as if not installed), imports `modules`,
# prints the sorted top-level modules that ended up loaded.
_PROBE = """
import importlib, importlib.abc, json, sys
blocked, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
for module in modules:
    importlib.import_module(module)
print(json.dumps(sorted(sys.modules)))
"""


def _probe(modules: list[str], blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, json.dumps(blocked), json.dumps(modules)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)


def _loaded(modules: list[str], blocked: tuple[str, ...] = ()) -> set[str]:
    done = _probe(modules, blocked)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout))


def test_depth_node_starts_with_numpy_opencv_onnxruntime_rclpy_only() -> None:
    loaded = _loaded(["depthkd_ros.depth_node"], HEAVY)
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY)


def test_distill_node_starts_without_the_training_stack() -> None:
    # httpx is the one extra it needs to start (the teacher client); the training stack
    # is imported by the fine-tuning process and the gate, on demand.
    blocked = tuple(m for m in HEAVY if m != "httpx")
    # The registry is held from start-up: a torch import there delayed Ctrl-C past 5 s.
    loaded = _loaded(["depthkd_ros.distill_node", "depthkd_core.online.registry"], blocked)
    assert "depthkd_core.data.simulator" not in loaded


def _requirement_names(requirements: list[str] | None, extra: str = "") -> set[str]:
    """Distribution names required with no extra (or with ``extra``), normalised."""
    names = set()
    for req in requirements or []:
        marker = req.partition(";")[2]
        wanted = re.search(r"extra\s*==\s*['\"]([^'\"]+)", marker)
        if (wanted.group(1) if wanted else "") == extra:
            names.add(_norm(re.match(r"[A-Za-z0-9._-]+", req).group(0)))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: set[str]) -> set[str]:
    """``names`` and everything they require, through the installed metadata."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += _requirement_names(md.requires(name))
        except md.PackageNotFoundError:
            pass
    return seen


@pytest.mark.parametrize("extra, modules", [
    ("distill", ["depthkd_ros.distill_node", "depthkd_core.online.finetune",
                 "depthkd_core.online.gate"]),
    ("teacher", ["depthkd_ros.teacher_server", "depthkd_core.models.teachers",
                 "depthkd_core.serving.server", "uvicorn"]),
])
def test_what_distill_and_teacher_import_is_declared(extra: str, modules: list[str]) -> None:
    """Each distribution their code paths import is declared (package.xml rosdep key or the
    pip extra) or required by a declared one; ROS packages come from ROS."""
    keys = [e.text for e in ET.parse(REPO / "package.xml").getroot().iter("exec_depend")]
    requires = md.requires("depthkd_ros")
    declared = ({_norm(ROSDEP_PIP[k]) for k in keys if k in ROSDEP_PIP}
                | _requirement_names(requires) | _requirement_names(requires, extra))
    assert _requirement_names(requires, extra), f"setup.py has no extra {extra!r} (make venv?)"
    provided = _closure(declared)
    by_module = md.packages_distributions()
    missing = set()
    for top in {m.split(".")[0] for m in _loaded(modules)} - set(sys.stdlib_module_names):
        dists = {_norm(d) for d in by_module.get(top, [])}
        if dists and not dists & provided and not any(d.startswith("ros-") for d in dists) \
                and "depthkd-ros" not in dists:
            missing.add(top)
    # Libraries import some packages only when present (rich, lz4, ...): those are optional.
    needed = _probe(modules, tuple(missing)).returncode != 0 if missing else False
    assert not needed, f"{extra} imports {sorted(missing)}, and fails without them: declare them"
