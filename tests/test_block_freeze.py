"""BlockFreeze and masked_update: frozen entries stay bit-exact with every
optimizer, trainable ones move exactly as the wrapped optimizer moves them."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from masked_ops.layers import MaskedDense
from masked_ops.optimizers import BlockFreeze, block_freeze, masked_update
from reference import element_mask

BLOCK = (16, 8)
GRAD_MASK = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]], np.float32)
FROZEN = element_mask(GRAD_MASK, (40, 24), BLOCK) == 0

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "rmsprop-centered-momentum": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    "adafactor": lambda: keras.optimizers.Adafactor(0.01),
}


def train(make_optimizer, freeze, graph, steps_before=5, steps_after=50, pin_frozen=False):
    """Trains w ([40, 24], frozen by GRAD_MASK after `steps_before` steps) and
    an unfrozen bias, feeding masked gradients after the freeze, as the usual
    recipe does. `freeze` wraps the optimizer in BlockFreeze at that point;
    `pin_frozen` instead writes the frozen entries back after every step (the
    reference: the wrapped optimizer's own update with the same frozen
    weights)."""
    rng = np.random.default_rng(0)
    w = keras.Variable(rng.standard_normal((40, 24)).astype(np.float32), name="w")
    b = keras.Variable(np.zeros(24, np.float32), name="b")
    # Positive inputs and a softplus loss keep every gradient entry positive:
    # optimizers that divide by the gradient's own scale (RMSprop) would turn
    # rounding differences near a zero gradient into whole steps the other way.
    x = tf.constant(rng.random((16, 40)).astype(np.float32))
    optimizer = make_optimizer()

    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.softplus(tf.matmul(x, w.value) + b.value))
        return tape.gradient(loss, [w.value, b.value])

    for _ in range(steps_before):
        optimizer.apply(gradients(), [w, b])
    at_freeze = w.numpy().copy()
    if freeze:
        optimizer = BlockFreeze(optimizer, [(w, GRAD_MASK)], block_size=BLOCK)
    trainable = tf.constant((~FROZEN).astype(np.float32))

    def step():
        grad_w, grad_b = gradients()
        optimizer.apply([grad_w * trainable, grad_b], [w, b])
        if pin_frozen:
            w.assign(tf.where(FROZEN, at_freeze, w.value))

    step = tf.function(step) if graph else step
    for _ in range(steps_after):
        step()
    return at_freeze, w.numpy(), b.numpy()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_entries_stay_bit_exact_and_the_rest_trains_as_the_reference(name, graph):
    at_freeze, frozen_run, frozen_bias = train(OPTIMIZERS[name], freeze=True, graph=graph)
    _, reference_run, reference_bias = train(OPTIMIZERS[name], freeze=False, graph=graph, pin_frozen=True)
    np.testing.assert_array_equal(frozen_run[FROZEN], at_freeze[FROZEN])
    np.testing.assert_allclose(frozen_run[~FROZEN], reference_run[~FROZEN], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frozen_bias, reference_bias, rtol=1e-5, atol=1e-6)
    assert not np.allclose(frozen_run[~FROZEN], at_freeze[~FROZEN])


@pytest.mark.parametrize("name", ["momentum", "adam", "adamw"])
def test_the_naive_recipe_moves_frozen_weights_and_block_freeze_does_not(name):
    """The pitfall: multiplying gradients by the mask is not freezing when the
    optimizer carries momentum or decays weights."""
    at_freeze, naive, _ = train(OPTIMIZERS[name], freeze=False, graph=False, steps_after=5)
    assert np.abs(naive[FROZEN] - at_freeze[FROZEN]).max() > 1e-4
    at_freeze, frozen, _ = train(OPTIMIZERS[name], freeze=True, graph=False, steps_after=5)
    np.testing.assert_array_equal(frozen[FROZEN], at_freeze[FROZEN])


def frozen_model():
    inputs = keras.Input((40,))
    hidden = MaskedDense(24, block_size=BLOCK, activation="tanh", grad_mask=GRAD_MASK, name="hidden")(inputs)
    outputs = MaskedDense(3, block_size=8, grad_mask_granularity="element", name="out")(hidden)
    model = keras.Model(inputs, outputs)
    out = model.get_layer("out")
    out_mask = np.ones((24, 3), np.float32)
    out_mask[:8] = 0
    out.set_grad_mask(out_mask)
    return model


def test_model_fit_with_masks_read_from_the_layers():
    rng = np.random.default_rng(1)
    model = frozen_model()
    model.compile(optimizer=BlockFreeze(keras.optimizers.AdamW(0.01, weight_decay=0.05), model), loss="mse")
    x = rng.standard_normal((64, 40)).astype(np.float32)
    y = rng.standard_normal((64, 3)).astype(np.float32)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # moments everywhere, frozen or not
    hidden = model.get_layer("hidden").kernel.numpy().copy()
    out = model.get_layer("out").kernel.numpy().copy()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    np.testing.assert_array_equal(model.get_layer("hidden").kernel.numpy()[FROZEN], hidden[FROZEN])
    np.testing.assert_array_equal(model.get_layer("out").kernel.numpy()[:8], out[:8])
    assert not np.allclose(model.get_layer("out").kernel.numpy()[8:], out[8:])


def test_checkpoint_round_trip_keeps_optimizer_state_and_freezing(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 40)).astype(np.float32)
    y = rng.standard_normal((32, 3)).astype(np.float32)
    model = frozen_model()
    optimizer = BlockFreeze(keras.optimizers.Adam(0.01), model)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(os.path.join(tmp_path, "ckpt"))

    restored = frozen_model()
    restored_optimizer = BlockFreeze(keras.optimizers.Adam(0.01), restored)
    restored.compile(optimizer=restored_optimizer, loss="mse")
    restored_optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(model=restored, optimizer=restored_optimizer).restore(path).assert_existing_objects_matched()
    assert int(restored_optimizer.iterations.numpy()) == int(optimizer.iterations.numpy())
    for mine, theirs in zip(optimizer.variables, restored_optimizer.variables):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    hidden = restored.get_layer("hidden").kernel.numpy().copy()
    restored.fit(x, y, epochs=2, batch_size=8, verbose=0)
    np.testing.assert_array_equal(restored.get_layer("hidden").kernel.numpy()[FROZEN], hidden[FROZEN])


def test_block_freeze_serializes_with_its_inner_optimizer():
    optimizer = BlockFreeze(keras.optimizers.Adam(0.003, beta_1=0.8), block_size=(4, 8))
    clone = BlockFreeze.from_config(optimizer.get_config())
    assert isinstance(clone.inner_optimizer, keras.optimizers.Adam)
    assert clone.inner_optimizer.beta_1 == 0.8 and clone.block_size == (4, 8)
    np.testing.assert_allclose(float(clone.learning_rate), 0.003)


def run_without_kernels(monkeypatch):
    """As on a device where the masked ops have no kernel (a GPU without
    MASKED_OPS_GPU_KERNELS=1): the updates take TensorFlow's own ops."""
    monkeypatch.setattr(block_freeze, "_kernels_run_on", lambda variable: False)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "tensorflow-ops"])
@pytest.mark.parametrize("mode", ["assign", "add", "sub"])
@pytest.mark.parametrize("level", ["block", "element"])
def test_masked_update_writes_live_entries_only(mode, level, kernels, monkeypatch):
    if not kernels:
        run_without_kernels(monkeypatch)
    rng = np.random.default_rng(3)
    start = rng.standard_normal((2, 40, 24)).astype(np.float32)
    value = rng.standard_normal((2, 40, 24)).astype(np.float32)
    mask = GRAD_MASK if level == "block" else np.broadcast_to(element_mask(GRAD_MASK, (40, 24), BLOCK), (2, 40, 24)) * (
        rng.random((2, 40, 24)) < 0.7)
    live = np.broadcast_to(element_mask(GRAD_MASK, (40, 24), BLOCK), (2, 40, 24)) != 0 if level == "block" else mask != 0
    value[~live] = np.nan  # never read where frozen
    variable = tf.Variable(start)
    masked_update(variable, value, mask, block_size=BLOCK, mode=mode)
    expected = start.copy()
    expected[live] = {"assign": value, "add": start + value, "sub": start - value}[mode][live]
    np.testing.assert_array_equal(variable.numpy(), expected)


def test_masked_update_does_not_show_through_an_earlier_read():
    variable = tf.Variable(np.zeros((4, 4), np.float32))
    before = variable.read_value()
    masked_update(variable, np.ones((4, 4), np.float32), np.ones((1, 1)), block_size=4, mode="add")
    np.testing.assert_array_equal(before.numpy(), np.zeros((4, 4)))
    np.testing.assert_array_equal(variable.numpy(), np.ones((4, 4)))


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_masked_update_rejects_bad_shapes(graph):
    variable = tf.Variable(np.zeros((4, 6), np.float32))

    def call(value_shape, mask_shape):
        update = lambda: masked_update(variable, tf.zeros(value_shape), tf.ones(mask_shape), block_size=4)
        return tf.function(update)() if graph else update()

    with pytest.raises(tf.errors.InvalidArgumentError, match="the variable must have value's dtype and shape"):
        call((6, 4), (1, 2))
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must be element-level"):
        call((4, 6), (2, 2))


@pytest.mark.parametrize("name, fused_op", [("momentum", "MaskedOps>MaskedSgdStep"), ("adamw", "MaskedOps>MaskedAdamStep"),
                                            ("rmsprop-centered-momentum", "MaskedOps>MaskedRmspropStep"),
                                            ("adafactor", None)])
def test_frozen_variables_take_the_fused_step_where_there_is_one(name, fused_op):
    w = keras.Variable(np.ones((40, 24), np.float32))
    optimizer = BlockFreeze(OPTIMIZERS[name](), [(w, GRAD_MASK)], block_size=BLOCK)
    step = tf.function(lambda grad: optimizer.apply([grad], [w]))
    graph = step.get_concrete_function(tf.TensorSpec((40, 24), tf.float32)).graph
    op_types = {op.type for op in graph.get_operations()}
    fused_ops = {"MaskedOps>MaskedSgdStep", "MaskedOps>MaskedAdamStep", "MaskedOps>MaskedRmspropStep"}
    if fused_op is None:
        assert "MaskedOps>MaskedUpdateVariable" in op_types and not fused_ops & op_types
    else:
        assert fused_ops & op_types == {fused_op}


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("name", ["momentum", "adamw", "rmsprop-centered-momentum", "adafactor"])
def test_where_the_kernels_do_not_run_frozen_variables_take_tensorflows_own_ops(name, graph, monkeypatch):
    run_without_kernels(monkeypatch)
    at_freeze, frozen_run, _ = train(OPTIMIZERS[name], freeze=True, graph=graph)
    _, reference_run, _ = train(OPTIMIZERS[name], freeze=False, graph=graph, pin_frozen=True)
    np.testing.assert_array_equal(frozen_run[FROZEN], at_freeze[FROZEN])
    np.testing.assert_allclose(frozen_run[~FROZEN], reference_run[~FROZEN], rtol=1e-5, atol=1e-6)
    w = keras.Variable(np.ones((40, 24), np.float32))
    optimizer = BlockFreeze(OPTIMIZERS[name](), [(w, GRAD_MASK)], block_size=BLOCK)
    step = tf.function(lambda grad: optimizer.apply([grad], [w]))
    op_types = {op.type for op in step.get_concrete_function(tf.TensorSpec((40, 24), tf.float32)).graph.get_operations()}
    assert not {type_ for type_ in op_types if type_.startswith("MaskedOps>") and type_ != "MaskedOps>MaskGradient"}


class _PlacedVariable:
    def __init__(self, device):
        self.device = device


@pytest.mark.parametrize("device, gpu_kernels, expected", [
    ("/job:localhost/replica:0/task:0/device:CPU:0", False, True),
    ("", False, True),
    ("/job:localhost/replica:0/task:0/device:GPU:0", False, False),
    ("/job:localhost/replica:0/task:0/device:GPU:0", True, True),
    ("/device:TPU:0", True, False),
])
def test_variable_updates_take_the_kernels_only_where_they_run(device, gpu_kernels, expected, monkeypatch):
    monkeypatch.setattr(block_freeze, "gpu_kernels_loaded", lambda: gpu_kernels)
    assert block_freeze._kernels_run_on(_PlacedVariable(device)) is expected


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_fused_steps_reject_bad_inputs(graph):
    from masked_ops.ops import _ops

    variable = tf.Variable(np.zeros((4, 6), np.float32))
    wrong = tf.Variable(np.zeros((6, 4), np.float32))
    grad = tf.zeros((4, 6))
    scalar = tf.constant(0.1)

    def run(step):
        def call():
            step()  # the op, not its Operation, is the point

        (tf.function(call) if graph else call)()

    adam_scalars = ["alpha", "one_minus_beta_1", "one_minus_beta_2", "epsilon", "learning_rate", "weight_decay"]

    def adam(m, mask, not_scalar=None):
        scalars = [tf.ones((2,)) if name == not_scalar else scalar for name in adam_scalars]
        run(lambda: _ops.masked_ops_masked_adam_step(
            variable.handle, m.handle, variable.handle, variable.handle, grad, mask, *scalars,
            amsgrad=False, block_rows=4, block_cols=4))

    with pytest.raises(tf.errors.InvalidArgumentError, match="m must have grad's dtype and shape"):
        adam(wrong, tf.ones((1, 2)))
    for name in adam_scalars:
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"{name} must be a scalar, got shape \\[2\\]"):
            adam(variable, tf.ones((1, 2)), not_scalar=name)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must be element-level"):
        adam(variable, tf.ones((3, 3)))

    with pytest.raises(tf.errors.InvalidArgumentError, match="momentum must have grad's dtype and shape"):
        run(lambda: _ops.masked_ops_masked_sgd_step(
            variable.handle, wrong.handle, grad, tf.ones((1, 2)), scalar, scalar, scalar,
            use_momentum=True, nesterov=False, block_rows=4, block_cols=4))


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_sparse_gradients_of_a_frozen_embedding(name):
    rng = np.random.default_rng(6)
    table = keras.Variable(rng.standard_normal((48, 16)).astype(np.float32))
    frozen_rows = np.zeros((48, 16), bool)
    frozen_rows[16:32] = True
    optimizer = BlockFreeze(OPTIMIZERS[name](), [(table, (~frozen_rows).astype(np.float32))])
    before = table.numpy().copy()
    for step in range(5):
        ids = tf.constant(rng.integers(0, 48, 12))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(tf.gather(table.value, ids)))
        grad = tape.gradient(loss, table.value)
        assert isinstance(grad, tf.IndexedSlices)
        optimizer.apply([grad], [table])
    np.testing.assert_array_equal(table.numpy()[frozen_rows], before[frozen_rows])
    assert not np.allclose(table.numpy()[~frozen_rows], before[~frozen_rows])


def test_weight_decay_of_a_frozen_variable_with_sparse_gradients():
    """AdamW decays every trainable entry, also of rows that got no gradient;
    frozen rows neither decay nor move."""
    rng = np.random.default_rng(8)
    table = keras.Variable(rng.standard_normal((32, 8)).astype(np.float32))
    trainable = np.ones((32, 8), np.float32)
    trainable[8:16] = 0
    optimizer = BlockFreeze(keras.optimizers.AdamW(0.01, weight_decay=0.5), [(table, trainable)])
    before = table.numpy().copy()
    ids = tf.constant([0, 1, 8, 9])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table.value, ids))
    optimizer.apply([tape.gradient(loss, table.value)], [table])
    after = table.numpy()
    np.testing.assert_array_equal(after[8:16], before[8:16])
    np.testing.assert_allclose(after[20:], before[20:] * (1 - 0.5 * 0.01), rtol=1e-6)
    assert np.all(after[:2] != before[:2])


@pytest.mark.parametrize("make", [
    lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
    lambda: BlockFreeze(keras.optimizers.SGD(0.1)),
    lambda: keras.optimizers.Muon(),
    lambda: keras.optimizers.Adam(use_ema=True),
], ids=["loss-scale", "block-freeze", "muon", "ema"])
def test_optimizers_whose_writes_cannot_be_masked_are_refused(make):
    with pytest.raises(ValueError, match="BlockFreeze cannot wrap"):
        BlockFreeze(make())


def test_loss_scaling_goes_around_block_freeze_and_scale_factors_are_forwarded():
    w = keras.Variable(np.ones((16, 8), np.float32))
    frozen = np.zeros((16, 8), bool)
    frozen[:8] = True
    optimizer = keras.optimizers.LossScaleOptimizer(
        BlockFreeze(keras.optimizers.SGD(0.1, momentum=0.9), [(w, (~frozen).astype(np.float32))]))
    for _ in range(3):
        optimizer.apply([optimizer.scale_loss(tf.ones((16, 8)))], [w])
    assert np.all(w.numpy()[frozen] == 1) and np.all(w.numpy()[~frozen] < 1)
    scaled = BlockFreeze(keras.optimizers.SGD(0.1, loss_scale_factor=128.0))
    assert float(scaled.scale_loss(1.0)) == 128.0


def test_constraints_apply_to_trainable_entries_only():
    rng = np.random.default_rng(9)
    layer = MaskedDense(8, block_size=8, kernel_constraint=keras.constraints.MaxNorm(0.5),
                        grad_mask=np.array([[1.0], [0.0]], np.float32))
    model = keras.Sequential([keras.Input((16,)), layer])
    model.compile(optimizer=BlockFreeze(keras.optimizers.SGD(0.1)), loss="mse")
    layer.kernel.assign(rng.standard_normal((16, 8)).astype(np.float32) * 3)
    before = layer.kernel.numpy().copy()
    model.fit(rng.standard_normal((8, 16)), rng.standard_normal((8, 8)), epochs=2, verbose=0)
    np.testing.assert_array_equal(layer.kernel.numpy()[8:], before[8:])
    # MaxNorm over axis 0 scales whole columns; the trainable rows were rescaled by it.
    assert not np.allclose(layer.kernel.numpy()[:8], before[:8])


def test_masks_are_found_at_build_and_survive_saving(tmp_path):
    """No masks given: the layers' grad_masks, read when the optimizer is
    built, so also for layers built late and for a loaded model."""
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((32, 40)).astype(np.float32), rng.standard_normal((32, 3)).astype(np.float32)
    model = keras.Sequential([
        MaskedDense(24, block_size=BLOCK, activation="tanh", grad_mask=GRAD_MASK, name="hidden"),
        MaskedDense(3, block_size=8, name="out"),
    ])
    model.compile(optimizer=BlockFreeze(keras.optimizers.AdamW(0.01, weight_decay=0.1)), loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # builds the layers, then the optimizer
    hidden = model.get_layer("hidden").kernel.numpy().copy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(model.get_layer("hidden").kernel.numpy()[FROZEN], hidden[FROZEN])
    path = os.path.join(tmp_path, "frozen.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, BlockFreeze)
    hidden = loaded.get_layer("hidden").kernel.numpy().copy()
    loaded.fit(x, y, epochs=2, batch_size=8, verbose=0)
    np.testing.assert_array_equal(loaded.get_layer("hidden").kernel.numpy()[FROZEN], hidden[FROZEN])
    assert not np.allclose(loaded.get_layer("hidden").kernel.numpy()[~FROZEN], hidden[~FROZEN])


@pytest.mark.parametrize("mode", ["assign", "add", "sub"])
def test_masked_update_with_row_slices_touches_only_their_rows(mode):
    rng = np.random.default_rng(11)
    start = rng.standard_normal((12, 8)).astype(np.float32)
    variable = tf.Variable(start)
    mask = np.ones((12, 8), np.float32)
    mask[:, :4] = 0
    rows = [2, 5, 5] if mode != "assign" else [2, 5]
    values = rng.standard_normal((len(rows), 8)).astype(np.float32)
    masked_update(variable, tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant([12, 8])),
                  mask, block_size=4, mode=mode)
    expected = start.copy()
    for row, value in zip(rows, values):
        live = mask[row] != 0
        expected[row, live] = {"assign": value, "add": expected[row] + value, "sub": expected[row] - value}[mode][live]
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6, atol=1e-6)
    untouched = [r for r in range(12) if r not in rows]
    np.testing.assert_array_equal(variable.numpy()[untouched], start[untouched])


def test_apply_without_variables_needs_a_built_optimizer():
    with pytest.raises(ValueError, match="needs a built optimizer"):
        BlockFreeze(keras.optimizers.SGD(0.1)).apply([tf.zeros((2, 2))])


def test_array_masks_survive_a_step_traced_after_the_one_that_built_the_optimizer():
    """BlockFreeze built inside the first traced step: a later trace (a new
    input signature, a second tf.function) must not reach for a mask tensor
    of the first trace's graph."""
    w = keras.Variable(np.ones((40, 24), np.float32))
    optimizer = BlockFreeze(keras.optimizers.SGD(0.1, momentum=0.9), [(w, GRAD_MASK)], block_size=BLOCK)
    tf.function(lambda grad: optimizer.apply([grad], [w]))(tf.ones((40, 24)))
    tf.function(lambda grad: optimizer.apply([grad], [w]))(tf.ones((40, 24)))
    assert (w.numpy()[FROZEN] == 1).all() and (w.numpy()[~FROZEN] < 1).all()
