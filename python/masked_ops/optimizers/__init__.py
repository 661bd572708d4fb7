"""Optimizer wrappers built on the masked ops."""

from masked_ops.optimizers.block_freeze import BlockFreeze, masked_update

__all__ = ["BlockFreeze", "masked_update"]
