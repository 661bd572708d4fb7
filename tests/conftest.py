import importlib.util
import os

# Before TensorFlow is first imported: keep its start-up chatter out of test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The suite runs with the GPU kernels loaded wherever the build has them, so
# that a CUDA-enabled build is shown to load and pass on a machine without a
# GPU (and, on one with a GPU and TensorFlow, runs the ops there).
# test_gpu_kernel_library.py checks the default, without them, in processes
# of its own.
_package = importlib.util.find_spec("masked_ops")
if _package is not None and os.path.exists(
    os.path.join(_package.submodule_search_locations[0], "_masked_ops_gpu.so")
):
    os.environ.setdefault("MASKED_OPS_GPU_KERNELS", "1")
