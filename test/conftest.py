"""Test-session settings shared by every test module.

``@pytest.mark.needs_shared``: the test reads the real model and frames in ../shared
(the folder beside the clone CI and developers have). Without it the test is skipped
here, in one place, with one reason naming the marker.
"""

import os

import pytest

from helpers import require_shared

# The models under test are tiny: one intra-op thread is as fast, and it avoids
# OpenMP threads spinning against each other (and against the depth_node
# processes some tests start) on a small machine. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The distill-node harness's fixtures (ros, teacher_url) for the modules that use them; a
# broken import there fails the run instead of skipping those modules.
pytest_plugins = ["distill_harness"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_shared") is not None:
        require_shared()
