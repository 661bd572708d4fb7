"""Gradual pruning during fit: masks emptied block by block on a polynomial
schedule, so that training speeds up as they empty."""

import keras
import numpy as np

from masked_ops.freeze import block_norms
from masked_ops.layers._base import MaskedKernelLayer


def polynomial_density(step, *, target_density, begin_step, end_step, initial_density=1.0, power=3):
    """The density at `step`: initial_density until begin_step, then down to
    target_density at end_step along 1 - (1 - progress)^power of the way (TF
    Model Optimization's PolynomialDecay, in density rather than sparsity)."""
    progress = min(1.0, max(0.0, (step - begin_step) / max(end_step - begin_step, 1)))
    return target_density + (initial_density - target_density) * (1.0 - progress) ** power


class PruningCallback(keras.callbacks.Callback):
    """Prunes the model's block-level masked layers during `fit`.

    Every `frequency` training steps from `begin_step` to `end_step`, each
    masked layer with a block-level mask (or only those named in `layers`)
    keeps its round(density * blocks) blocks of largest kernel norm among
    those still live, density following `polynomial_density`; pruned blocks
    stay pruned. The masks are assigned in place, so the compiled step runs
    on, skipping more blocks as they go.
    """

    def __init__(self, target_density, *, end_step, begin_step=0, frequency=100, power=3, norm="l2", layers=None):
        super().__init__()
        if not 0 < target_density <= 1:
            raise ValueError(f"target_density must be in (0, 1], got {target_density}")
        if end_step < begin_step or frequency < 1:
            raise ValueError(f"need begin_step <= end_step and frequency >= 1, got {begin_step}, {end_step}, {frequency}")
        self.target_density = target_density
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency
        self.power = power
        self.norm = norm
        self.layers = layers
        self._step = 0

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        step = self._step
        if step < self.begin_step or step > self.end_step:
            return
        if (step - self.begin_step) % self.frequency and step != self.end_step:
            return
        density = polynomial_density(step, target_density=self.target_density, begin_step=self.begin_step,
                                     end_step=self.end_step, power=self.power)
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            if self.layers is not None and layer.name not in self.layers:
                continue
            if isinstance(layer, MaskedKernelLayer) and layer.mask is not None and layer.mask_granularity == "block":
                layer.set_mask(self._pruned(layer, density))

    def _pruned(self, layer, density):
        mask = np.asarray(layer.mask.numpy())
        scores = block_norms(layer.kernel, layer._block_size(), self.norm).numpy()
        scores = np.where(mask != 0, scores, -np.inf)  # pruned blocks stay pruned
        keep = min(int(np.count_nonzero(mask)), max(1, round(density * mask.size)))
        kept = np.zeros(mask.size, bool)
        kept[np.argsort(-scores, axis=None, kind="stable")[:keep]] = True
        return np.where(kept.reshape(mask.shape), mask, 0).astype(np.float32)
