"""The Fast DDS profile (config/fastdds.xml) that depth.launch.py gives the nodes it starts.

Fast DDS 3 (ROS 2 Kilted and later) reads a default XML profile from
FASTDDS_DEFAULT_PROFILES_FILE; Fast DDS 2 (Humble, Iron, Jazzy) from
FASTRTPS_DEFAULT_PROFILES_FILE, which rmw_fastrtps on Fast DDS 3 still honours with a
deprecation warning on every start, so the old name is set only for the distros that need
it. A user who set either variable chose their own transports: nothing is set then.
Other RMWs never read these variables, so setting them is harmless there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
FAST_DDS_2_DISTROS = ("humble", "iron", "jazzy")
# config/ beside the package in a checkout; depth.launch.py passes the installed copy.
SOURCE_PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds.xml"
# Where the tools (demo, bench-node) apply the profile when no profile variable is set: to
# both processes (the node, and the camera + subscriber they play), the node only (as
# depth.launch.py with a driver started elsewhere), or neither (Fast DDS defaults).
PROFILE_MODES = ("both", "node", "none")


def profile_env(profile: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` so Fast DDS loads ``profile``; none when the
    user already set a profile file of their own (an empty value counts as unset)."""
    if any(environ.get(name) for name in PROFILE_VARIABLES):
        return {}
    fast_dds_2 = environ.get("ROS_DISTRO", "") in FAST_DDS_2_DISTROS
    return {name: str(profile) for name in PROFILE_VARIABLES[:2 if fast_dds_2 else 1]}


def profile_environments(mode: str) -> tuple[dict[str, str], dict[str, str]]:
    """(variables for a node process, for this process) that select the source profile
    under ``mode`` (one of PROFILE_MODES); empty when the user set a profile of their own."""
    if mode not in PROFILE_MODES:
        raise ValueError(f"DDS profile mode must be one of {PROFILE_MODES}, got {mode!r}")
    env = profile_env(SOURCE_PROFILE, os.environ) if mode != "none" else {}
    return env, (env if mode == "both" else {})


def profile_in_use(environ: Mapping[str, str]) -> str:
    """The profile file Fast DDS loads in a process with ``environ``."""
    return next((environ[v] for v in PROFILE_VARIABLES if environ.get(v)), "Fast DDS defaults")
