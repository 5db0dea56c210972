"""Multimodal Transformer (MulT): crossmodal attention between every pair
of modalities; registered as ``mult``.

Tsai, Bai, Liang, Kolter, Morency & Salakhutdinov, 2019, "Multimodal
Transformer for Unaligned Multimodal Language Sequences", arXiv:1906.00295.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_multimodal
from mmjax.fusion.tokens import (TokenEmbedding, check_attention_config,
                                 feature_map_grids, token_sequences)
from mmjax.registry import FUSIONS
from mmjax.transformer import Transformer, TransformerLayer, masked_mean


@FUSIONS.register("mult")
class MulTFusion(Fusion):
  """MulT (Tsai et al. 2019): each modality attends to each other one.

  1. Each modality's tokens (feature maps flattened to ``[batch, h*w, c]``)
     are projected to ``dim`` by a bias-free ``Dense`` (the paper's kernel-1
     ``Conv1D``) plus a learned position embedding (the paper's is a 1-D
     sinusoid) and, for feature maps, a fixed 2-D sin-cos code of each
     token's row and column; see ``TokenEmbedding``.
  2. For every ordered pair, target ``t`` and source ``s != t``, a stack of
     ``num_layers`` cross-modal layers: ``t``'s tokens query ``s``'s projected
     tokens (the same low-level ``s`` in every layer, as in the paper), with
     ``s``'s mask on the keys, then a final LayerNorm. Output ``[batch, n_t,
     dim]``.
  3. For each target, the outputs from all its sources are concatenated on
     features, ``[batch, n_t, (M - 1) * dim]``, and pass through
     ``self_layers`` self-attention layers (the paper's per-target
     transformer; 0 skips it).
  4. Each target's sequence is pooled with a mean over its real tokens; the
     ``M`` pooled vectors are concatenated and projected by ``Dense(dim)``.

  The paper pools by taking the last element of each sequence. That works for
  its unpadded, equal-length inputs; in a right-padded batch the last element
  is padding for every shorter sequence, and for a flattened image it is just
  the bottom-right cell. The mean over real tokens is defined for both and
  ignores padding.

  Every weight is separate per ordered pair and per target, so the parameter
  count grows as ``M * (M - 1)`` cross-modal stacks; it works for any ``M >=
  2`` (the paper uses 3: language, vision, audio). It reads every modality's
  ``tokens``, never a ``pooled`` vector (``token_modalities``).

  Attributes:
    dim: width of the projected tokens, of each cross-modal stream and of the
      output.
    num_layers: cross-modal layers per ordered pair.
    self_layers: self-attention layers per target after concatenation.
    num_heads: attention heads; must divide ``dim``.
    mlp_dim: MLP hidden width in every layer.
    dropout: dropout rate in the layers.
    max_len: the most tokens one modality may have.
    sincos_2d: add a fixed 2-D sin-cos code to feature-map tokens (see
      ``TokenEmbedding``); ``dim`` must then be a multiple of 4.
    dtype: compute dtype; parameters stay float32.
  """
  dim: int = 64
  num_layers: int = 2
  self_layers: int = 1
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  max_len: int = 256
  sincos_2d: bool = True
  dtype: Any = jnp.float32

  @nn.nowrap
  def token_modalities(self, modalities: Iterable[str]) -> frozenset[str]:
    return frozenset(modalities)

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """``{name: Encoding}``, each with ``tokens [batch, h, w, c]`` or
    ``[batch, time, d_m]`` -> ``[batch, dim]``."""
    check_multimodal(encodings, "mult")
    check_attention_config("mult", dim=self.dim, num_heads=self.num_heads,
                           num_layers=self.num_layers)
    if self.self_layers < 0:
      raise ValueError(f"mult fusion needs self_layers >= 0; got "
                       f"{self.self_layers}.")
    xs = TokenEmbedding(self.dim, self.max_len, modality_embedding=False,
                        sincos_2d=self.sincos_2d, dtype=self.dtype,
                        name="embed")(token_sequences(encodings, "mult"),
                                      feature_map_grids(encodings))
    pooled = []
    for t, (x_BxNxD, mask_BxN) in xs.items():
      streams = []
      for s, (c_BxMxD, mask_BxM) in xs.items():
        if s == t:
          continue
        y_BxNxD = x_BxNxD
        for i in range(self.num_layers):
          y_BxNxD = TransformerLayer(
              self.num_heads, self.mlp_dim, self.dropout, dtype=self.dtype,
              name=f"{t}_from_{s}_layer_{i}")(
                  y_BxNxD, mask_BxN, context_BxMxE=c_BxMxD,
                  context_mask_BxM=mask_BxM, train=train)
        streams.append(nn.LayerNorm(dtype=self.dtype,
                                    name=f"{t}_from_{s}_ln")(y_BxNxD))
      y_BxNxF = jnp.concatenate(streams, axis=-1)
      if self.self_layers:
        y_BxNxF = Transformer(self.self_layers, self.num_heads, self.mlp_dim,
                              self.dropout, dtype=self.dtype,
                              name=f"{t}_self")(
                                  y_BxNxF, mask_BxN, train=train)
      pooled.append(masked_mean(y_BxNxF, mask_BxN))
    return nn.Dense(self.dim, dtype=self.dtype, name="out")(
        jnp.concatenate(pooled, axis=-1))
