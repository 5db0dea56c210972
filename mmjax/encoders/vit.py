"""A Vision Transformer image encoder."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.encoders.base import Encoder, Encoding
from mmjax.registry import ENCODERS
from mmjax.transformer import PositionEmbedding, Transformer

POOLS = ("cls", "mean")


@ENCODERS.register("vit")
class ViTEncoder(Encoder):
  """Non-overlapping patches, embedded and fed to a pre-LN transformer.

  Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for
  Image Recognition at Scale", arXiv:2010.11929. Each ``patch_size`` square
  is linearly embedded (a convolution with stride ``patch_size``), a learned
  position embedding is added, and the layers of ``mmjax.transformer`` run
  over the sequence. With ``pool="cls"`` a learned CLS token is prepended and
  its output is ``pooled``; with ``"mean"`` there is no CLS token and
  ``pooled`` is the mean of the patch outputs (the paper's "GAP" variant).

  The position table has exactly one row per token of the images seen at
  ``init``, so the model is tied to that image size.

  Attributes:
    patch_size: side of each square patch; must divide height and width.
    dim: token width.
    num_layers: transformer depth.
    num_heads: attention heads; must divide ``dim``.
    mlp_dim: hidden width of each layer's MLP.
    dropout: dropout rate on the embeddings, attention and residual branches.
    pool: "cls" or "mean" (see above).
    dtype: compute dtype; parameters stay float32.
  """
  patch_size: int = 4
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  pool: str = "cls"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    """Images ``[batch, height, width, channels]`` -> ``pooled [batch,
    dim]`` and ``tokens``, the patch outputs ``[batch, N, dim]`` for ``N =
    (height / patch_size) * (width / patch_size)`` patches in row-major order
    (never the CLS token)."""
    del mask
    if x.ndim != 4:
      raise ValueError(
          "ViTEncoder needs images of shape [batch, height, width, "
          f"channels]; got {x.shape}.")
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(
          f"ViTEncoder patch_size={p} does not divide the height and width "
          f"of images of shape {x.shape}.")
    if self.pool not in POOLS:
      raise ValueError(
          f"ViTEncoder pool={self.pool!r}; valid: {', '.join(POOLS)}.")
    x = nn.Conv(self.dim, (p, p), strides=p, padding="VALID",
                dtype=self.dtype, name="patch_embedding")(x)
    batch = x.shape[0]
    x_BxNxD = x.reshape(batch, -1, self.dim)
    num_patches = x_BxNxD.shape[1]
    use_cls = self.pool == "cls"
    if use_cls:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
      x_BxNxD = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.dim)),
           x_BxNxD], axis=1)
    x_BxNxD = PositionEmbedding(num_patches + use_cls, dtype=self.dtype)(
        x_BxNxD)
    x_BxNxD = nn.Dropout(self.dropout, deterministic=not train)(x_BxNxD)
    x_BxNxD = Transformer(self.num_layers, self.num_heads, self.mlp_dim,
                          self.dropout, dtype=self.dtype)(x_BxNxD, train=train)
    if use_cls:
      return Encoding(pooled=x_BxNxD[:, 0], tokens=x_BxNxD[:, 1:])
    return Encoding(pooled=x_BxNxD.mean(axis=1), tokens=x_BxNxD)
