"""Masks for the masked layers: by block magnitude, at random, N:M, and what
density a model's masks have."""

import math

import keras
import numpy as np

from masked_ops.freeze import block_norms
from masked_ops.layers._base import MaskedKernelLayer
from masked_ops.ops import normalize_block_size


def _kernel_layers(model):
    """The layers of model (nested models too) that own a 2-D or conv kernel, by name."""
    found = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D, MaskedKernelLayer)) and layer.built:
            found[layer.name] = layer
    return found


def _block_size_of(layer, block_size):
    if isinstance(layer, MaskedKernelLayer):
        return layer._block_size()
    return normalize_block_size(block_size)


def _keep_top(scores, count):
    """A 0/1 array of scores' shape keeping the `count` largest (ties by position)."""
    mask = np.zeros(scores.size, np.float32)
    mask[np.argsort(-scores, axis=None, kind="stable")[:count]] = 1
    return mask.reshape(scores.shape)


def magnitude_masks(model, density, *, block_size=(32, 32), norm="l2", scope="layer", layers=None):
    """Block masks keeping the blocks of largest kernel norm: {layer name: mask}.

    scope "layer" keeps round(density * blocks) blocks of every layer (at
    least one); "global"
    ranks the blocks of all layers together (norms per entry, so that blocks of
    different sizes compare). Masked layers use their own block size; Dense /
    Conv2D layers `block_size` (input x output channels per block for Conv2D).
    """
    if scope not in ("layer", "global"):
        raise ValueError(f'scope must be "layer" or "global", got {scope!r}')
    candidates = {name: layer for name, layer in _kernel_layers(model).items() if layers is None or name in layers}
    norms = {name: block_norms(layer.kernel, _block_size_of(layer, block_size), norm).numpy()
             for name, layer in candidates.items()}
    if scope == "layer":
        # At least one block per layer: a layer with none would cut the network.
        return {name: _keep_top(scores, max(1, round(density * scores.size))) for name, scores in norms.items()}
    # Per-entry norms make blocks of different layers comparable.
    scaled = {}
    for name, scores in norms.items():
        rows, cols = _block_size_of(candidates[name], block_size)
        taps = int(np.prod(candidates[name].kernel.shape[:-2]))
        scaled[name] = scores / math.sqrt(rows * cols * taps) if norm == "l2" else scores / (rows * cols * taps)
    flat = np.concatenate([scores.ravel() for scores in scaled.values()])
    keep = _keep_top(flat, round(density * flat.size))
    masks, offset = {}, 0
    for name, scores in scaled.items():
        masks[name] = keep[offset:offset + scores.size].reshape(scores.shape)
        offset += scores.size
    return masks


def random_masks(model, density, *, block_size=(32, 32), seed=0, layers=None):
    """Block masks with round(density * blocks) random live blocks per layer."""
    rng = np.random.default_rng(seed)
    masks = {}
    for name, layer in sorted(_kernel_layers(model).items()):
        if layers is not None and name not in layers:
            continue
        rows, cols = _block_size_of(layer, block_size)
        grid = (math.ceil(layer.kernel.shape[-2] / rows), math.ceil(layer.kernel.shape[-1] / cols))
        live = rng.permutation(grid[0] * grid[1]) < round(density * grid[0] * grid[1])
        masks[name] = live.reshape(grid).astype(np.float32)
    return masks


def n_m_mask(kernel, n, m):
    """An element-level mask keeping the n largest of every m consecutive
    input entries (the kernel's second-last axis) for each output, as N:M
    sparsity does; a last, shorter group keeps round(n * length / m)."""
    if not 0 < n <= m:
        raise ValueError(f"need 0 < n <= m, got n={n}, m={m}")
    values = np.abs(np.asarray(kernel, np.float64))
    mask = np.zeros(values.shape, np.float32)
    inputs = values.shape[-2]
    for start in range(0, inputs, m):
        group = values[..., start:start + m, :]
        keep = round(n * group.shape[-2] / m)
        order = np.argsort(-group, axis=-2, kind="stable")[..., :keep, :]
        np.put_along_axis(mask[..., start:start + m, :], order, 1.0, axis=-2)
    return mask


def densities(model):
    """{layer name: fraction of live kernel entries} for the masked layers."""
    result = {}
    for name, layer in _kernel_layers(model).items():
        if isinstance(layer, MaskedKernelLayer) and layer.mask is not None:
            element = np.asarray(layer.mask.numpy())
            if layer.mask_granularity == "block":
                element = np.asarray(layer._expand_block_mask(element))
            result[name] = float(np.count_nonzero(element) / max(element.size, 1))
    return result
