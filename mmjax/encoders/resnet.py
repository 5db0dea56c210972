"""A small ResNet of basic blocks for images."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoder, Encoding
from mmjax.registry import ENCODERS


class BasicBlock(nn.Module):
  """``relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x))``.

  The shortcut is the identity, or a strided 1x1 convolution and BatchNorm
  (He et al.'s option B) where the block changes the width or the resolution.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the shortcut).
    axis_name: mapped axis for BatchNorm statistics; see ``ResNetEncoder``.
    dtype: compute dtype; parameters stay float32.
  """
  features: int
  strides: int = 1
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
    """``[batch, h, w, c] -> [batch, h / strides, w / strides, features]``."""
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, axis_name=self.axis_name,
                             dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.features, (3, 3), strides=self.strides, name="conv1")(
        x_BxHxWxC)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), name="conv2")(y)
    y = norm(name="bn2")(y)
    shortcut = x_BxHxWxC
    if self.strides != 1 or x_BxHxWxC.shape[-1] != self.features:
      shortcut = conv(self.features, (1, 1), strides=self.strides,
                      name="proj")(shortcut)
      shortcut = norm(name="proj_bn")(shortcut)
    return nn.relu(y + shortcut)


@ENCODERS.register("resnet")
class ResNetEncoder(Encoder):
  """A ResNet of basic blocks, in the CIFAR style for small images.

  He et al. 2016, "Deep Residual Learning for Image Recognition",
  arXiv:1512.03385. A 3x3 stem convolution (stride 1, no max-pool), then
  ``len(stage_sizes)`` stages of basic blocks; stage ``s`` has
  ``width * 2**s`` channels and, from the second stage on, its first block
  halves height and width (rounding up). Every convolution is followed by
  BatchNorm; ``stage_sizes=(3, 3, 3), width=16`` is the paper's ResNet-20.

  Attributes:
    stage_sizes: number of blocks in each stage.
    width: channels of the stem and the first stage.
    dim: width of ``pooled``, a ``Dense`` layer on the global average of the
      final map; 0 leaves it out (the ``pooled_projection``): ``pooled`` is
      then that average itself.
    axis_name: mapped axis over which BatchNorm averages batch statistics
      under ``pmap``/``shard_map``; ``None`` on a single device.
    dtype: compute dtype; parameters stay float32.
  """
  pooled_projection = "dim"

  stage_sizes: tuple[int, ...] = (1, 1, 1)
  width: int = 16
  dim: int = 128
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    """Images ``[batch, height, width, channels]`` -> ``pooled [batch,
    dim]`` (``[batch, C]`` if ``dim`` is 0) and ``tokens``, the final map
    ``[batch, ceil(height / 2**S), ceil(width / 2**S), C]`` for ``S =
    len(stage_sizes) - 1`` and ``C = width * 2**S``."""
    del mask
    if x.ndim != 4:
      raise ValueError(
          "ResNetEncoder needs images of shape [batch, height, width, "
          f"channels]; got {x.shape}.")
    if not self.stage_sizes or min(self.stage_sizes) < 1:
      raise ValueError("ResNetEncoder needs at least one stage of at least "
                       f"one block; got stage_sizes={self.stage_sizes}.")
    x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype,
                name="stem")(x)
    x = nn.relu(nn.BatchNorm(
        use_running_average=not train, momentum=0.9, axis_name=self.axis_name,
        dtype=self.dtype, name="stem_bn")(x))
    for s, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        x = BasicBlock(self.width * 2**s, strides=2 if s > 0 and b == 0 else 1,
                       axis_name=self.axis_name, dtype=self.dtype,
                       name=f"stage{s}_block{b}")(x, train=train)
    pooled = x.mean(axis=(1, 2))
    if self.dim:
      pooled = nn.Dense(self.dim, dtype=self.dtype, name="pool_dense")(pooled)
    return Encoding(pooled=pooled, tokens=x)
