"""The paper's 3D U-Net, built with Keras 3 so it runs on TensorFlow, JAX or PyTorch.

The paper's network has two 3x3x3 convolution + batch-norm + ReLU layers per
block, 2x2x2 max-pooling, 64-128-256-512 filters down, a 1024-filter bridge,
2x2x2 transposed-convolution up-sampling with skip concatenation, and a 1x1x1
sigmoid output, trained with binary cross-entropy and Adam (1e-4).
``build_unet(base_filters=64, depth=4)`` is exactly that network; smaller
``base_filters`` and ``depth`` give CPU-friendly variants from the same code.
"""

from __future__ import annotations

import keras
from keras import layers

from .architectures import NORMALIZATIONS


def _conv_block(x, filters: int, name: str, normalization: str = "batch", dimensions: int = 3):
    convolution = layers.Conv3D if dimensions == 3 else layers.Conv2D
    for n in (1, 2):
        x = convolution(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{n}")(x)
        if normalization == "batch":
            x = layers.BatchNormalization(name=f"{name}_bn{n}")(x)
        else:
            x = layers.GroupNormalization(groups=filters, name=f"{name}_in{n}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{n}")(x)
    return x


def build_unet(
    patch_size: int | None = 64,
    base_filters: int = 64,
    depth: int = 4,
    normalization: str = "batch",
    dimensions: int = 3,
) -> keras.Model:
    """Build the U-Net for cubic ``patch_size`` sub-volumes (or square slices) with one channel.

    ``depth`` is the number of 2x pooling steps; level ``n`` has
    ``base_filters * 2**n`` filters and the bridge ``base_filters * 2**depth``.
    ``patch_size`` must be divisible by ``2**depth``; ``None`` builds the
    same network for any input whose sides are (whole volumes at once).
    ``normalization`` is one of :data:`NORMALIZATIONS`. ``dimensions=2``
    builds the same U-Net with 2D layers, for square slices.
    """
    if depth < 1 or base_filters < 1:
        raise ValueError("depth and base_filters must be positive")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {normalization!r}")
    if dimensions not in (2, 3):
        raise ValueError(f"dimensions must be 2 or 3, not {dimensions}")
    if patch_size is not None and patch_size % (2**depth):
        raise ValueError(f"patch_size {patch_size} is not divisible by 2**depth = {2**depth}")
    inputs = keras.Input((patch_size,) * dimensions + (1,), name="image")
    pooling, transpose, output = (
        (layers.MaxPooling3D, layers.Conv3DTranspose, layers.Conv3D)
        if dimensions == 3
        else (layers.MaxPooling2D, layers.Conv2DTranspose, layers.Conv2D)
    )
    x = inputs
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, f"down{level}", normalization, dimensions)
        skips.append(x)
        x = pooling(2, name=f"pool{level}")(x)
    x = _conv_block(x, base_filters * 2**depth, "bridge", normalization, dimensions)
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = transpose(filters, 2, strides=2, name=f"up{level}_transpose")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, f"up{level}", normalization, dimensions)
    outputs = output(1, 1, activation="sigmoid", name="bone_probability", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"unet{dimensions}d_f{base_filters}_d{depth}")
