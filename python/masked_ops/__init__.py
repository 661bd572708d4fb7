"""TensorFlow ops whose fused kernels skip masked-out blocks of weights."""

from importlib.metadata import version as _version

from masked_ops import _loader

# Fail at import, not at the first op call, when the library cannot serve this
# TensorFlow.
_loader.op_library()

from masked_ops import freeze, keras, layers, optimizers  # noqa: E402
from masked_ops._loader import cpu_backend, gpu_kernels_loaded  # noqa: E402
from masked_ops.conv import masked_conv2d  # noqa: E402
from masked_ops.gradients import mask_gradients  # noqa: E402
from masked_ops.ops import expand_block_mask, masked_matmul  # noqa: E402

__all__ = ["cpu_backend", "expand_block_mask", "freeze", "gpu_kernels_loaded", "keras", "layers", "mask_gradients", "optimizers", "masked_conv2d", "masked_matmul"]
__version__ = _version("tf-masked-ops")
