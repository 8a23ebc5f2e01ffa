# Two commands a new user needs: `make demo` and `make test`.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements-lock.txt 2>/dev/null | sha1sum | cut -c1-12)
PYTHON ?= python3

.PHONY: venv test test-slow demo bench-node clean

venv: $(STAMP)

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

bench-node: venv
	$(VENV)/bin/depthkd bench-node

clean:
	rm -rf $(VENV) demo_output runs outputs
