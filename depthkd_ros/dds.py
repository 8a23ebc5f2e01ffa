"""The Fast DDS profile (config/fastdds.xml) that depth.launch.py gives the nodes it starts.

Fast DDS reads a default XML profile from FASTDDS_DEFAULT_PROFILES_FILE (Fast DDS 3,
ROS 2 Jazzy and later) or FASTRTPS_DEFAULT_PROFILES_FILE (Fast DDS 2, Humble). A user who
set either one chose their own transports, so the shipped profile is used only when
neither is set. Other RMWs never read these variables, so setting them is harmless there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
# config/ beside the package in a checkout; depth.launch.py passes the installed copy.
SOURCE_PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds.xml"


def profile_env(profile: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` so Fast DDS loads ``profile``; none when the
    user already set a profile file of their own (an empty value counts as unset)."""
    if any(environ.get(name) for name in PROFILE_VARIABLES):
        return {}
    return {name: str(profile) for name in PROFILE_VARIABLES}
