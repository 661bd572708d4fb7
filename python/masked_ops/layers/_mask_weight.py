"""The saved, non-trainable mask weight that MaskedDense and MaskedConv2D share."""

import tensorflow as tf

GRANULARITIES = ("block", "element")
SUPPORTED_COMPUTE_DTYPES = ("float32", "float64")


class MaskWeightMixin:
    """A mask weight at block or element granularity, settable before or after build.

    The layer provides `_mask_shapes()` -> (element_shape, block_shape) once its
    kernel exists, and `_expand_block_mask(block_mask)` -> the element-level
    mask; it calls `_init_mask_weight(mask, mask_granularity)` from __init__
    and `_build_mask_weight()` at the end of build.
    """

    def _init_mask_weight(self, mask, mask_granularity, rank_options):
        if mask_granularity is not None and mask_granularity not in GRANULARITIES:
            raise ValueError(f"mask_granularity must be one of {GRANULARITIES}, got {mask_granularity!r}")
        self.mask_granularity = mask_granularity
        self._mask_ranks = rank_options
        self._pending_mask = None if mask is None else self._as_float_mask(mask)

    def _check_compute_dtype(self):
        if self.compute_dtype not in SUPPORTED_COMPUTE_DTYPES:
            raise TypeError(
                f"{type(self).__name__} computes in {SUPPORTED_COMPUTE_DTYPES}, not {self.compute_dtype}; "
                "use a float32 or float64 dtype policy"
            )

    def _build_mask_weight(self):
        element_shape, block_shape = self._mask_shapes()
        if self.mask_granularity is None:
            pending = None if self._pending_mask is None else tuple(self._pending_mask.shape)
            self.mask_granularity = "element" if pending == element_shape and pending != block_shape else "block"
        self.mask = self.add_weight(
            name="mask",
            shape=element_shape if self.mask_granularity == "element" else block_shape,
            initializer="ones",
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        if self._pending_mask is not None:
            pending, self._pending_mask = self._pending_mask, None
            self._assign_mask(pending)

    def set_mask(self, mask):
        """Replaces the mask; takes an element- or block-level array of any real or bool dtype.

        A block-level mask given to an element-granularity layer is expanded to
        its blocks; an element-level mask cannot be stored in a block-granularity
        layer (build the layer with `mask_granularity="element"`).
        """
        mask = self._as_float_mask(mask)
        if self.built:
            self._assign_mask(mask)
        else:
            self._pending_mask = mask

    def _assign_mask(self, mask):
        element_shape, block_shape = self._mask_shapes()
        shape = tuple(mask.shape)
        if shape == tuple(self.mask.shape):
            self.mask.assign(mask)
        elif self.mask_granularity == "element" and shape == block_shape:
            self.mask.assign(self._expand_block_mask(mask))
        else:
            raise ValueError(
                f"mask of shape {shape} fits neither this layer's {self.mask_granularity}-level "
                f"mask {tuple(self.mask.shape)} (element-level would be {element_shape}, "
                f"block-level {block_shape} for block size {self._block_size_for_messages()})"
            )

    def _as_float_mask(self, mask):
        mask = tf.convert_to_tensor(mask)
        if mask.shape.rank not in self._mask_ranks:
            raise ValueError(f"a mask must have rank {' or '.join(map(str, self._mask_ranks))}, got shape {mask.shape}")
        return tf.cast(mask, tf.float32)
