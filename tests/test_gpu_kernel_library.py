"""The GPU kernel library (`_masked_ops_gpu.so`): shipped by a build with CUDA,
loaded only when MASKED_OPS_GPU_KERNELS=1, and then registering a GPU kernel
for every CPU kernel of every op. conftest.py opts the suite in wherever the
build has the library; the default is checked here in processes of their own."""

import collections
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from tensorflow.python.framework import kernels

import masked_ops
from masked_ops import _build_info, _loader

_GPU_KERNELS_LOADED = pytest.mark.skipif(
    not masked_ops.gpu_kernels_loaded(),
    reason="the GPU kernel library is not loaded (a build without CUDA, or MASKED_OPS_GPU_KERNELS=0)",
)


def _kernels_by_op_and_device():
    table = collections.defaultdict(list)
    for kernel in kernels.get_all_registered_kernels().kernel:
        if kernel.op.startswith("MaskedOps>"):
            table[kernel.op, kernel.device_type].append(kernel)
    return table


def _type_signature(kernel):
    return tuple(
        sorted((constraint.name, tuple(constraint.allowed_values.list.type)) for constraint in kernel.constraint)
    )


def _run_python(code, environ_changes, pythonpath=None):
    environ = {key: value for key, value in os.environ.items() if key != _loader.GPU_KERNELS_VARIABLE}
    environ.update(environ_changes)
    if pythonpath is not None:
        environ["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True, timeout=300
    )


_COUNT_GPU_KERNELS = """
    import masked_ops
    from tensorflow.python.framework import kernels
    devices = [k.device_type for k in kernels.get_all_registered_kernels().kernel if k.op.startswith("MaskedOps>")]
    print(masked_ops.gpu_kernels_loaded(), devices.count("CPU"), devices.count("GPU"))
"""


def test_the_gpu_kernel_library_ships_exactly_with_cuda():
    assert os.path.exists(_loader.GPU_KERNEL_LIBRARY_PATH) == _build_info.WITH_CUDA


def test_the_suite_runs_with_the_gpu_kernels_wherever_they_were_built():
    if os.environ.get(_loader.GPU_KERNELS_VARIABLE) == "0":
        pytest.skip("MASKED_OPS_GPU_KERNELS=0 was set for this run")
    assert masked_ops.gpu_kernels_loaded() == _build_info.WITH_CUDA


@_GPU_KERNELS_LOADED
def test_every_cpu_kernel_has_a_gpu_kernel_for_the_same_types():
    table = _kernels_by_op_and_device()
    ops = sorted({op for op, _ in table})
    assert ops
    for op in ops:
        cpu = [_type_signature(kernel) for kernel in table[op, "CPU"]]
        gpu = [_type_signature(kernel) for kernel in table[op, "GPU"]]
        assert len(set(gpu)) == len(gpu), op
        assert sorted(gpu) == sorted(cpu), op


@_GPU_KERNELS_LOADED
def test_no_gpu_kernel_takes_an_argument_in_host_memory():
    # The optimizer steps' scalars included: a step whose learning rate was
    # computed on the GPU must not wait for a copy of it to the host.
    for (op, device), registered in _kernels_by_op_and_device().items():
        if device == "GPU":
            assert all(not kernel.host_memory_arg for kernel in registered), op


@pytest.mark.parametrize("environ", [{}, {_loader.GPU_KERNELS_VARIABLE: ""}, {_loader.GPU_KERNELS_VARIABLE: "0"}],
                         ids=["unset", "empty", "0"])
def test_without_the_variable_no_gpu_kernel_is_registered(environ):
    result = _run_python(_COUNT_GPU_KERNELS, environ)
    assert result.returncode == 0, result.stderr
    loaded, cpu_kernels, gpu_kernels = result.stdout.split()
    assert (loaded, gpu_kernels) == ("False", "0") and int(cpu_kernels) > 0


@pytest.mark.skipif(not _build_info.WITH_CUDA, reason="a build without CUDA has no GPU kernels to load")
def test_the_variable_loads_the_gpu_kernels_in_a_fresh_process():
    result = _run_python(_COUNT_GPU_KERNELS, {_loader.GPU_KERNELS_VARIABLE: "1"})
    assert result.returncode == 0, result.stderr
    loaded, cpu_kernels, gpu_kernels = result.stdout.split()
    assert loaded == "True" and int(cpu_kernels) > 0 and gpu_kernels == cpu_kernels


def test_a_variable_other_than_0_or_1_is_refused():
    result = _run_python("import masked_ops", {_loader.GPU_KERNELS_VARIABLE: "yes"})
    assert result.returncode != 0
    assert "MASKED_OPS_GPU_KERNELS='yes': expected 0 or 1" in result.stderr


def test_asking_a_build_without_gpu_kernels_for_them_is_refused(tmp_path):
    package_dir = os.path.dirname(masked_ops.__file__)
    shutil.copytree(
        package_dir,
        tmp_path / "masked_ops",
        ignore=shutil.ignore_patterns("_masked_ops_gpu.so", "__pycache__"),
    )
    result = _run_python(
        "import masked_ops", {_loader.GPU_KERNELS_VARIABLE: "1"}, pythonpath=os.fspath(tmp_path)
    )
    assert result.returncode != 0
    assert "MASKED_OPS_GPU_KERNELS=1, but this build of masked_ops has no GPU kernels" in result.stderr
