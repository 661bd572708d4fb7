"""Keras 3 layers built on the masked ops."""

from masked_ops.layers.masked_dense import MaskedDense

__all__ = ["MaskedDense"]
