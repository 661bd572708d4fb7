"""Masked models in the Keras workflow: SavedModel export served from a fresh
process, and the compilation modes."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from masked_ops.layers import MaskedConv2D, MaskedDense

SERVE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import tensorflow as tf
    if sys.argv[2] == "with-library":
        import masked_ops
    model = tf.saved_model.load(os.path.join(sys.argv[1], "model"))
    y = model.serve(np.load(os.path.join(sys.argv[1], "x.npy")))
    print(np.abs(y.numpy() - np.load(os.path.join(sys.argv[1], "y.npy"))).max())
    """
)


def small_model():
    inputs = keras.Input((8, 8, 16))
    hidden = MaskedConv2D(16, 3, padding="same", channel_block=8, mask=np.array([[1.0, 0.0], [1.0, 1.0]]))(inputs)
    outputs = MaskedDense(4, block_size=8, grad_mask_granularity="block")(keras.layers.Flatten()(hidden))
    return keras.Model(inputs, outputs)


def serve(directory, mode):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", SERVE, directory, mode], capture_output=True, text=True, env=env,
                          cwd="/", timeout=300)


def test_exported_saved_model_serves_in_a_fresh_process(tmp_path):
    model = small_model()
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype(np.float32)
    model.export(str(tmp_path / "model"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x).numpy())
    served = serve(str(tmp_path), "with-library")
    assert served.returncode == 0, served.stderr[-3000:]
    assert float(served.stdout.split()[-1]) == 0.0
    # Without the op library, loading fails and names the missing op.
    missing = serve(str(tmp_path), "without-library")
    assert missing.returncode != 0
    assert "Op type not registered 'MaskedOps>" in missing.stderr


def test_compilation_modes():
    """jit_compile="auto" (Keras's default) trains without XLA; jit_compile=True
    fails with an error naming the op, since the ops have no XLA kernels."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    auto = keras.Sequential([keras.Input((16,)), MaskedDense(8, block_size=8), keras.layers.Dense(2)])
    auto.compile(optimizer="sgd", loss="mse")
    auto.fit(x, y, epochs=1, verbose=0)
    assert auto.jit_compile is False
    jit = keras.Sequential([keras.Input((16,)), MaskedDense(8, block_size=8), keras.layers.Dense(2)])
    jit.compile(optimizer="sgd", loss="mse", jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="XLA_CPU_JIT: MaskedOps>MaskedMatmul"):
        jit.fit(x, y, epochs=1, verbose=0)


MIRRORED = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from masked_ops.layers import MaskedConv2D, MaskedDense
    from masked_ops.optimizers import BlockFreeze

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 16))
        h = MaskedConv2D(16, 3, padding="same", activation="relu", channel_block=8,
                         mask=np.array([[1.0, 0.0], [1.0, 1.0]]))(inputs)
        h = keras.layers.GlobalAveragePooling2D()(h)
        outputs = MaskedDense(4, block_size=8, mask=np.array([[1.0], [0.0]]), grad_mask=np.array([[0.0], [1.0]]))(h)
        model = keras.Model(inputs, outputs)
        optimizer = keras.optimizers.SGD(0.1) if sys.argv[1] == "sgd" else BlockFreeze(keras.optimizers.Adam(0.01))
        model.compile(optimizer=optimizer, loss="mse")
        return model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8, 8, 16)).astype(np.float32)
    y = rng.standard_normal((32, 4)).astype(np.float32)
    single = build()
    single.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = build()
    mirrored.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    print(strategy.num_replicas_in_sync,
          max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), mirrored.get_weights())))
    """
)


@pytest.mark.parametrize("optimizer", ["sgd", "block-freeze"])
def test_mirrored_strategy_trains_like_one_device(optimizer):
    """Two logical CPU devices (set up before TensorFlow starts, hence a fresh
    process) give the weights of single-device training."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", MIRRORED, optimizer], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    replicas, difference = result.stdout.split()[-2:]
    assert int(replicas) == 2
    assert float(difference) < 1e-5
