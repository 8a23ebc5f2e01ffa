"""The Fast DDS profile (config/fastdds.xml) that depth.launch.py gives the nodes it starts.

Fast DDS 3 (ROS 2 Kilted and later) reads a default XML profile from
FASTDDS_DEFAULT_PROFILES_FILE; Fast DDS 2 (Humble, Iron, Jazzy) from
FASTRTPS_DEFAULT_PROFILES_FILE, which rmw_fastrtps on Fast DDS 3 still honours with a
deprecation warning on every start, so the old name is set only for the distros that need
it. A user who set either variable chose their own transports: nothing is set then.
Other RMWs never read these variables, so setting them is harmless there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
FAST_DDS_2_DISTROS = ("humble", "iron", "jazzy")
# config/ beside the package in a checkout; depth.launch.py passes the installed copy.
SOURCE_PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds.xml"


def profile_env(profile: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` so Fast DDS loads ``profile``; none when the
    user already set a profile file of their own (an empty value counts as unset)."""
    if any(environ.get(name) for name in PROFILE_VARIABLES):
        return {}
    fast_dds_2 = environ.get("ROS_DISTRO", "") in FAST_DDS_2_DISTROS
    return {name: str(profile) for name in PROFILE_VARIABLES[:2 if fast_dds_2 else 1]}
