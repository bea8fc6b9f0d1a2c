# The README's commands. Each target sets up what it needs first: a .venv with torch and the
# project's dependencies (from pyproject.toml), and the compiled extension (incremental rebuilds).
#   make bench      set up, build, run the default benchmarks (a quick run of every suite) on the best device
#   make test       set up, build, run the whole test suite
#   make gpu-test   the GPU tests only (on a machine with a CUDA device)
#   make cmake-test build the same sources with CMake against libtorch and run the C++ tests

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.11.0
# torch 2.11 requires setuptools < 82
SETUPTOOLS := setuptools>=77,<82

.PHONY: setup build test gpu-test bench cmake-test lint clean

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip "$(SETUPTOOLS)" wheel ninja
	$(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install --no-build-isolation -e '.[dev]'
	touch $@

setup: $(VENV)/.deps

build: setup
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import pefttorch, json; print(json.dumps(pefttorch.build_info()))"

test: build
	$(PY) -m pytest

gpu-test: build
	$(PY) -m pytest -m gpu

bench: build
	$(PY) -m pefttorch bench

cmake-test: setup
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j $${MAX_JOBS:-2}
	cd build/cmake && ctest --output-on-failure

lint: setup
	$(PY) -m ruff check pefttorch tests bench tools setup.py

clean:
	rm -rf build pefttorch/*.so
