"""The Keras workflow: swap masked layers into an existing model and back,
and make masks for them."""

from masked_ops.keras.masks import densities, magnitude_masks, n_m_mask, random_masks
from masked_ops.keras.pruning import PruningCallback, polynomial_density
from masked_ops.keras.sparsify import sparsify, strip

__all__ = [
    "PruningCallback", "densities", "magnitude_masks", "n_m_mask", "polynomial_density", "random_masks",
    "sparsify", "strip",
]
