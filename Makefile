# The two set-up commands: `make test` and `make bench`. Each creates .venv if
# missing, installs the package with everything it needs, then runs.
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
PIP := $(VENV_PY) -m pip
STAMP := $(VENV)/.masked-ops-installed
SOURCES := $(shell find cc python build_tools -type f -not -name '*.pyc') CMakeLists.txt pyproject.toml
BUILD_DEPS := "scikit-build-core>=1.1" ninja "cmake>=3.21"
TF_REQUIREMENT := "tensorflow>=2.21,<2.22"

.PHONY: test bench wheel wheel-check gpu-test clean

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Built without isolation, against the venv's TensorFlow, so the library and
# the TensorFlow that loads it are the same build.
$(STAMP): $(VENV_PY) $(SOURCES)
	$(PIP) install $(TF_REQUIREMENT) $(BUILD_DEPS) pytest matplotlib scikit-learn
	$(PIP) install --no-build-isolation --no-deps .
	touch $@

test: $(STAMP)
	$(VENV_PY) -m pytest -q

bench: $(STAMP)
	$(VENV_PY) bench/run.py

wheel: $(STAMP)
	rm -rf dist
	$(PIP) wheel --no-build-isolation --no-deps -w dist .

# Installs the wheel, with its declared dependencies, into a fresh venv and
# runs the smoke test there, away from the source tree.
wheel-check: wheel
	rm -rf .wheel-check-venv
	$(PYTHON) -m venv .wheel-check-venv
	.wheel-check-venv/bin/python -m pip install --upgrade pip
	.wheel-check-venv/bin/python -m pip install dist/*.whl
	cd /tmp && $(CURDIR)/.wheel-check-venv/bin/python $(CURDIR)/tests/smoke.py

clean:
	rm -rf build dist .wheel-check-venv $(STAMP)

# On a machine with a GPU and PyTorch (TensorFlow not needed): builds the CUDA
# kernels and their TF-free harness, then runs tests/gpu against them.
gpu-test:
	cmake -S . -B build/gpu -G Ninja -DMASKED_OPS_TF=OFF -DMASKED_OPS_CUDA=ON
	cmake --build build/gpu --target masked_ops_cuda_harness
	$(PYTHON) -m pytest -q tests/gpu
