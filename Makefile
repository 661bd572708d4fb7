# The two set-up commands: `make test` and `make bench`. Each creates .venv if
# missing, installs the package with everything it needs, then runs.
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
PIP := $(VENV_PY) -m pip
STAMP := $(VENV)/.masked-ops-installed
SOURCES := $(shell find cc python build_tools -type f -not -name '*.pyc') CMakeLists.txt pyproject.toml Makefile
BUILD_DEPS := "scikit-build-core>=1.1" ninja "cmake>=3.21"
TF_REQUIREMENT := "tensorflow>=2.21,<2.22"
# Read the sm_90a SASS of the CUDA kernels in tests/test_warpgroup_sass.py
# (the CUDA toolkit here has nvcc but neither of these).
SASS_TOOLS := "nvidia-cuda-cuobjdump>=13,<14" "nvidia-cuda-nvdisasm>=13,<14"

.PHONY: test bench wheel wheel-check gpu-test sanitize fuzz clean

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Built without isolation, against the venv's TensorFlow, so the library and
# the TensorFlow that loads it are the same build.
$(STAMP): $(VENV_PY) $(SOURCES)
	$(PIP) install $(TF_REQUIREMENT) $(BUILD_DEPS) $(SASS_TOOLS) pytest hypothesis matplotlib scikit-learn
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

# The op library built with AddressSanitizer and UndefinedBehaviorSanitizer,
# put in front of the installed package (PYTHONPATH), and the tests in
# SANITIZE_TESTS run against it. TensorFlow and Python are not instrumented:
# the ASan runtime is preloaded so that it comes first, and libstdc++ with it
# so that its exception interceptors find the real __cxa_throw. Leak detection is off
# (TensorFlow keeps allocations alive at exit); container-overflow checks are
# off because TensorFlow's uninstrumented code shares std::vector with ours.
# Allocations over 4 GiB fail (as the fuzzer's address-space limit makes
# them fail without sanitizers), so that refusing them is what gets tested.
SANITIZE_BUILD := $(CURDIR)/build/sanitize
SANITIZE_TESTS ?= tests/test_masked_matmul.py tests/test_masked_conv2d.py tests/test_grad_mask.py \
	tests/test_mask_gradients.py tests/test_half_types.py tests/test_raw_op_fuzz.py tests/test_properties.py \
	tests/test_non_finite.py tests/test_concurrency.py
SANITIZE_ENV := PYTHONPATH=$(SANITIZE_BUILD)/site \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:detect_container_overflow=0:halt_on_error=1:allocator_may_return_null=1:max_allocation_size_mb=4096 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

sanitize: $(STAMP)
	cmake -S . -B $(SANITIZE_BUILD) -G Ninja -DPython_EXECUTABLE=$(CURDIR)/$(VENV_PY) \
		-DMASKED_OPS_CUDA=OFF -DMASKED_OPS_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(SANITIZE_BUILD)
	cmake --install $(SANITIZE_BUILD) --prefix $(SANITIZE_BUILD)/site
	cp -r python/masked_ops/. $(SANITIZE_BUILD)/site/masked_ops/
	$(SANITIZE_ENV) $(VENV_PY) -c "import masked_ops, sys; sys.exit(not masked_ops.__file__.startswith('$(SANITIZE_BUILD)/'))"
	$(SANITIZE_ENV) $(VENV_PY) -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS)

# A crash-fuzzing campaign over the raw ops: FUZZ_CASES cases from FUZZ_SEED
# (a new seed each run unless given).
FUZZ_CASES ?= 100000
fuzz: $(STAMP)
	$(VENV_PY) tests/fuzz_raw_ops.py --cases $(FUZZ_CASES) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# On a machine with a GPU and PyTorch (TensorFlow not needed): builds the CUDA
# kernels and their TF-free harness, then runs tests/gpu against them.
gpu-test:
	cmake -S . -B build/gpu -G Ninja -DMASKED_OPS_TF=OFF -DMASKED_OPS_CUDA=ON
	cmake --build build/gpu --target masked_ops_cuda_harness
	$(PYTHON) -m pytest -q tests/gpu
