"""The package's shape: the import graph has no circle, the core never imports ROS code,
and `depthkd` finds the verbs each package registers."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("depthkd_core", "depthkd_ros")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (lazy imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import submodule` imports the submodule; `from mod import name` the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path, or None (iterative DFS with colours)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_circle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_core_never_imports_ros_code() -> None:
    graph = _graph()
    arrows = sorted(f"{src} -> {dst}" for src, dsts in graph.items() if src.startswith("depthkd_core")
                    for dst in dsts if dst.startswith("depthkd_ros"))
    assert not arrows, arrows
    # A module named in a string (importlib, a verb table) is an import too.
    named = sorted(f"{p.relative_to(REPO)}: {m.group()}" for p in (REPO / "depthkd_core").rglob("*.py")
                   for m in re.finditer(r"[\"']depthkd_ros\.[\w.]+", p.read_text()))
    assert not named, named


def test_depthkd_lists_the_verbs_every_package_registers(capsys: pytest.CaptureFixture[str]) -> None:
    from depthkd_core.cli import CORE_VERBS, main, verbs
    from depthkd_ros.verbs import VERBS as ROS_VERBS

    table = verbs()
    assert set(CORE_VERBS) | set(ROS_VERBS) == set(table)
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {verb} " in usage for verb in table)
    for module, _ in table.values():  # every verb's module exists and has the two hooks
        spec = _modules()[module]
        source = spec.read_text()
        assert "def add_cli_arguments(" in source and "def run_cli(" in source, module


@pytest.mark.parametrize("kind", ["methods", "models", "losses", "readers"])
def test_depthkd_list_prints_every_entry_with_its_options(kind: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from depthkd_core.catalog import catalog
    from depthkd_core.cli import main

    assert main(["list", kind]) == 0
    out = capsys.readouterr().out
    entries = catalog(kind)
    assert len(entries) >= 3
    for key, _, options in entries:
        assert any(line.startswith(key) for line in out.splitlines()), key
        for name, value in options.items():
            assert f"    {name} = {value!r}" in out
    if kind == "methods":
        assert "    label_weight = 0.0" in out and "    lambda_kd = 0.05" in out
    if kind == "models":
        assert "    encoder = 'mobilenetv2_100'" in out


# What a robot without torch imports, and what each of those modules must not pull in.
LIGHT_MODULES = [
    ("depthkd_ros.depth_node", {"torch"}),
    ("depthkd_core.inference", {"torch", "rclpy"}),
    ("depthkd_core.runtime", {"torch", "rclpy"}),
    ("depthkd_core.geometry", {"torch", "cv2"}),
    ("depthkd_core.evaluate.metrics", {"torch", "cv2"}),
    ("depthkd_core.cli", {"torch", "rclpy", "depthkd_ros"}),
]


@pytest.mark.parametrize("module, forbidden", LIGHT_MODULES, ids=[m for m, _ in LIGHT_MODULES])
def test_light_modules_import_nothing_heavy(module: str, forbidden: set[str]) -> None:
    code = (f"import sys, {module}; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(forbidden)!r}); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]


MAX_MODULE_LINES = 400


def test_no_source_module_is_over_400_lines() -> None:
    long = sorted(f"{p.relative_to(REPO)}: {n}" for p in _modules().values()
                  if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES)
    assert not long, f"split these (one concept, one module): {long}"


def test_the_code_passes_the_committed_ruff_configuration() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
