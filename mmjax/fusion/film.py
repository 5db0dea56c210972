"""FiLM: one modality's features modulated by the others.

Perez, Strub, de Vries, Dumoulin & Courville, 2018, "FiLM: Visual Reasoning
with a General Conditioning Layer", arXiv:1709.07871.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_pooled, in_sorted_order
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
  supplies both, as in the paper. The 3x3 conv has no bias (the paper's code
  has one, which the BatchNorm after it cancels).

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


# How the block ends, from the FiLMed feature map to ``[batch, dim]``.
CLASSIFIERS = ("paper", "flatten")


@FUSIONS.register("film")
class FiLMFusion(Fusion):
  """FiLM fusion: the other modalities condition the target's tokens.

  The conditioning vector is the concatenation of every other modality's
  ``pooled``, in sorted name order. The target's ``tokens`` ``[batch, height,
  width, c]`` (never its ``pooled``: ``token_modalities``) pass through a 1x1
  conv stem to ``channels``, ``num_blocks`` FiLMed residual blocks
  (``FiLMResBlock``) and an output stage chosen by ``classifier``, which
  returns ``[batch, dim]``:

    ``"paper"`` (default): the paper's classifier up to its MLP: 1x1 conv to
      ``dim`` channels, BatchNorm, ReLU, global max-pool over space. The
      paper's MLP is the model's head (``ClassifierHead``), which reads this
      vector.
    ``"flatten"``: mmjax's own output stage, not the paper's: 1x1 conv to
      ``channels``, ReLU, flatten (which keeps position), ``Dense(dim)``,
      ReLU. Its ``Dense`` holds most of the block's parameters
      (``h * w * channels * dim``).

  Coordinate channels are appended to every block's and the output conv's
  input, as in the paper, and to the stem's (an option of the paper's code).

  A ``[batch, time, dim]`` target (say, text conditioned on an image) runs the
  same blocks with ``Dense`` layers (see ``FiLMResBlock``) and no coordinates.
  Its output stage pools over real tokens only: ``"paper"`` is ``Dense(dim)``,
  LayerNorm, ReLU and a max over real tokens; ``"flatten"`` is ``Dense
  (channels)``, ReLU, a mean over real tokens, ``Dense(dim)`` and ReLU. A
  sequence with no real token pools to zeros.

  Where this differs from Perez et al. (2018) and their released model:

  1. Conditioning: the paper's FiLM generator is a GRU over the question
     whose final state is mapped linearly to every block's ``gamma`` and
     ``beta``. Here any encoders give the ``pooled`` vectors, and each block's
     ``Dense`` is one slice of that linear map.
  2. ``(1 + gamma) * x + beta`` in place of the paper's ``gamma * x + beta``
     (see ``film``): the same family, another starting point.
  3. Stem: the paper's (on ResNet-101 features) is a 3x3 conv with
     BatchNorm and ReLU; here it is a linear 1x1 conv: the target's encoder
     is the feature extractor.
  4. Output: ``"paper"`` ends before the MLP. The paper's MLP (1024 hidden
     units, BatchNorm, ReLU) is the head here, without BatchNorm; the 1x1
     conv has no bias, which the BatchNorm after it would cancel. The
     paper's widths are ``dim = 512``, 4 blocks of 128 channels; the
     defaults here are smaller.
  5. ``[batch, time, dim]`` targets, the LayerNorm on them and the masked
     pooling are mmjax's extension; the paper modulates feature maps only.

  Parameter count, ``c`` the target's channels, ``K`` the conditioning width,
  ``C = channels``, ``e = 2`` with coordinates (0 without or for sequences),
  ``N = num_blocks``: stem ``(c + e + 1) * C``; each block ``(C + e + 1) * C
  + 9 * C * C + (K + 1) * 2 * C`` (``C * C`` in place of ``9 * C * C`` for
  sequences); output stage, ``"paper"``: ``(C + e) * dim + 2 * dim``;
  ``"flatten"``: ``(C + e + 1) * C + (h * w * C + 1) * dim`` (``(C + 1) * dim``
  for sequences).

  Attributes:
    target: the modality whose tokens are modulated.
    num_blocks: number of FiLMed residual blocks.
    channels: width of the blocks.
    dim: width of the output (``"paper"``: of the output conv, the paper's
      512).
    classifier: the output stage, one of ``CLASSIFIERS``.
    use_coords: append coordinate channels (spatial targets only).
    axis_name: BatchNorm's cross-device axis under ``pmap``/``shard_map``.
    dtype: compute dtype; parameters stay float32.
  """
  target: str = "image"
  num_blocks: int = 2
  channels: int = 64
  dim: int = 128
  classifier: str = "paper"
  use_coords: bool = True
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.nowrap
  def token_modalities(self, modalities: Iterable[str]) -> frozenset[str]:
    """The target, if fused: the block reads its tokens only."""
    return frozenset(modalities) & {self.target}

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}`` into ``[batch, dim]``.

    The target needs ``tokens`` of shape ``[batch, height, width, channels]``
    or ``[batch, time, dim]`` (with its ``mask``); every other modality needs
    ``pooled [batch, dim_m]``.
    """
    if self.classifier not in CLASSIFIERS:
      raise ValueError(
          f"Unknown FiLM classifier {self.classifier!r}. Valid: "
          f"{', '.join(CLASSIFIERS)}.")
    x, mask = self._target_tokens(encodings)
    cond = {k: v for k, v in in_sorted_order(encodings).items()
            if k != self.target}
    check_pooled(cond, "FiLM conditioning")
    cond_BxK = jnp.concatenate([enc.pooled for enc in cond.values()], axis=-1)
    if cond_BxK.shape[0] != x.shape[0]:
      raise ValueError(
          f"FiLM target modality {self.target!r} has tokens {x.shape} but the "
          f"conditioning modalities have batch size {cond_BxK.shape[0]}.")

    x = self._pointwise(x, self.channels, "stem")
    for i in range(self.num_blocks):
      x = FiLMResBlock(
          self.channels, self.use_coords, self.axis_name, dtype=self.dtype,
          name=f"block_{i}")(x, cond_BxK, train=train)
    if self.classifier == "paper":
      return self._paper_classifier(x, mask, train=train)
    return self._flatten_classifier(x, mask)

  def _paper_classifier(self, x: jax.Array, mask: jax.Array | None, *,
                        train: bool) -> jax.Array:
    """1x1 conv to ``dim``, norm, ReLU, max over positions -> ``[batch,
    dim]``."""
    # No bias: the normalisation right after would cancel it.
    x = self._pointwise(x, self.dim, "out_proj", use_bias=False)
    if mask is None:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       axis_name=self.axis_name, dtype=self.dtype,
                       name="out_norm")(x)
      return nn.relu(x).max(axis=(1, 2))
    x = nn.relu(nn.LayerNorm(dtype=self.dtype, name="out_norm")(x))
    # After the ReLU every value is >= 0, so zeroed padding never wins the
    # max over a sequence with a real token, and a sequence with none gives 0.
    return jnp.where(mask[..., None].astype(bool), x, 0.).max(axis=1)

  def _flatten_classifier(self, x: jax.Array,
                          mask: jax.Array | None) -> jax.Array:
    """1x1 conv to ``channels``, ReLU, flatten (masked mean for sequences),
    ``Dense(dim)``, ReLU -> ``[batch, dim]``."""
    x = nn.relu(self._pointwise(x, self.channels, "out_proj"))
    if mask is None:
      x_BxF = x.reshape(x.shape[0], -1)
    else:
      m_BxTx1 = mask[..., None].astype(x.dtype)
      x_BxF = (x * m_BxTx1).sum(1) / jnp.maximum(m_BxTx1.sum(1), 1.)
    return nn.relu(nn.Dense(self.dim, dtype=self.dtype, name="out_dense")(
        x_BxF))

  def _pointwise(self, x: jax.Array, width: int, name: str,
                 use_bias: bool = True) -> jax.Array:
    """Per-position linear map to ``width``: a 1x1 conv (after adding
    coordinates) for ``[batch, h, w, c]``, a ``Dense`` for ``[batch, time,
    c]``."""
    if x.ndim == 3:
      return nn.Dense(width, use_bias=use_bias, dtype=self.dtype,
                      name=name)(x)
    if self.use_coords:
      x = add_coords(x)
    return nn.Conv(width, (1, 1), use_bias=use_bias, dtype=self.dtype,
                   name=name)(x)

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
