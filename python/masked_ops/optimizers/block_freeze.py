"""BlockFreeze: any Keras optimizer, with frozen weight entries kept bit-exact."""

import contextlib
import threading

import keras
import numpy as np
import tensorflow as tf

from masked_ops._loader import gpu_kernels_loaded
from masked_ops.layers._base import GRAD_MASK_TAG, MaskedKernelLayer
from masked_ops.ops import _ops, normalize_block_size

_MODES = {"assign": "assign", "assign_add": "add", "assign_sub": "sub"}


def masked_update(variable, value, mask, *, block_size=(32, 32), mode="assign"):
    """In place, where `mask` is non-zero: `variable = value` (mode "assign"),
    `+= value` ("add") or `-= value` ("sub"). Entries where it is zero are
    left exactly as they are, and blocks where it is zero throughout are never
    read or written. `mask` is element-level (the variable's shape) or
    block-level over the last two dimensions, as for `mask_gradients`."""
    rows, cols = normalize_block_size(block_size)
    variable = _tf_variable(variable)
    mask = tf.convert_to_tensor(mask)
    if isinstance(value, tf.IndexedSlices):
        _masked_sparse_update(variable, value, mask, rows, cols, mode)
        return
    value = tf.cast(value, variable.dtype)
    if not _kernels_run_on(variable):
        _masked_dense_update(variable, value, mask, rows, cols, mode)
        return
    _ops.masked_ops_masked_update_variable(variable.handle, value, mask, block_rows=rows, block_cols=cols, mode=mode)


def _kernels_run_on(variable):
    """Whether the masked ops' kernels run where `variable` lives: on a CPU
    always, on a GPU when its kernels were loaded (MASKED_OPS_GPU_KERNELS=1).
    An op that updates a variable must run on the variable's device."""
    device_type = tf.DeviceSpec.from_string(_tf_variable(variable).device or "").device_type
    return device_type in (None, "CPU") or (device_type == "GPU" and gpu_kernels_loaded())


def _masked_dense_update(variable, value, mask, rows, cols, mode):
    """masked_update in TensorFlow's own ops, for a variable where the masked
    ops have no kernel: every entry is read and written, frozen ones with
    their own bits. The live entries come from mask_gradient over ones in
    float64 (which keeps every non-zero mask value non-zero), on the CPU."""
    ones = tf.ones(tf.shape(variable), tf.float64)
    live = tf.not_equal(_ops.masked_ops_mask_gradient(ones, mask, block_rows=rows, block_cols=cols), 0.0)
    variable.assign(_updated_where_live(live, variable.read_value(), value, mode))


def _updated_where_live(live, current, value, mode):
    """`current` with `value` assigned, added or subtracted where `live`, and
    its own bits elsewhere (whatever `value` holds there)."""
    updated = {"assign": value, "add": current + value, "sub": current - value}[mode]
    return tf.where(live, updated, current)


def _masked_sparse_update(variable, value, mask, rows, cols, mode):
    """masked_update for row slices of a matrix: only the listed rows are
    touched, as Keras's scatter updates touch them, and their frozen entries
    are written back with their own bits."""
    indices = value.indices
    values = tf.cast(value.values, variable.dtype)
    if mode != "assign":
        # Repeated rows add up (as scatter_add adds them), then each row is
        # written once.
        indices, positions = tf.unique(indices)
        values = tf.math.unsorted_segment_sum(values, positions, tf.size(indices))
    if mask.shape.rank == variable.shape.rank and tuple(mask.shape) == tuple(variable.shape):
        row_masks = tf.gather(mask, indices)
    else:
        width = tf.shape(values)[1]
        row_masks = tf.repeat(tf.gather(mask, indices // rows), cols, axis=1)[:, :width]
    live = tf.not_equal(tf.cast(row_masks, tf.float32), 0.0) if row_masks.dtype != tf.bool else row_masks
    current = tf.gather(variable, indices)
    variable.scatter_update(
        tf.IndexedSlices(_updated_where_live(live, current, values, mode), indices, value.dense_shape)
    )


class _Freeze:
    """How one model variable is frozen: its mask (1 trains, 0 freezes, read
    at every step), the mask's block size and the variable's shape."""

    def __init__(self, mask, block_size, shape):
        self.mask = mask
        self.block_size = normalize_block_size(block_size)
        self.shape = tuple(shape)


# Guards installing and removing the masked methods on an inner optimizer.
# It is never held while a step runs: under tf.distribute the replicas of one
# step run in threads of their own and meet in merge calls.
_PATCH_LOCK = threading.Lock()


@keras.saving.register_keras_serializable(package="masked_ops")
class BlockFreeze(keras.optimizers.Optimizer):
    """Wraps a Keras optimizer so that frozen entries of chosen variables never change.

    For SGD (with momentum or Nesterov), Adam, AdamW and RMSprop, a frozen
    variable's step (moments and update) is one fused kernel that touches only
    trainable entries and skips frozen blocks. For any other optimizer, the
    wrapped optimizer computes its update as it always does, and every write
    it makes to a frozen variable, or to state of that variable's shape
    (Adagrad's accumulators, Adafactor's second moments of vectors), goes
    through a masked in-place update that leaves frozen entries exactly as
    they were and skips frozen blocks. Decoupled weight decay and variable constraints are applied to
    trainable entries only, the same way. So frozen entries stay bit-exact for
    any number of steps, even with moments built up before the freeze, and
    trainable entries move exactly as the wrapped optimizer moves them. State
    of other shapes (Adafactor's factored moments) is updated as usual, from
    gradients that are zero where frozen when the layer's grad_mask (or
    `mask_gradients`) made them so.

    Args:
      inner_optimizer: the `keras.optimizers.Optimizer` to wrap; its state is
        kept, so it may have trained before. Optimizers that replace Keras's
        own step (LossScaleOptimizer, another BlockFreeze, Muon's weight
        decay) or keep an EMA of the weights are refused: wrap a
        LossScaleOptimizer around the BlockFreeze instead.
      masks: None (the default): every trained kernel of a masked layer that
        has a grad_mask is frozen by it, found when the optimizer is built (so
        also after loading a saved model); or a Keras model, layer or list of
        layers, to limit that to their layers; or masks keyed by variable: a
        list of `(variable, mask)` pairs or a dict `{variable.path: mask}`,
        element- or block-level (1 = trainable, 0 = frozen). Mask values are
        read at every step and may change; which variables are frozen is
        fixed when a training function is traced, so after `set_masks` a
        compiled model needs compiling again.
      block_size: block size of the block-level masks given by variable.
    """

    def __init__(self, inner_optimizer, masks=None, *, block_size=(32, 32), name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"BlockFreeze takes no optimizer arguments of its own (got {sorted(kwargs)}); "
                "set them on the inner optimizer"
            )
        _check_wrappable(inner_optimizer)
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.block_size = normalize_block_size(block_size)
        self.set_masks(masks)

    def set_masks(self, masks):
        """Replaces what is frozen; see the class's `masks` argument."""
        # Kept out of Keras's tracking: masks are the layers' weights or the
        # caller's arrays, not optimizer state to checkpoint.
        self.__dict__["_masks"] = masks
        self.__dict__["_freezes"] = {}
        if self.built:
            self._resolve_masks(self._trainable_variables)

    def _resolve_masks(self, variables):
        masks = self._masks
        freezes = {}

        def freeze(variable, mask, block_size):
            if mask is not None:
                # Arrays stay arrays: build() may run inside the first traced
                # step, and a tensor made there belongs to that graph alone.
                mask = mask if isinstance(mask, (keras.Variable, tf.Tensor)) else np.array(mask)
                freezes[self.inner_optimizer._var_key(variable)] = _Freeze(mask, block_size, variable.shape)

        if isinstance(masks, dict):
            by_path = {variable.path: variable for variable in variables}
            unknown = sorted(set(masks) - set(by_path))
            if unknown:
                raise ValueError(f"BlockFreeze masks name variables that are not being trained: {unknown}")
            for path, mask in masks.items():
                freeze(by_path[path], mask, self.block_size)
        elif isinstance(masks, (list, tuple)) and masks and all(
            isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], keras.Variable)
            for item in masks
        ):
            for variable, mask in masks:
                freeze(variable, mask, self.block_size)
        else:
            layers = None if masks is None else list(
                _flatten_layers(masks if isinstance(masks, (list, tuple)) else [masks]))
            if layers is not None:
                unbuilt = [layer.name for layer in layers if isinstance(layer, MaskedKernelLayer) and not layer.built]
                if unbuilt:
                    raise ValueError(f"BlockFreeze needs the masked layers built to read their grad_mask: {unbuilt}")
            owners = None if layers is None else {id(layer.kernel) for layer in layers
                                                   if isinstance(layer, MaskedKernelLayer)}
            for variable in variables:
                tag = getattr(variable, GRAD_MASK_TAG, None)
                if tag is not None and (owners is None or id(variable) in owners):
                    freeze(variable, *tag)
        self.__dict__["_freezes"] = freezes

    def build(self, var_list):
        # An optimizer that has trained before keeps its state.
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._resolve_masks(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "BlockFreeze.apply without variables needs a built optimizer: call "
                    "optimizer.build(trainable_variables) first, or pass the variables"
                )
            variables = self._trainable_variables
        else:
            variables = list(trainable_variables)
            if not self.built:
                self.build(variables)
                self.built = True
        with self._masked_writes(), self._masked_constraints(variables):
            self.inner_optimizer.apply(grads, trainable_variables)

    def apply_gradients(self, grads_and_vars):
        super().apply_gradients(grads_and_vars)
        return self.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def _freeze_of(self, variable):
        return self._freezes.get(self.inner_optimizer._var_key(variable))

    @contextlib.contextmanager
    def _masked_constraints(self, variables):
        """Keras applies a variable's constraint by assigning the whole
        variable; for frozen variables it is held back and applied to the
        trainable entries only, after the step."""
        held = [(variable, variable.constraint) for variable in variables
                if variable.constraint is not None and self._freeze_of(variable) is not None]
        for variable, _ in held:
            variable.constraint = None
        try:
            yield
        finally:
            for variable, constraint in held:
                variable.constraint = constraint
        for variable, constraint in held:
            freeze = self._freeze_of(variable)
            masked_update(variable, constraint(variable), freeze.mask, block_size=freeze.block_size)

    @contextlib.contextmanager
    def _masked_writes(self):
        """Routes the inner optimizer's writes through masked updates while it
        updates a frozen variable (and while it applies weight decay). The
        masked methods stay installed while any step of this optimizer runs
        (replicas of a distributed step, concurrent steps), each thread keeping
        its own record of which variable it is updating."""
        inner = self.inner_optimizer
        with _PATCH_LOCK:
            if self.__dict__.get("_patch_users", 0) == 0:
                self.__dict__["_patches"] = self._masked_methods()
                inner.__dict__.update(self._patches)
            self.__dict__["_patch_users"] = self.__dict__.get("_patch_users", 0) + 1
        try:
            yield
        finally:
            with _PATCH_LOCK:
                self.__dict__["_patch_users"] -= 1
                if self._patch_users == 0:
                    for method in self._patches:
                        inner.__dict__.pop(method, None)

    def _masked_methods(self):
        inner = self.inner_optimizer
        local = threading.local()
        original_update_step = inner.update_step
        original_weight_decay = inner._apply_weight_decay

        def updating():
            if not hasattr(local, "stack"):
                local.stack = []
            return local.stack

        def update_step(gradient, variable, learning_rate):
            freeze = self._freeze_of(variable)
            if freeze is not None and _fused_step(inner, freeze, gradient, variable, learning_rate):
                return None
            updating().append(freeze)
            try:
                return original_update_step(gradient, variable, learning_rate)
            finally:
                updating().pop()

        def writer(method):
            original = getattr(inner, method)

            def write(variable, value):
                stack = updating()
                freeze = stack[-1] if stack else None
                if freeze is None or tuple(variable.shape) != freeze.shape:
                    return original(variable, value)
                masked_update(variable, value, freeze.mask, block_size=freeze.block_size, mode=_MODES[method])
                return None

            return write

        def apply_weight_decay(variables):
            # Keras's own decay for the variables that are not frozen; the
            # frozen ones decay where trainable only.
            original_weight_decay([v for v in variables if self._freeze_of(v) is None])
            if inner.weight_decay is None:
                return
            for variable in variables:
                freeze = self._freeze_of(variable)
                if freeze is None or not inner._use_weight_decay(variable):
                    continue
                learning_rate = tf.cast(inner.learning_rate, variable.dtype)
                weight_decay = tf.cast(inner.weight_decay, variable.dtype)
                masked_update(variable, variable * weight_decay * learning_rate, freeze.mask,
                              block_size=freeze.block_size, mode="sub")

        patches = {method: writer(method) for method in _MODES}
        patches["update_step"] = update_step
        patches["_apply_weight_decay"] = apply_weight_decay
        return patches

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


def _check_wrappable(optimizer):
    """Refuses optimizers whose writes BlockFreeze could not all mask."""
    base = keras.optimizers.Optimizer
    if not isinstance(optimizer, base):
        raise TypeError(f"BlockFreeze wraps a keras.optimizers.Optimizer, got {type(optimizer).__name__}")
    if type(optimizer).apply is not base.apply:
        raise ValueError(
            f"BlockFreeze cannot wrap {type(optimizer).__name__}, which applies steps its own way "
            "(a LossScaleOptimizer goes around the BlockFreeze instead: LossScaleOptimizer(BlockFreeze(...)))"
        )
    if type(optimizer)._apply_weight_decay is not base._apply_weight_decay:
        raise ValueError(f"BlockFreeze cannot wrap {type(optimizer).__name__}: it decays weights its own way")
    if optimizer.use_ema:
        raise ValueError("BlockFreeze cannot wrap an optimizer with use_ema: the EMA overwrites frozen weights")


def _tf_variable(variable):
    """The TensorFlow variable behind a Keras one (or the variable itself)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def _handle(variable):
    return _tf_variable(variable).handle


def _has_fused_step(optimizer):
    # Exact types only: a subclass may change the update.
    return type(optimizer) in (
        keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.SGD, keras.optimizers.RMSprop
    )


def _fused_step(inner, freeze, gradient, variable, learning_rate):
    """Runs inner's update of a frozen variable as one masked kernel when
    there is one for inner's type (and a dense gradient); False otherwise."""
    if not _has_fused_step(inner) or isinstance(gradient, tf.IndexedSlices) or not _kernels_run_on(variable):
        return False
    dtype = variable.dtype
    index = inner._get_variable_index(variable)
    rows, cols = freeze.block_size
    common = {"block_rows": rows, "block_cols": cols}
    lr = tf.cast(learning_rate, dtype)
    gradient = tf.cast(gradient, dtype)
    mask = tf.convert_to_tensor(freeze.mask)
    # Weight decay was applied before the step (see apply_weight_decay).
    no_decay = tf.constant(0, dtype)
    if isinstance(inner, keras.optimizers.SGD):
        use_momentum = inner.momentum != 0
        momentum = inner.momentums[index] if use_momentum else variable
        _ops.masked_ops_masked_sgd_step(
            _handle(variable), _handle(momentum), gradient, mask, lr, tf.cast(inner.momentum, dtype),
            no_decay, use_momentum=use_momentum, nesterov=bool(inner.nesterov), **common,
        )
        return True
    if isinstance(inner, keras.optimizers.RMSprop):
        use_momentum = inner.momentum > 0
        momentum = inner._momentums[index] if use_momentum else variable
        average_grad = inner._average_gradients[index] if inner.centered else variable
        _ops.masked_ops_masked_rmsprop_step(
            _handle(variable), _handle(inner._velocities[index]), _handle(momentum), _handle(average_grad),
            gradient, mask, lr, tf.constant(inner.rho, dtype), tf.constant(1 - inner.rho, dtype),
            tf.constant(inner.momentum, dtype), tf.constant(inner.epsilon, dtype), no_decay,
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
        tf.constant(inner.epsilon, dtype), lr, no_decay, amsgrad=bool(inner.amsgrad), **common,
    )
    return True


def _flatten_layers(layers):
    for layer in layers:
        yield layer
        if hasattr(layer, "_flatten_layers"):
            yield from layer._flatten_layers(include_self=False, recursive=True)
