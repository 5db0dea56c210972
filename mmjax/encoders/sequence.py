"""Encoders for waveforms, feature sequences and plain vectors."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.encoders.base import Encoder, Encoding
from mmjax.registry import ENCODERS
from mmjax.transformer import masked_mean


@ENCODERS.register("conv1d")
class Conv1DEncoder(Encoder):
  """Strided 1-D convolutions over a waveform or a sequence of frames.

  In the spirit of the all-convolutional raw-waveform networks of Dai et al.
  2017, "Very Deep Convolutional Neural Networks for Raw Waveforms",
  arXiv:1610.00087. Each stage is a convolution of width ``kernel_size`` and
  stride ``stride`` (no bias), BatchNorm and ReLU, so ``S`` stages shorten
  the sequence to ``ceil(time / stride**S)``.

  Padding is ignored: the mask is downsampled with the sequence (output step
  ``j`` is real if input step ``j * stride`` is, i.e. ``mask[:, ::stride]``),
  and the input and every stage's output are zeroed at padded steps, so the
  convolutions see zeros past each sequence's end whatever the padding held.
  Each window is padded by a fixed ``(kernel_size - 1) // 2`` steps on the
  left (window ``j`` is centred on input step ``j * stride``), not by SAME
  padding, whose windows shift with the padded length: so the output at real
  steps does not depend on how many padded steps follow either. ``pooled`` is
  a ``Dense`` layer on the mean over real steps. In training, BatchNorm's
  batch statistics do include the (zeroed) padded steps: flax's masked
  statistics average each device's own masked mean under ``pmap``, which
  is wrong when devices hold different amounts of padding.

  Attributes:
    features: output channels of each stage.
    kernel_size: convolution width, in steps.
    stride: downsampling factor of each stage.
    dim: width of ``pooled``.
    axis_name: mapped axis over which BatchNorm averages batch statistics
      under ``pmap``/``shard_map``; ``None`` on a single device.
    dtype: compute dtype; parameters stay float32.
  """
  features: tuple[int, ...] = (32, 64)
  kernel_size: int = 5
  stride: int = 2
  dim: int = 128
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    """Waveforms ``[batch, time]`` or frames ``[batch, time, features]``
    (e.g. spectrogram columns), optional ``mask [batch, time]`` ->
    ``pooled [batch, dim]``, ``tokens [batch, T', features[-1]]`` zeroed at
    padding for ``T' = ceil(time / stride**len(features))``, and ``mask
    [batch, T']`` (None if the input mask was None)."""
    if x.ndim not in (2, 3):
      raise ValueError(
          "Conv1DEncoder needs waveforms [batch, time] or frames [batch, "
          f"time, features]; got {x.shape}.")
    if mask is not None and mask.shape != x.shape[:2]:
      raise ValueError(
          f"Conv1DEncoder mask shape {mask.shape} does not match the "
          f"[batch, time] of inputs of shape {x.shape}.")
    if x.ndim == 2:
      x = x[..., None]
    if mask is not None:
      mask = mask.astype(bool)
      x = jnp.where(mask[..., None], x, 0.)
    left = (self.kernel_size - 1) // 2
    for feat in self.features:
      x = nn.Conv(feat, (self.kernel_size,), strides=(self.stride,),
                  padding=[(left, self.kernel_size - 1 - left)],
                  use_bias=False, dtype=self.dtype)(x)
      x = nn.BatchNorm(
          use_running_average=not train, momentum=0.9,
          axis_name=self.axis_name, dtype=self.dtype)(x)
      x = nn.relu(x)
      if mask is not None:
        mask = mask[:, ::self.stride]
        x = jnp.where(mask[..., None], x, 0.)
    pooled = nn.Dense(self.dim, dtype=self.dtype)(masked_mean(x, mask))
    return Encoding(pooled=pooled, tokens=x, mask=mask)


@ENCODERS.register("mlp")
class MLPEncoder(Encoder):
  """A ReLU MLP for tabular or other fixed-size vector inputs.

  As MultiBench's MLP encoders (Liang et al. 2021, arXiv:2107.07502): hidden
  ``Dense`` layers with ReLU (and dropout), then a linear ``Dense(dim)``.

  Attributes:
    hidden: widths of the hidden layers.
    dim: width of ``pooled``.
    dropout: dropout rate after each hidden layer.
    dtype: compute dtype; parameters stay float32.
  """
  hidden: tuple[int, ...] = (128,)
  dim: int = 128
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    """Vectors ``[batch, features]`` (``[batch, ...]`` is flattened) ->
    ``pooled [batch, dim]``; no tokens."""
    del mask
    if x.ndim < 2:
      raise ValueError(
          f"MLPEncoder needs inputs of shape [batch, features]; got {x.shape}.")
    y = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      y = nn.relu(nn.Dense(width, dtype=self.dtype)(y))
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return Encoding(pooled=nn.Dense(self.dim, dtype=self.dtype)(y))
