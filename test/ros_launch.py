"""Real ROS 2 tooling for the tests: colcon and ``ros2 launch``, whichever install has them.

Looked for in this order: the venv's ../shared/ros2_tools install (``make venv`` adds it),
a ROS 2 environment already sourced (``ros2`` and ``colcon`` on PATH), /opt/ros/<distro>.
Tests that need them are marked ``needs_ros_tools`` and skip, with one reason, only when
none of these is there.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import wait_until

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "depthkd_ros"


def find_ros_setup() -> list[Path] | None:
    """Setup scripts to source for ``ros2`` + ``colcon`` ([] = already sourced), or None."""
    overlay = Path(sys.prefix) / "ros2_overlay" / "setup.bash"
    if overlay.is_file():
        return [overlay]
    if shutil.which("colcon") is None:
        return None
    if shutil.which("ros2"):
        return []
    installs = sorted(Path("/opt/ros").glob("*/setup.bash"))
    return installs[-1:] or None


needs_ros_tools = pytest.mark.skipif(
    find_ros_setup() is None,
    reason="no ROS 2 launch/CLI tools: run `make venv` with ../shared/ros2_tools beside the "
           "clone, or source a ROS 2 install with ros2cli, launch_ros and colcon")


class Launch:
    """``ros2 launch PACKAGE FILE ARGS`` in its own process group, output to a log file."""

    def __init__(self, env: dict[str, str], launch_file: str, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(["ros2", "launch", PACKAGE, launch_file, *args],
                                            env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.pgid = self.process.pid  # start_new_session: the group is led by launch itself

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        """True while launch runs; an unexpected exit fails the test with launch's output."""
        if self.process.poll() is not None:
            raise AssertionError(f"ros2 launch exited with {self.process.returncode}:\n"
                                 + self.output()[-3000:])
        return True

    def group_alive(self) -> bool:
        """Does any process of launch's group (launch, its nodes, their children) remain?"""
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def interrupt(self, timeout: float = 30.0) -> None:
        """Ctrl-C in a terminal: SIGINT to the whole group (each node gets it from the
        terminal and again from launch). Launch must exit 0, every process it started
        must finish cleanly on SIGINT alone, and the group must end up empty."""
        started = self.output().count("process started with pid")
        os.killpg(self.pgid, signal.SIGINT)
        code = self.process.wait(timeout=timeout)
        wait_until(lambda: not self.group_alive(), timeout=timeout,
                   what=f"every process of the launch group {self.pgid} to exit")
        output = self.output()
        tail = output[-4000:]
        assert code == 0, f"ros2 launch exited with {code}:\n{tail}"
        # Launch's own KeyboardInterrupt noise is upstream's; a node's traceback is ours.
        for sign in ("process has died", "escalating to 'SIGTERM'", "] Traceback"):
            assert sign not in output, f"{sign!r} on Ctrl-C:\n{tail}"
        assert output.count("process has finished cleanly") == started, tail

    def kill(self) -> None:
        """Teardown safety net: nothing outlives the test, whatever it asserted."""
        if self.group_alive():
            os.killpg(self.pgid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def __enter__(self) -> "Launch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class Workspace:
    """This package colcon-built into ``root``, and the environment of a shell that sourced
    the ROS tools and the workspace (``install/setup.bash``), on ``domain_id``."""

    def __init__(self, root: Path, domain_id: int) -> None:
        setup = find_ros_setup()
        assert setup is not None, "needs_ros_tools should have skipped"
        sources = "".join(f"source {shlex.quote(str(s))} && " for s in setup)
        # --paths: exactly this package; a recursive search would walk .venv.
        script = (f"set +u && {sources}cd {shlex.quote(str(root))} && "
                  f"colcon build --paths {shlex.quote(str(REPO))} > build.log 2>&1 "
                  f"|| {{ cat build.log >&2; exit 1; }}; source install/setup.bash && env -0")
        done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=600)
        assert done.returncode == 0, f"colcon build failed:\n{done.stderr.decode()[-3000:]}"
        self.env = dict(item.split("=", 1) for item in done.stdout.decode().split("\0")
                        if "=" in item)
        self.env.update(ROS_DOMAIN_ID=str(domain_id), PYTHONUNBUFFERED="1",
                        ROS_LOG_DIR=str(root / "ros_log"))
        self.root = root
        self.install = root / "install"

    def launch(self, launch_file: str, *args: str, log: Path) -> Launch:
        return Launch(self.env, launch_file, list(args), log)
