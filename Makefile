# Two commands a new user needs: `make demo` and `make test`.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum setup.py | cut -c1-12)
PYTHON ?= python3
# The real ROS 2 launch/CLI stack for a virtualenv (launch_ros, ros2cli, colcon...):
# ../shared/ros2_tools beside the clone, resolved from this Makefile, not the caller's cwd.
ROS2_TOOLS := $(abspath $(dir $(abspath $(lastword $(MAKEFILE_LIST))))../shared/ros2_tools)

.PHONY: venv test test-slow demo demo-assets student bench-real bench-node clean

venv: $(STAMP)
	# Idempotent (install.sh keeps its own stamp): a ros2_tools folder that appears
	# after the venv was made is still installed. Without it the real launch tests skip.
	if [ -f $(ROS2_TOOLS)/install.sh ]; then bash $(ROS2_TOOLS)/install.sh $(VENV); fi

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned first so pip never resolves a newer (multi-GB) build.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[training,ros,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

demo: venv
	$(VENV)/bin/depthkd demo --out demo_output

# Regenerates the demo sequence and the simulator-supervised student (the first
# packaged student, now a row of bench-real) end to end: simulate -> train -> export.
demo-assets: venv
	rm -rf depthkd_ros/demo_data
	$(VENV)/bin/depthkd simulate --style target --n 30 --sequence --seed 8 --out depthkd_ros/demo_data --workers 1
	$(VENV)/bin/depthkd simulate --style target --n 3000 --seed 1 --out runs/data/target_train
	$(VENV)/bin/depthkd simulate --style target --n 200 --seed 1000 --out runs/data/target_val
	$(VENV)/bin/depthkd train --config config/train/demo_student.yaml
	$(VENV)/bin/depthkd export --checkpoint runs/demo_student/final.pt --out runs/student/sim_supervised/student.onnx --height 192 --width 256 --check-images depthkd_ros/demo_data/rgb

# The packaged student (depthkd_ros/models/student.onnx/.pt/.json) from the real teacher
# in ../shared/models/fastdepth, through simulated images only, shipped as int8
# (docs/student.md; 45 minutes to 1.5 hours on 2 CPU cores, resumable: run it again after
# an interruption).
student: venv
	$(VENV)/bin/depthkd make-student --config config/student/fastdepth.yaml --install depthkd_ros/models

# The real-frame table of docs/student.md (runs the missing recipes first, on every core;
# the table is then measured with one torch thread).
bench-real: venv
	$(VENV)/bin/depthkd bench-real --make --out docs/bench/real

bench-node: venv
	$(VENV)/bin/depthkd bench-node

clean:
	rm -rf $(VENV) demo_output runs outputs
