"""Transformer fusion over every modality's tokens: one joint transformer
(``mm_transformer``) and attention bottlenecks (``mbt``).

Both embed the tokens the same way (``TokenEmbedding``), may start with
per-modality towers, and are built from the pre-LN layers of
``mmjax.transformer`` (Vaswani et al. 2017, "Attention Is All You Need",
arXiv:1706.03762). MBT (Nagrani et al. 2021, "Attention Bottlenecks for
Multimodal Fusion", arXiv:2107.00135) compares exactly these designs: early,
mid and late fusion through full attention, and fusion through bottlenecks.
The cross-modal transformer of Tsai et al. 2019 (``mult``) is in
``mmjax.fusion.mult``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.inputs import check_multimodal, token_sequences
from mmjax.registry import FUSIONS
from mmjax.transformer import (PositionEmbedding, TransformerLayer,
                               posemb_sincos_2d)

# modality -> (tokens [batch, tokens_m, dim], mask [batch, tokens_m] bool).
Sequences = dict[str, tuple[jax.Array, jax.Array]]


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


class TokenFusion(nn.Module):
  """The shared parts of ``mm_transformer`` and ``mbt``: checks, embedding,
  per-modality towers and the late-fusion output. Not registered."""
  dim: int = 64
  num_layers: int = 2
  fusion_layer: int = 0
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  max_len: int = 256
  sincos_2d: bool = True
  dtype: Any = jnp.float32

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


@FUSIONS.register("mm_transformer")
class MultimodalTransformerFusion(TokenFusion):
  """One transformer over all modalities' tokens, joined at ``fusion_layer``.

  Each modality's tokens (feature maps flattened to ``[batch, h*w, c]``) are
  embedded by ``TokenEmbedding``: ``Dense(dim)``, a per-modality position
  embedding (with a fixed 2-D sin-cos code for feature maps) and a learned
  modality embedding. Layers ``[0, fusion_layer)`` run
  on each modality alone, with separate weights and a CLS token per modality;
  layers ``[fusion_layer, num_layers)`` share weights and run on the
  concatenation ``[CLS; tokens_1; tokens_2; ...]`` with the masks
  concatenated, so every token attends to every real token of every modality.
  The output is the final-LayerNorm'd CLS, ``[batch, dim]``.

  The two ends, as compared by Hendricks et al. 2021 ("Decoupling the Role of
  Data, Attention, and Losses in Multimodal Transformers", arXiv:2102.00529)
  and Nagrani et al. 2021 (MBT, arXiv:2107.00135, "vanilla fusion"):

  * ``fusion_layer=0``: early fusion, a single-stream transformer from the
    first layer, with one learned CLS token.
  * ``fusion_layer=num_layers``: late fusion, one tower per modality and no
    attention across modalities; the output is ``Dense(dim)`` of the
    concatenated per-modality CLS outputs, each after a final LayerNorm.

  In between (mid fusion) the joint CLS is the mean of the per-modality CLS
  outputs of the towers, whose other tokens join the shared layers.

  Attributes:
    dim: width of the tokens and of the output.
    num_layers: total depth.
    fusion_layer: index of the first shared layer, ``0..num_layers``.
    num_heads: attention heads; must divide ``dim``.
    mlp_dim: MLP hidden width.
    dropout: dropout rate in the layers.
    max_len: the most tokens one modality may have.
    sincos_2d: add a fixed 2-D sin-cos code to feature-map tokens (see
      ``TokenEmbedding``); ``dim`` must then be a multiple of 4.
    dtype: compute dtype; parameters stay float32.
  """

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each with ``tokens [batch, h, w, c]`` or
    ``[batch, time, d_m]`` (and optional ``mask [batch, time]``), into
    ``[batch, dim]``."""
    xs = self.embed(encodings, "mm_transformer", cls=self.fusion_layer > 0)
    xs = self.towers(xs, train=train)
    if self.fusion_layer == self.num_layers:
      return self.late_output({m: x[:, 0] for m, (x, _) in xs.items()})
    if self.fusion_layer == 0:
      cls_D = self.param("cls", nn.initializers.zeros, (self.dim,))
      x_BxNxD, mask_BxN = prepend(
          cls_D, jnp.concatenate([x for x, _ in xs.values()], axis=1),
          jnp.concatenate([m for _, m in xs.values()], axis=1))
    else:  # Mid fusion: the towers' CLS tokens merge into one.
      cls_Bx1xD = jnp.mean(jnp.stack([x[:, :1] for x, _ in xs.values()]), 0)
      x_BxNxD = jnp.concatenate(
          [cls_Bx1xD] + [x[:, 1:] for x, _ in xs.values()], axis=1)
      mask_BxN = jnp.concatenate(
          [jnp.ones((x_BxNxD.shape[0], 1), bool)] +
          [m[:, 1:] for _, m in xs.values()], axis=1)
    for i in range(self.fusion_layer, self.num_layers):
      x_BxNxD = self.layer(f"layer_{i}")(x_BxNxD, mask_BxN, train=train)
    return nn.LayerNorm(dtype=self.dtype, name="ln_out")(x_BxNxD[:, 0])


@FUSIONS.register("mbt")
class BottleneckFusion(TokenFusion):
  """Attention Bottleneck fusion, MBT (Nagrani et al. 2021, arXiv:2107.00135).

  Tokens are embedded as in ``mm_transformer`` and each modality gets its own
  CLS token and its own weights in every layer. Layers ``[0, fusion_layer)``
  are per-modality towers. From ``fusion_layer`` on, each modality's layer
  runs self-attention over ``[CLS_m; tokens_m; bottleneck]``, and the next
  bottleneck is the mean over modalities of their updated bottleneck tokens
  (as in the paper and scenic's ``MBT``): modality tokens exchange information
  *only* through the ``n_bottlenecks`` bottleneck tokens. The bottleneck
  starts as a learned ``[n_bottlenecks, dim]`` parameter, initialised from
  ``normal(0.02)`` as in scenic.

  Information crosses between modalities one layer after it enters the
  bottleneck: the first fusion layer reads the learned initial bottleneck and
  the last one's updated bottleneck is discarded. So a single fusion layer
  (``fusion_layer = num_layers - 1``) fuses nothing, and is refused; fusion
  needs ``fusion_layer <= num_layers - 2``. (The paper uses 12 layers with
  ``fusion_layer=8``.) The default, 2 layers and ``fusion_layer=0``, is the
  paper's early bottleneck fusion: layer 0 writes the bottleneck, layer 1
  reads it.

  The output is ``Dense(dim)`` of the concatenated per-modality CLS outputs,
  each after a final LayerNorm. The paper instead applies a linear classifier
  to each CLS and averages the logits; that is a linear map of the same
  concatenation, which the head after this block can still learn, and the
  concatenation lets the head weigh the modalities. With
  ``fusion_layer=num_layers`` there is no bottleneck and this is
  ``mm_transformer``'s late fusion, parameter for parameter.

  Attributes:
    dim: width of the tokens and of the output.
    num_layers: total depth.
    fusion_layer: index of the first bottleneck layer: ``num_layers`` (late
      fusion, no bottleneck) or at most ``num_layers - 2`` (scenic's name).
    n_bottlenecks: number of bottleneck tokens (scenic's name).
    num_heads: attention heads; must divide ``dim``.
    mlp_dim: MLP hidden width.
    dropout: dropout rate in the layers.
    max_len: the most tokens one modality may have.
    sincos_2d: add a fixed 2-D sin-cos code to feature-map tokens (see
      ``TokenEmbedding``); ``dim`` must then be a multiple of 4.
    dtype: compute dtype; parameters stay float32.
  """
  n_bottlenecks: int = 4

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each with ``tokens [batch, h, w, c]`` or
    ``[batch, time, d_m]`` (and optional ``mask [batch, time]``), into
    ``[batch, dim]``."""
    if self.n_bottlenecks < 1:
      raise ValueError(f"mbt fusion needs n_bottlenecks >= 1; got "
                       f"{self.n_bottlenecks}.")
    if self.fusion_layer == self.num_layers - 1:
      raise ValueError(
          f"mbt fusion with fusion_layer={self.fusion_layer} and num_layers="
          f"{self.num_layers} has a single bottleneck layer, which passes no "
          "information between modalities (the bottleneck it updates is never "
          f"read). Use fusion_layer <= {self.num_layers - 2}, or "
          f"fusion_layer={self.num_layers} for late fusion.")
    xs = self.towers(self.embed(encodings, "mbt", cls=True), train=train)
    if self.fusion_layer < self.num_layers:
      b = next(iter(xs.values()))[0].shape[0]
      k = self.n_bottlenecks
      bottleneck_KxD = self.param("bottleneck", nn.initializers.normal(0.02),
                                  (k, self.dim))
      z_BxKxD = jnp.broadcast_to(bottleneck_KxD.astype(self.dtype),
                                 (b, k, self.dim))
      for i in range(self.fusion_layer, self.num_layers):
        updated, zs = {}, []
        for name, (x_BxNxD, mask_BxN) in xs.items():
          n = x_BxNxD.shape[1]
          y = self.layer(f"{name}_layer_{i}")(
              jnp.concatenate([x_BxNxD, z_BxKxD], axis=1),
              jnp.concatenate([mask_BxN, jnp.ones((b, k), bool)], axis=1),
              train=train)
          updated[name] = (y[:, :n], mask_BxN)
          zs.append(y[:, n:])
        xs, z_BxKxD = updated, jnp.mean(jnp.stack(zs), axis=0)
    return self.late_output({name: x[:, 0] for name, (x, _) in xs.items()})
