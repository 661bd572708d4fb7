"""Smoke test for an installed wheel, run outside the source tree by `make wheel-check`."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import masked_ops  # noqa: E402
from masked_ops import _build_info  # noqa: E402

rng = np.random.default_rng(0)
x = tf.constant(rng.standard_normal((5, 40)).astype(np.float32))
w = tf.constant(rng.standard_normal((40, 24)).astype(np.float32))
block_mask = np.array([[1, 0], [0, 1]], np.float32)
element_mask = masked_ops.expand_block_mask(block_mask, (40, 24), (32, 16)).numpy()

with tf.GradientTape() as tape:
    tape.watch([x, w])
    y = masked_ops.masked_matmul(x, w, block_mask, block_size=(32, 16))
dx, dw = tape.gradient(y, [x, w])
np.testing.assert_allclose(y, x.numpy() @ (w.numpy() * element_mask), rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(dw, x.numpy().T @ np.ones((5, 24), np.float32) * element_mask, rtol=1e-5, atol=1e-5)
assert dx.shape == x.shape

layer = masked_ops.layers.MaskedDense(3, block_size=8)
assert layer(x).shape == (5, 3)

# A wheel built with CUDA ships the GPU kernels, which load (on request)
# into this CUDA-enabled TensorFlow whether or not the machine has a GPU.
if _build_info.WITH_CUDA:
    loaded = subprocess.run(
        [sys.executable, "-c", "import masked_ops; assert masked_ops.gpu_kernels_loaded()"],
        env={**os.environ, "MASKED_OPS_GPU_KERNELS": "1"},
        check=False,
    )
    assert loaded.returncode == 0, "the GPU kernels did not load"
print(
    f"smoke test passed: masked_ops {masked_ops.__version__} with TensorFlow {tf.__version__}"
    f"{', GPU kernels load' if _build_info.WITH_CUDA else ''}"
)
