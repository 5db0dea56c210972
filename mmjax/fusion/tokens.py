"""Token helpers shared by the attention fusions (``mult``, ``mm_transformer``,
``mbt``): token sequences from encodings, their embedding, and the shared
parts of ``mm_transformer`` and ``mbt``.

Built from the pre-LN layers of ``mmjax.transformer`` (Vaswani et al. 2017,
"Attention Is All You Need", arXiv:1706.03762).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_multimodal, in_sorted_order
from mmjax.transformer import (PositionEmbedding, TransformerLayer,
                               as_sequence, posemb_sincos_2d)

# modality -> (tokens [batch, tokens_m, dim], mask [batch, tokens_m] bool).
Sequences = dict[str, tuple[jax.Array, jax.Array]]


def token_sequences(
    encodings: dict[str, Encoding], block: str
) -> dict[str, tuple[jax.Array, Optional[jax.Array]]]:
  """Each modality's tokens as a sequence, for the attention fusions.

  Feature maps ``[batch, h, w, c]`` are flattened (row-major) to ``[batch,
  h*w, c]``; sequences ``[batch, time, dim]`` pass through. Padded positions
  are set to zero, so that no value there can reach a fusion's output, even
  through a sequence with no real token (whose attention has no real key).

  The result is in sorted modality order (``in_sorted_order``), whatever the
  order of ``encodings``.

  Args:
    encodings: modality -> ``Encoding`` with ``tokens`` and optional ``mask``.
    block: the caller, named in error messages.

  Returns:
    modality -> ``(tokens [batch, tokens_m, dim_m], mask [batch, tokens_m]
    bool or None)``, sorted by modality name.
  """
  sequences = {}
  for name, enc in in_sorted_order(encodings).items():
    if enc.tokens is None:
      raise ValueError(
          f"{block} fusion reads every modality's tokens, but the encoder of "
          f"modality {name!r} gave none (tokens=None). Use an encoder with "
          "tokens (e.g. cnn, vit, lstm, text_transformer) or a fusion of "
          "pooled vectors (e.g. concat).")
    if enc.tokens.ndim not in (3, 4):
      raise ValueError(
          f"{block} modality {name!r} needs tokens of shape [batch, h, w, c] "
          f"or [batch, time, dim]; got {enc.tokens.shape}.")
    x_BxNxD = as_sequence(enc.tokens)
    mask_BxN = enc.mask
    if mask_BxN is not None:
      if mask_BxN.shape != x_BxNxD.shape[:2]:
        raise ValueError(
            f"{block} modality {name!r} has tokens {enc.tokens.shape} but "
            f"mask {mask_BxN.shape}; the mask must be [batch, tokens].")
      mask_BxN = mask_BxN.astype(bool)
      x_BxNxD = jnp.where(mask_BxN[..., None], x_BxNxD, 0.)
    sequences[name] = (x_BxNxD, mask_BxN)
  shapes = {name: x.shape for name, (x, _) in sequences.items()}
  if len({shape[0] for shape in shapes.values()}) > 1:
    raise ValueError(f"{block} modalities disagree on batch size; token "
                     f"sequence shapes: {shapes}.")
  return sequences


def check_attention_config(block: str, *, dim: int, num_heads: int,
                           num_layers: int,
                           fusion_layer: Optional[int] = None) -> None:
  """Raises ``ValueError`` naming ``block`` for widths and depths that cannot
  work, before any layer is built."""
  if dim % num_heads:
    raise ValueError(f"{block} fusion: num_heads={num_heads} does not divide "
                     f"dim={dim}.")
  if num_layers < 1:
    raise ValueError(f"{block} fusion needs num_layers >= 1; got "
                     f"{num_layers}.")
  if fusion_layer is not None and not 0 <= fusion_layer <= num_layers:
    raise ValueError(f"{block} fusion needs 0 <= fusion_layer <= num_layers="
                     f"{num_layers}; got fusion_layer={fusion_layer}.")


def feature_map_grids(encodings: dict[str, Encoding]
                      ) -> dict[str, tuple[int, int]]:
  """modality -> ``(height, width)`` for each modality whose tokens are a
  feature map ``[batch, height, width, channels]``."""
  return {name: tuple(enc.tokens.shape[1:3])
          for name, enc in encodings.items()
          if enc.tokens is not None and enc.tokens.ndim == 4}


def prepend(token_D: jax.Array, x_BxNxD: jax.Array,
            mask_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Puts one learned token ``[dim]`` in front of every sequence; it is
  always real. Returns ``[batch, 1 + tokens, dim]`` and its mask."""
  b = x_BxNxD.shape[0]
  tok_Bx1xD = jnp.broadcast_to(token_D.astype(x_BxNxD.dtype),
                               (b, 1, token_D.shape[-1]))
  return (jnp.concatenate([tok_Bx1xD, x_BxNxD], axis=1),
          jnp.concatenate([jnp.ones((b, 1), bool), mask_BxN], axis=1))


class TokenEmbedding(nn.Module):
  """Each modality's tokens to ``dim``, with position and modality embeddings.

  Per modality ``m``: ``Dense(dim)`` without bias on every token (MulT's
  kernel-1 ``Conv1D``, which has no bias either), plus a learned position
  embedding of its own (``normal(0.02)``, as in ViT and scenic's MBT), plus,
  for the tokens of a feature map (``grids``), a fixed 2-D sin-cos code of
  each token's row and column (``posemb_sincos_2d``), plus (optionally) a
  learned modality embedding ``[dim]``. The projections are separate per
  modality, so the modality embedding is exactly the projection's bias under
  another name: it is what tells a joint transformer which modality a token
  came from.

  Why the fixed 2-D code, which neither MulT (a 1-D sinusoid) nor ViT and
  MBT (learned tables) add: a CNN's feature map is translation-equivariant,
  so *where* an object lies reaches a fusion only through the position code.
  The code is added to each token, and at initialisation these fusions pool
  tokens with weights that do not depend on content (a zero CLS token attends
  uniformly; MulT takes the mean), under which an added code averages to the
  same vector for every image. Position then reaches the pooled output only
  through content-dependent attention or nonlinearities acting on the code,
  and a learned table at ``normal(0.02)`` is ~1/35 of the projected CNN
  features (~0.7 per feature). Measured with ``experiments/mm_shapes.py``'s
  attention fusions on 32x32 images whose bit is the half a square lies in,
  XOR a question word (batch 64, 400 steps): a linear probe reads the image
  bit from MBT's initial output at 0.60 with the table alone and 0.95 with
  the code (seed 4); with the table alone mult learned the XOR on 1 of 4
  seeds and mm_transformer (early and late) and mbt on none; with the code
  mult and both mm_transformers learned it on 4 of 4 within 200 steps, and
  mbt, whose plateau at chance lasts longer, on 3 of 8 (and 2 of 3 others in
  a 1,000-step run).
  A larger learned table (``normal(1.0)``) or coordinate channels appended
  before the projection did not help. The code's features lie in [-1, 1], the
  scale of the tokens. The learned table stays, so the code can be adapted;
  sequences keep the learned table alone. ``tests/test_fusion_learns.py`` runs
  a small version of the task.

  Attributes:
    dim: width of the embedded tokens; a multiple of 4 with ``sincos_2d``.
    max_len: the most tokens one modality may have (position table size).
    modality_embedding: add the learned modality embedding.
    cls: prepend a learned per-modality CLS token (initialised at zero, as in
      ViT and scenic's MBT).
    sincos_2d: add the fixed 2-D sin-cos code to feature-map tokens.
    dtype: compute dtype; parameters stay float32.
  """
  dim: int
  max_len: int
  modality_embedding: bool = True
  cls: bool = False
  sincos_2d: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, sequences: dict[str, tuple[jax.Array, Optional[jax.Array]]],
      grids: Optional[Mapping[str, tuple[int, int]]] = None) -> Sequences:
    """``{m: (tokens [batch, n_m, d_m], mask or None)}`` -> ``{m: (tokens
    [batch, cls + n_m, dim], mask [batch, cls + n_m])}``; masks are all True
    where the input had none. ``grids[m] = (height, width)`` marks ``m``'s
    tokens as a row-major flattened ``height x width`` feature map
    (``feature_map_grids``)."""
    grids = grids or {}
    out = {}
    for name, (x_BxNxE, mask_BxN) in sequences.items():
      x_BxNxD = nn.Dense(self.dim, use_bias=False, dtype=self.dtype,
                         name=f"proj_{name}")(x_BxNxE)
      x_BxNxD = PositionEmbedding(self.max_len, dtype=self.dtype,
                                  name=f"pos_{name}")(x_BxNxD)
      if self.sincos_2d and name in grids:
        (h, w), n = grids[name], x_BxNxD.shape[1]
        if h * w != n:
          raise ValueError(f"TokenEmbedding: modality {name!r} has {n} tokens "
                           f"but a {h}x{w} grid.")
        if self.dim % 4:
          raise ValueError(
              f"TokenEmbedding: the 2-D sin-cos code of modality {name!r} "
              f"needs dim divisible by 4; got dim={self.dim}. Use another "
              "dim or sincos_2d=False.")
        x_BxNxD = x_BxNxD + posemb_sincos_2d(h, w, self.dim).astype(
            self.dtype)
      if self.modality_embedding:
        x_BxNxD = x_BxNxD + self.param(f"modality_{name}",
                                       nn.initializers.normal(0.02),
                                       (self.dim,)).astype(self.dtype)
      if mask_BxN is None:
        mask_BxN = jnp.ones(x_BxNxD.shape[:2], bool)
      if self.cls:
        cls_D = self.param(f"cls_{name}", nn.initializers.zeros, (self.dim,))
        x_BxNxD, mask_BxN = prepend(cls_D, x_BxNxD, mask_BxN)
      out[name] = (x_BxNxD, mask_BxN)
    return out


class TokenFusion(Fusion):
  """The shared parts of ``mm_transformer`` and ``mbt``: checks, embedding
  (``TokenEmbedding``, with a learned modality embedding), per-modality
  towers and the late-fusion output. Not registered.

  Both read every modality's ``tokens`` (``token_modalities``), never a
  ``pooled`` vector.

  Attributes:
    dim: width of the tokens and of the output.
    num_layers: total depth.
    fusion_layer: index of the first layer that fuses the modalities; the
      layers before it are per-modality towers (each block says more).
    num_heads: attention heads; must divide ``dim``.
    mlp_dim: MLP hidden width.
    dropout: dropout rate in the layers.
    max_len: the most tokens one modality may have.
    sincos_2d: add a fixed 2-D sin-cos code to feature-map tokens (see
      ``TokenEmbedding``); ``dim`` must then be a multiple of 4.
    dtype: compute dtype; parameters stay float32.
  """
  dim: int = 64
  num_layers: int = 2
  fusion_layer: int = 0
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  max_len: int = 256
  sincos_2d: bool = True
  dtype: Any = jnp.float32

  @nn.nowrap
  def token_modalities(self, modalities: Iterable[str]) -> frozenset[str]:
    return frozenset(modalities)

  def embed(self, encodings: dict[str, Encoding], block: str, *,
            cls: bool) -> Sequences:
    """Validates the inputs and settings; returns the embedded sequences."""
    check_multimodal(encodings, block)
    check_attention_config(block, dim=self.dim, num_heads=self.num_heads,
                           num_layers=self.num_layers,
                           fusion_layer=self.fusion_layer)
    return TokenEmbedding(self.dim, self.max_len, modality_embedding=True,
                          cls=cls, sincos_2d=self.sincos_2d, dtype=self.dtype,
                          name="embed")(token_sequences(encodings, block),
                                        feature_map_grids(encodings))

  def layer(self, name: str) -> TransformerLayer:
    return TransformerLayer(self.num_heads, self.mlp_dim, self.dropout,
                            dtype=self.dtype, name=name)

  def towers(self, xs: Sequences, *, train: bool) -> Sequences:
    """Layers ``[0, fusion_layer)``, separate weights per modality."""
    out = {}
    for name, (x_BxNxD, mask_BxN) in xs.items():
      for i in range(self.fusion_layer):
        x_BxNxD = self.layer(f"{name}_layer_{i}")(x_BxNxD, mask_BxN,
                                                  train=train)
      out[name] = (x_BxNxD, mask_BxN)
    return out

  def late_output(self, cls: dict[str, jax.Array]) -> jax.Array:
    """``{m: CLS [batch, dim]}`` -> ``Dense(dim)`` of their concatenation,
    each after its modality's final LayerNorm: ``[batch, dim]``."""
    normed = [nn.LayerNorm(dtype=self.dtype, name=f"ln_out_{name}")(c_BxD)
              for name, c_BxD in cls.items()]
    return nn.Dense(self.dim, dtype=self.dtype, name="out")(
        jnp.concatenate(normed, axis=-1))
