"""Keras 3 layers built on the masked ops."""

from masked_ops.layers.gated import Gated, GatedRows
from masked_ops.layers.masked_conv2d import MaskedConv2D
from masked_ops.layers.masked_dense import MaskedDense

__all__ = ["Gated", "GatedRows", "MaskedConv2D", "MaskedDense"]
