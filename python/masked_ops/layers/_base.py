"""What MaskedDense and MaskedConv2D share: a kernel and bias made like
Keras's own, a saved mask weight, and an optional saved grad_mask weight."""

import keras
import tensorflow as tf

GRANULARITIES = ("block", "element")
# Set on a masked layer's kernel variable that has a grad_mask: (grad_mask
# weight, block size), which BlockFreeze reads to freeze the kernel.
GRAD_MASK_TAG = "_masked_ops_grad_mask"
SUPPORTED_COMPUTE_DTYPES = ("float32", "float64", "float16", "bfloat16")


class _MaskSlot:
    """One mask weight: its granularity (None until build unless given) and
    a value set before build."""

    def __init__(self, name, granularity, pending):
        if granularity is not None and granularity not in GRANULARITIES:
            raise ValueError(f"{name}_granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.name = name
        self.granularity = granularity
        self.pending = pending


class MaskedKernelLayer(keras.layers.Layer):
    """Base of the masked layers.

    A subclass provides `_block_size()` (the mask's block shape, for messages),
    `_mask_shapes()` -> (element_shape, block_shape) once the kernel exists and
    `_expand_block_mask(block_mask)`; it calls `_build_weights(kernel_shape,
    bias_size)` from build and `_bias_and_activation(outputs)` at the end of
    call.

    The mask is a weight (ones by default) unless the layer is made with
    `use_mask=False`: then it has none (`mask` is None) and runs TensorFlow's
    dense product and input gradient, for freezing alone. The grad_mask weight exists
    when the layer is made with `grad_mask` or `grad_mask_granularity`, or
    `set_grad_mask` is called before build: it freezes the kernel's entries
    where it is zero (their gradient is exactly 0 and never computed).
    """

    def __init__(
        self,
        *,
        use_mask,
        mask,
        mask_granularity,
        grad_mask,
        grad_mask_granularity,
        mask_ranks,
        activation,
        use_bias,
        kernel_initializer,
        bias_initializer,
        kernel_regularizer,
        bias_regularizer,
        activity_regularizer,
        kernel_constraint,
        bias_constraint,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self._mask_ranks = mask_ranks
        self.use_mask = bool(use_mask)
        if not self.use_mask and (mask is not None or mask_granularity is not None):
            raise ValueError("a layer made with use_mask=False takes no mask or mask_granularity")
        self._mask_slot = _MaskSlot("mask", mask_granularity, self._as_float_mask(mask)) if self.use_mask else None
        self.mask = None
        wants_grad_mask = grad_mask is not None or grad_mask_granularity is not None
        self._grad_mask_slot = (
            _MaskSlot("grad_mask", grad_mask_granularity, self._as_float_mask(grad_mask)) if wants_grad_mask else None
        )
        self.grad_mask = None

    @property
    def mask_granularity(self):
        return None if self._mask_slot is None else self._mask_slot.granularity

    @property
    def grad_mask_granularity(self):
        return None if self._grad_mask_slot is None else self._grad_mask_slot.granularity

    def _build_weights(self, kernel_shape, bias_size):
        if self.compute_dtype not in SUPPORTED_COMPUTE_DTYPES:
            raise TypeError(
                f"{type(self).__name__} computes in {SUPPORTED_COMPUTE_DTYPES}, not {self.compute_dtype}; "
                "use a policy that computes in one of those"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=kernel_shape,
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(bias_size,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            if self.use_bias
            else None
        )
        if self._mask_slot is not None:
            self.mask = self._build_mask(self._mask_slot)
        if self._grad_mask_slot is not None:
            self.grad_mask = self._build_mask(self._grad_mask_slot)
            setattr(self.kernel, GRAD_MASK_TAG, (self.grad_mask, self._block_size()))

    def _build_mask(self, slot):
        element_shape, block_shape = self._mask_shapes()
        if slot.granularity is None:
            pending = None if slot.pending is None else tuple(slot.pending.shape)
            slot.granularity = "element" if pending == element_shape and pending != block_shape else "block"
        shape = element_shape if slot.granularity == "element" else block_shape
        initializer = "ones"
        if slot.pending is not None:
            # The value goes in as the initializer, not as an assign after
            # creation: a layer built while a function is traced (a Sequential
            # without an Input) would lose an assign to the trace.
            value = self._fitted_mask(slot, shape, slot.pending)
            slot.pending = None
            initializer = lambda shape, dtype=None: tf.cast(value, dtype or "float32")  # noqa: E731
        return self.add_weight(
            name=slot.name, shape=shape, initializer=initializer, trainable=False, dtype="float32", autocast=False
        )

    def set_mask(self, mask):
        """Replaces the mask; takes an element- or block-level array of any real or bool dtype.

        A block-level mask given to an element-granularity layer is expanded to
        its blocks; an element-level mask cannot be stored in a block-granularity
        layer (build the layer with `mask_granularity="element"`).
        """
        if self._mask_slot is None:
            raise ValueError(f"layer {self.name!r} was made with use_mask=False and has no mask")
        self._set(self._mask_slot, self.mask if self.built else None, mask)

    def set_grad_mask(self, grad_mask):
        """Replaces the grad_mask (1 = trainable, 0 = frozen), like `set_mask`.

        After build, only a layer made with `grad_mask` or
        `grad_mask_granularity` has a grad_mask weight to set.
        """
        if self._grad_mask_slot is None:
            if self.built:
                raise ValueError(
                    f"layer {self.name!r} has no grad_mask weight: make it with grad_mask_granularity="
                    '"block" (or "element") to freeze blocks after it is built'
                )
            self._grad_mask_slot = _MaskSlot("grad_mask", None, None)
        self._set(self._grad_mask_slot, self.grad_mask if self.built else None, grad_mask)

    def _set(self, slot, weight, mask):
        mask = self._as_float_mask(mask)
        if weight is None:
            slot.pending = mask
        else:
            self._assign_mask(slot, weight, mask)

    def _assign_mask(self, slot, weight, mask):
        weight.assign(self._fitted_mask(slot, tuple(weight.shape), mask))

    def _fitted_mask(self, slot, shape, mask):
        """mask as the slot's weight of `shape` holds it: as is, or a block
        mask expanded for an element-granularity weight."""
        element_shape, block_shape = self._mask_shapes()
        given = tuple(mask.shape)
        if given == shape:
            return mask
        if slot.granularity == "element" and given == block_shape:
            return self._expand_block_mask(mask)
        raise ValueError(
            f"{slot.name} of shape {given} fits neither this layer's {slot.granularity}-level "
            f"{slot.name} {shape} (element-level would be {element_shape}, "
            f"block-level {block_shape} for block size {self._block_size()})"
        )

    def _as_float_mask(self, mask):
        if mask is None:
            return None
        mask = tf.convert_to_tensor(mask)
        if mask.shape.rank not in self._mask_ranks:
            raise ValueError(f"a mask must have rank {' or '.join(map(str, self._mask_ranks))}, got shape {mask.shape}")
        return tf.cast(mask, tf.float32)

    def _bias_and_activation(self, outputs):
        if self.bias is not None:
            outputs = tf.nn.bias_add(outputs, self.bias)
        return self.activation(outputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "use_mask": self.use_mask,
                "mask_granularity": self.mask_granularity,
                "grad_mask_granularity": self.grad_mask_granularity,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": keras.regularizers.serialize(self.activity_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            }
        )
        return config
