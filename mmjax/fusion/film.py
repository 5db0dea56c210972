"""FiLM: one modality's features modulated by the others.

Perez, Strub, de Vries, Dumoulin & Courville, 2018, "FiLM: Visual Reasoning
with a General Conditioning Layer", arXiv:1709.07871.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.inputs import check_pooled, in_sorted_order
from mmjax.registry import FUSIONS


def add_coords(x_BxHxWxC: jax.Array) -> jax.Array:
  """Appends two channels holding each position's (row, column) in [-1, 1].

  ``[batch, height, width, channels] -> [batch, height, width, channels + 2]``.
  """
  b, h, w, _ = x_BxHxWxC.shape
  rows = jnp.linspace(-1., 1., h, dtype=x_BxHxWxC.dtype)
  cols = jnp.linspace(-1., 1., w, dtype=x_BxHxWxC.dtype)
  grid_HxWx2 = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1)
  grid = jnp.broadcast_to(grid_HxWx2, (b, h, w, 2))
  return jnp.concatenate([x_BxHxWxC, grid], axis=-1)


def film(x: jax.Array, gamma_BxC: jax.Array, beta_BxC: jax.Array) -> jax.Array:
  """Feature-wise affine map ``(1 + gamma) * x + beta``.

  ``x`` is ``[batch, ..., channels]``; ``gamma`` and ``beta`` are
  ``[batch, channels]`` and are broadcast over every position of ``x``.

  The paper writes ``gamma * x + beta``. We predict the offset from 1 instead:
  a freshly initialised ``Dense`` outputs values near 0, so ``1 + gamma`` starts
  near 1 and the block starts as an almost unmodulated residual block, rather
  than one that multiplies its features by near-zero noise.
  """
  shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  return (1. + gamma_BxC.reshape(shape)) * x + beta_BxC.reshape(shape)


class FiLMResBlock(nn.Module):
  """One FiLMed residual block (Perez et al. 2018, Figure 3).

  ``r = ReLU(conv1x1(x))``; ``out = r + ReLU(FiLM(norm(conv3x3(r))))``. On
  ``[batch, time, dim]`` inputs the convolutions become ``Dense`` layers (no
  mixing across time) and the norm is LayerNorm: it normalises each token on
  its own, so padding never leaks into real tokens' statistics, as it would
  through BatchNorm's batch statistics. The norm has no scale or shift: FiLM
  supplies both.

  Attributes:
    channels: width of the block.
    use_coords: append coordinate channels to a spatial input (rank 4 only).
    axis_name: BatchNorm's cross-device axis (rank 4 only).
    dtype: compute dtype; parameters stay float32.
  """
  channels: int
  use_coords: bool = True
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond_BxK: jax.Array, *,
               train: bool) -> jax.Array:
    """``[batch, h, w, c]`` or ``[batch, time, c]`` -> same, ``channels``."""
    if x.ndim == 4:
      if self.use_coords:
        x = add_coords(x)
      r = nn.relu(nn.Conv(self.channels, (1, 1), dtype=self.dtype)(x))
      # No bias: the normalisation right after would cancel it.
      y = nn.Conv(self.channels, (3, 3), use_bias=False, dtype=self.dtype)(r)
      y = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, use_scale=False,
          use_bias=False, axis_name=self.axis_name, dtype=self.dtype)(y)
    else:
      r = nn.relu(nn.Dense(self.channels, dtype=self.dtype)(x))
      y = nn.Dense(self.channels, use_bias=False, dtype=self.dtype)(r)
      y = nn.LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype)(y)
    gamma_BxC, beta_BxC = jnp.split(
        nn.Dense(2 * self.channels, dtype=self.dtype)(cond_BxK), 2, axis=-1)
    return r + nn.relu(film(y, gamma_BxC, beta_BxC))


@FUSIONS.register("film")
class FiLMFusion(nn.Module):
  """FiLM fusion: the other modalities condition the target's tokens.

  The conditioning vector is the concatenation of every other modality's
  ``pooled``, in sorted name order. The target's ``tokens`` pass through a 1x1 conv
  stem to ``channels``, ``num_blocks`` FiLMed residual blocks, and the paper's
  classifier-style output: 1x1 conv, ReLU, flatten (which keeps position),
  ``Dense(dim)``, ReLU. As in the paper, coordinate channels are appended to
  the stem's, every block's and the output conv's input.

  A ``[batch, time, dim]`` target (say, text conditioned on an image) runs the
  same blocks with ``Dense`` layers (see ``FiLMResBlock``) and no coordinates,
  and pools over real tokens with a masked mean instead of flattening.

  Attributes:
    target: the modality whose tokens are modulated.
    num_blocks: number of FiLMed residual blocks.
    channels: width of the blocks.
    dim: width of the output.
    use_coords: append coordinate channels (spatial targets only).
    axis_name: BatchNorm's cross-device axis under ``pmap``/``shard_map``.
    dtype: compute dtype; parameters stay float32.
  """
  target: str = "image"
  num_blocks: int = 2
  channels: int = 64
  dim: int = 128
  use_coords: bool = True
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}`` into ``[batch, dim]``.

    The target needs ``tokens`` of shape ``[batch, height, width, channels]``
    or ``[batch, time, dim]`` (with its ``mask``); every other modality needs
    ``pooled [batch, dim_m]``.
    """
    x, mask = self._target_tokens(encodings)
    cond = {k: v for k, v in in_sorted_order(encodings).items()
            if k != self.target}
    check_pooled(cond, "FiLM conditioning")
    cond_BxK = jnp.concatenate([enc.pooled for enc in cond.values()], axis=-1)
    if cond_BxK.shape[0] != x.shape[0]:
      raise ValueError(
          f"FiLM target modality {self.target!r} has tokens {x.shape} but the "
          f"conditioning modalities have batch size {cond_BxK.shape[0]}.")

    spatial = x.ndim == 4
    x = self._pointwise(x, "stem")
    for i in range(self.num_blocks):
      x = FiLMResBlock(
          self.channels, self.use_coords, self.axis_name, dtype=self.dtype,
          name=f"block_{i}")(x, cond_BxK, train=train)
    x = nn.relu(self._pointwise(x, "out_proj"))
    if spatial:
      x_BxF = x.reshape(x.shape[0], -1)
    else:
      m_BxTx1 = mask[..., None].astype(x.dtype)
      x_BxF = (x * m_BxTx1).sum(1) / jnp.maximum(m_BxTx1.sum(1), 1.)
    return nn.relu(nn.Dense(self.dim, dtype=self.dtype, name="out_dense")(
        x_BxF))

  def _pointwise(self, x: jax.Array, name: str) -> jax.Array:
    """Per-position linear map to ``channels``: a 1x1 conv (after adding
    coordinates) for ``[batch, h, w, c]``, a ``Dense`` for ``[batch, time,
    c]``."""
    if x.ndim == 3:
      return nn.Dense(self.channels, dtype=self.dtype, name=name)(x)
    if self.use_coords:
      x = add_coords(x)
    return nn.Conv(self.channels, (1, 1), dtype=self.dtype, name=name)(x)

  def _target_tokens(self, encodings: dict[str, Encoding]):
    """Returns the validated target tokens and a ``[batch, time]`` mask (None
    for spatial tokens)."""
    if self.target not in encodings:
      raise ValueError(
          f"FiLM target modality {self.target!r} is missing; present "
          f"modalities: {list(encodings)}.")
    if len(encodings) == 1:
      raise ValueError(
          f"FiLM needs a conditioning modality besides target "
          f"{self.target!r}; got only {list(encodings)}. Use fusion 'concat' "
          "for unimodal baselines.")
    enc = encodings[self.target]
    wanted = "[batch, height, width, channels] or [batch, time, dim]"
    if enc.tokens is None:
      raise ValueError(
          f"FiLM target modality {self.target!r} needs tokens of shape "
          f"{wanted}; its encoder gave none.")
    x = enc.tokens
    if x.ndim not in (3, 4):
      raise ValueError(
          f"FiLM target modality {self.target!r} needs tokens of shape "
          f"{wanted}; got {x.shape}.")
    if x.ndim == 4:
      return x, None
    if enc.mask is None:
      return x, jnp.ones(x.shape[:2], bool)
    if enc.mask.shape != x.shape[:2]:
      raise ValueError(
          f"FiLM target modality {self.target!r} has tokens {x.shape} but "
          f"mask {enc.mask.shape}; the mask must be [batch, time].")
    return x, enc.mask
