# Fresh-machine entry points:  make demo  (set up, run the main job on the bundled digits data)
#                              make test  (set up, run the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the build available offline on the reference machine; override for yours, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench dist clean
setup: $(VENV)/.kdfast-installed

$(VENV)/.kdfast-installed: pyproject.toml setup.py kdfast/runtime/cpp_build.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11 ninja
	$(PY) -m pip install -q $(TORCH_SPEC)
	# --no-build-isolation: the C++ extension compiles against the torch installed above
	$(PY) -m pip install -q --no-build-isolation -e '.[data,models,test]'
	$(VENV)/bin/kdfast env
	touch $@

# The main job on the bundled digits data: score every example (EL2N of 3 small CNNs), keep 30%, train a
# student on the kept 30% with and without distillation from a teacher trained on all the data.
DEMO ?= runs/demo
demo: setup
	rm -rf $(DEMO)
	$(VENV)/bin/kdfast-score --method el2n --out $(DEMO)/scores
	$(VENV)/bin/kdfast-prune --scores $(DEMO)/scores --fraction 0.3 --mode moderate --class-balanced \
		--out $(DEMO)/keep.npy
	$(VENV)/bin/kdfast-distill --train-teacher --keep $(DEMO)/keep.npy --alpha auto --out $(DEMO)/student-kd
	$(VENV)/bin/kdfast-distill --keep $(DEMO)/keep.npy --alpha 0 --out $(DEMO)/student-no-kd

test: setup
	$(PY) -m pytest -q

# Rows and report go to runs/bench/ (untracked); add them to the tracked record with
#   $(PY) -m bench.run --record --merge runs/bench/results.jsonl
BENCH_ARGS ?= --quick
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS) --out runs/bench/results.jsonl

# sdist + wheel from isolated builds (no torch there): the wheel ships csrc/ and compiles it on first use
dist: setup
	$(PY) -m build --outdir dist

clean:
	rm -rf $(VENV) build dist *.egg-info kdfast/*.so
