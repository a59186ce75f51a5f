# Fresh-machine entry points:  make demo  (set up, run the main job on the bundled digits data)
#                              make test  (set up, run the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the build available offline on the reference machine; override for yours, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean
setup: $(VENV)/.kdfast-installed

$(VENV)/.kdfast-installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11 ninja
	$(PY) -m pip install -q $(TORCH_SPEC)
	# --no-build-isolation: the C++ extension compiles against the torch installed above
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	$(PY) -c "import kdfast; print('kdfast backends:', kdfast.backends())"
	touch $@

demo: setup
	$(PY) -m kdfast.demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info kdfast/*.so
