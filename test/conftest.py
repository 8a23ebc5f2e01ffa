"""Test-session settings shared by every test module."""

import os

# The models under test are tiny: one intra-op thread is as fast, and it avoids
# OpenMP threads spinning against each other (and against the depth_node
# processes some tests start) on a small machine. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
