"""BlockFreeze: any Keras optimizer, with frozen weight entries kept bit-exact."""

import contextlib

import keras
import tensorflow as tf

from masked_ops.layers._base import MaskedKernelLayer
from masked_ops.ops import _ops, normalize_block_size

_MODES = {"assign": "assign", "assign_add": "add", "assign_sub": "sub"}


def masked_update(variable, value, mask, *, block_size=(32, 32), mode="assign"):
    """In place, where `mask` is non-zero: `variable = value` (mode "assign"),
    `+= value` ("add") or `-= value` ("sub"). Entries where it is zero are
    left exactly as they are, and blocks where it is zero throughout are never
    read or written. `mask` is element-level (the variable's shape) or
    block-level over the last two dimensions, as for `mask_gradients`."""
    rows, cols = normalize_block_size(block_size)
    if isinstance(variable, keras.Variable):
        variable = variable.value
    if isinstance(value, tf.IndexedSlices):
        value = tf.convert_to_tensor(value)
    value = tf.cast(value, variable.dtype)
    _ops.masked_ops_masked_update_variable(
        variable.handle, value, tf.convert_to_tensor(mask), block_rows=rows, block_cols=cols, mode=mode
    )


class _Freeze:
    """How one model variable is frozen: its mask (1 trains, 0 freezes, read
    at every step), the mask's block size and the variable's shape."""

    def __init__(self, mask, block_size, shape):
        self.mask = mask
        self.block_size = normalize_block_size(block_size)
        self.shape = tuple(shape)


@keras.saving.register_keras_serializable(package="masked_ops")
class BlockFreeze(keras.optimizers.Optimizer):
    """Wraps a Keras optimizer so that frozen entries of chosen variables never change.

    For SGD (with momentum or Nesterov), Adam, AdamW and RMSprop, a frozen variable's
    whole step (weight decay, moments, update) is one fused kernel that
    touches only trainable entries and skips frozen blocks. For any other
    optimizer, the wrapped optimizer computes its update as it always does, and
    every write it makes to a frozen variable, or to state of that variable's
    shape (AMSGrad's maximum, RMSprop's averages), and the decoupled weight
    decay, go through a masked in-place update that leaves frozen entries
    exactly as they were and skips frozen blocks. So frozen
    entries stay bit-exact for any number of steps, even with moments built up
    before the freeze, and trainable entries move exactly as the wrapped
    optimizer moves them. State of other shapes (Adafactor's factored moments)
    is updated as usual, from gradients that are zero where frozen when the
    layer's grad_mask (or `mask_gradients`) made them so.

    Args:
      inner_optimizer: the `keras.optimizers.Optimizer` to wrap; its state is
        kept, so it may have trained before.
      masks: a Keras model, layer or list of layers (every masked layer with a
        grad_mask freezes its kernel by it, read at every step); or masks
        keyed by variable: a list of `(variable, mask)` pairs or a dict
        `{variable.path: mask}`, element- or block-level (1 = trainable, 0 =
        frozen). May be given later with `set_masks`.
      block_size: block size of the block-level masks in a dict.
    """

    def __init__(self, inner_optimizer, masks=None, *, block_size=(32, 32), name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"BlockFreeze takes no optimizer arguments of its own (got {sorted(kwargs)}); "
                "set them on the inner optimizer"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.block_size = normalize_block_size(block_size)
        self._freezes = {}
        self._masks_by_path = None
        if masks is not None:
            self.set_masks(masks)

    def set_masks(self, masks):
        """Replaces what is frozen; see the class's `masks` argument."""
        self._masks_by_path = None
        self._freezes = {}
        if isinstance(masks, dict):
            # Keras variables are not hashable: paths name them until build
            # says which variables they are.
            self._masks_by_path = dict(masks)
            if self.built:
                self._resolve_paths(self._trainable_variables)
            return
        items = list(masks) if isinstance(masks, (list, tuple)) else [masks]
        if items and all(isinstance(item, tuple) and len(item) == 2 for item in items):
            for variable, mask in items:
                self._freeze_variable(variable, mask, self.block_size)
            return
        for layer in _flatten_layers(items):
            if isinstance(layer, MaskedKernelLayer) and layer.built and layer.grad_mask is not None:
                self._freeze_variable(layer.kernel, layer.grad_mask, layer._block_size())

    def _freeze_variable(self, variable, mask, block_size):
        if mask is None:
            return
        mask = mask if isinstance(mask, keras.Variable) else tf.convert_to_tensor(mask)
        self._freezes[self.inner_optimizer._var_key(variable)] = _Freeze(mask, block_size, variable.shape)

    def _resolve_paths(self, variables):
        by_path = {variable.path: variable for variable in variables}
        unknown = sorted(set(self._masks_by_path) - set(by_path))
        if unknown:
            raise ValueError(f"BlockFreeze masks name variables that are not being trained: {unknown}")
        for path, mask in self._masks_by_path.items():
            self._freeze_variable(by_path[path], mask, self.block_size)

    def build(self, var_list):
        # An optimizer that has trained before keeps its state.
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)
        if self._masks_by_path is not None:
            self._resolve_paths(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        with self._masked_writes():
            self.inner_optimizer.apply(grads, trainable_variables)

    def _freeze_of(self, variable):
        return self._freezes.get(self.inner_optimizer._var_key(variable))

    @contextlib.contextmanager
    def _masked_writes(self):
        """Routes the inner optimizer's writes through masked updates while it
        updates a frozen variable (and while it applies weight decay)."""
        inner = self.inner_optimizer
        updating = []
        original_update_step = inner.update_step

        def update_step(gradient, variable, learning_rate):
            freeze = self._freeze_of(variable)
            if freeze is not None and _fused_step(inner, freeze, gradient, variable, learning_rate):
                return None
            updating.append(freeze)
            try:
                return original_update_step(gradient, variable, learning_rate)
            finally:
                updating.pop()

        def writer(method):
            original = getattr(inner, method)

            def write(variable, value):
                freeze = updating[-1] if updating else None
                if freeze is None or tuple(variable.shape) != freeze.shape:
                    return original(variable, value)
                masked_update(variable, value, freeze.mask, block_size=freeze.block_size, mode=_MODES[method])
                return None

            return write

        def apply_weight_decay(variables):
            if inner.weight_decay is None:
                return
            for variable in variables:
                if not inner._use_weight_decay(variable):
                    continue
                learning_rate = tf.cast(inner.learning_rate, variable.dtype)
                weight_decay = tf.cast(inner.weight_decay, variable.dtype)
                decay = variable * weight_decay * learning_rate
                freeze = self._freeze_of(variable)
                if freeze is None:
                    inner.assign_sub(variable, decay)
                elif not _has_fused_step(inner):  # else the fused step decays it
                    masked_update(variable, decay, freeze.mask, block_size=freeze.block_size, mode="sub")

        patches = {method: writer(method) for method in _MODES}
        patches["update_step"] = update_step
        patches["_apply_weight_decay"] = apply_weight_decay
        inner.__dict__.update(patches)
        try:
            yield
        finally:
            for method in patches:
                inner.__dict__.pop(method, None)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "block_size": list(self.block_size),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def _handle(variable):
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


def _has_fused_step(optimizer):
    # Exact types only: a subclass may change the update.
    return type(optimizer) in (
        keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.SGD, keras.optimizers.RMSprop
    )


def _fused_step(inner, freeze, gradient, variable, learning_rate):
    """Runs inner's update of a frozen variable as one masked kernel (weight
    decay included) when there is one for inner's type; False otherwise."""
    if not _has_fused_step(inner) or isinstance(gradient, tf.IndexedSlices):
        return False
    dtype = variable.dtype
    index = inner._get_variable_index(variable)
    weight_decay = 0.0
    if inner.weight_decay is not None and inner._use_weight_decay(variable):
        weight_decay = inner.weight_decay
    rows, cols = freeze.block_size
    common = {"block_rows": rows, "block_cols": cols}
    lr = tf.cast(learning_rate, dtype)
    gradient = tf.cast(gradient, dtype)
    mask = tf.convert_to_tensor(freeze.mask)
    # As Keras computes them, so that live entries get the same numbers.
    decay_lr = tf.cast(inner.learning_rate, dtype)
    weight_decay = tf.cast(weight_decay, dtype)
    if isinstance(inner, keras.optimizers.SGD):
        use_momentum = inner.momentum != 0
        momentum = inner.momentums[index] if use_momentum else variable
        _ops.masked_ops_masked_sgd_step(
            _handle(variable), _handle(momentum), gradient, mask, lr, tf.cast(inner.momentum, dtype),
            weight_decay, use_momentum=use_momentum, nesterov=bool(inner.nesterov), **common,
        )
        return True
    if isinstance(inner, keras.optimizers.RMSprop):
        use_momentum = inner.momentum > 0
        momentum = inner._momentums[index] if use_momentum else variable
        average_grad = inner._average_gradients[index] if inner.centered else variable
        _ops.masked_ops_masked_rmsprop_step(
            _handle(variable), _handle(inner._velocities[index]), _handle(momentum), _handle(average_grad),
            gradient, mask, lr, tf.constant(inner.rho, dtype), tf.constant(1 - inner.rho, dtype),
            tf.constant(inner.momentum, dtype), tf.constant(inner.epsilon, dtype), weight_decay,
            use_momentum=use_momentum, centered=bool(inner.centered), **common,
        )
        return True
    local_step = tf.cast(inner.iterations + 1, dtype)
    beta_1_power = tf.pow(tf.cast(inner.beta_1, dtype), local_step)
    beta_2_power = tf.pow(tf.cast(inner.beta_2, dtype), local_step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m = inner._momentums[index]
    v = inner._velocities[index]
    v_hat = inner._velocity_hats[index] if inner.amsgrad else v
    _ops.masked_ops_masked_adam_step(
        _handle(variable), _handle(m), _handle(v), _handle(v_hat), gradient, mask, alpha,
        tf.constant(1 - inner.beta_1, dtype), tf.constant(1 - inner.beta_2, dtype),
        tf.constant(inner.epsilon, dtype), decay_lr, weight_decay, amsgrad=bool(inner.amsgrad), **common,
    )
    return True


def _flatten_layers(layers):
    for layer in layers:
        yield layer
        if hasattr(layer, "_flatten_layers"):
            yield from layer._flatten_layers(include_self=False, recursive=True)
