"""sparsify and strip: an existing Keras model with masked layers swapped in,
and back to plain Keras layers with the masks baked in."""

import keras
import numpy as np

from masked_ops.keras.masks import magnitude_masks
from masked_ops.layers import MaskedConv2D, MaskedDense

# Keys of Dense / Conv2D configs that the masked layers take as they are.
_SHARED_KEYS = {
    "name", "trainable", "dtype", "activation", "use_bias", "kernel_initializer", "bias_initializer",
    "kernel_regularizer", "bias_regularizer", "activity_regularizer", "kernel_constraint", "bias_constraint",
}
_CONV_KEYS = _SHARED_KEYS | {"filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "groups"}
_DENSE_KEYS = _SHARED_KEYS | {"units"}


def sparsify(model, *, density=None, masks=None, block_size=(32, 32), layers=None, norm="l2", grad_mask_granularity=None):
    """A copy of `model` whose Dense and Conv2D layers (those named in `layers`,
    or all) are MaskedDense / MaskedConv2D with the same weights.

    Masks: `masks` (a dict keyed by layer name, element- or block-level; a
    chosen layer without an entry gets all ones), else the blocks of largest
    kernel norm at `density` per layer, else all ones (outputs then equal the
    original model's). `block_size` is the masked layers' block size (input x
    output channels for convolutions). Sequential and functional models, nested
    ones too. `grad_mask_granularity` gives every masked layer a grad_mask.
    """
    if masks is None and density is not None:
        masks = magnitude_masks(model, density, block_size=block_size, norm=norm, layers=layers)
    masks = masks or {}
    originals = {}

    def swap(layer):
        chosen = layers is None or layer.name in layers
        if chosen and type(layer) is keras.layers.Dense:
            config = _checked_config(layer, _DENSE_KEYS)
            clone = MaskedDense(block_size=block_size, mask=masks.get(layer.name),
                                grad_mask_granularity=grad_mask_granularity, **config)
        elif chosen and type(layer) is keras.layers.Conv2D:
            config = _checked_config(layer, _CONV_KEYS)
            clone = MaskedConv2D(channel_block=block_size, mask=masks.get(layer.name),
                                 grad_mask_granularity=grad_mask_granularity, **config)
        else:
            clone = layer.__class__.from_config(layer.get_config())
        originals[id(clone)] = layer
        return clone

    return _copy_weights(keras.models.clone_model(model, clone_function=swap, recursive=True), originals)


def strip(model):
    """A copy of `model` with plain Dense / Conv2D layers in place of the
    masked ones, their kernels where(mask != 0, kernel * mask, 0): for serving
    or converting without the op library. (Output masks passed at call time
    have no plain equivalent and are dropped.)"""
    originals = {}

    def unswap(layer):
        if isinstance(layer, (MaskedDense, MaskedConv2D)):
            config = {key: value for key, value in layer.get_config().items()
                      if key in (_DENSE_KEYS if isinstance(layer, MaskedDense) else _CONV_KEYS)}
            clone = (keras.layers.Dense if isinstance(layer, MaskedDense) else keras.layers.Conv2D)(**config)
        else:
            clone = layer.__class__.from_config(layer.get_config())
        originals[id(clone)] = layer
        return clone

    return _copy_weights(keras.models.clone_model(model, clone_function=unswap, recursive=True), originals)


def _checked_config(layer, keys):
    config = layer.get_config()
    if config.get("quantization_config") is not None or config.get("lora_rank"):
        raise ValueError(f"layer {layer.name!r} is quantized or has LoRA weights; sparsify takes plain layers")
    return {key: value for key, value in config.items() if key in keys}


def _effective_kernel(layer):
    kernel = np.asarray(layer.kernel.numpy())
    if layer.mask is None:
        return kernel
    mask = np.asarray(layer.mask.numpy())
    if layer.mask_granularity == "block":
        mask = np.asarray(layer._expand_block_mask(mask))
    return np.where(mask != 0, kernel * mask, 0).astype(kernel.dtype)


def _copy_weights(clone, originals):
    """Gives every cloned layer its original's weights (masked layers keep the
    masks they were made with)."""
    for layer in clone._flatten_layers(include_self=False, recursive=True):
        original = originals.get(id(layer))
        if original is None or not original.weights:
            continue
        if isinstance(layer, (MaskedDense, MaskedConv2D)) and not isinstance(original, (MaskedDense, MaskedConv2D)):
            layer.kernel.assign(original.kernel)
            if layer.bias is not None:
                layer.bias.assign(original.bias)
        elif isinstance(original, (MaskedDense, MaskedConv2D)) and not isinstance(layer, (MaskedDense, MaskedConv2D)):
            layer.kernel.assign(_effective_kernel(original))
            if original.bias is not None:
                layer.bias.assign(original.bias)
        elif not isinstance(layer, keras.Model):
            layer.set_weights(original.get_weights())
    return clone
