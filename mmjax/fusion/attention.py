"""Transformer fusion over every modality's tokens: one joint transformer
(``mm_transformer``) and attention bottlenecks (``mbt``).

Both embed the tokens with ``mmjax.fusion.tokens.TokenEmbedding``, may start
with per-modality towers, and share the parts of
``mmjax.fusion.tokens.TokenFusion``. MBT (Nagrani et al. 2021, "Attention
Bottlenecks for Multimodal Fusion", arXiv:2107.00135) compares exactly these
designs: early, mid and late fusion through full attention, and fusion
through bottlenecks. The cross-modal transformer of Tsai et al. 2019
(``mult``) is in ``mmjax.fusion.crossmodal``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.tokens import TokenFusion, prepend
from mmjax.registry import FUSIONS


@FUSIONS.register("mm_transformer")
class MultimodalTransformerFusion(TokenFusion):
  """One transformer over all modalities' tokens, joined at ``fusion_layer``.

  Each modality's tokens (feature maps flattened to ``[batch, h*w, c]``) are
  embedded by ``TokenEmbedding``, with a learned modality embedding. Layers
  ``[0, fusion_layer)`` run
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

  Attributes: those of ``TokenFusion``, where
    fusion_layer: index of the first shared layer, ``0..num_layers``.
  """

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """``{name: Encoding}``, each with ``tokens [batch, h, w, c]`` or
    ``[batch, time, d_m]`` -> ``[batch, dim]``."""
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

  Attributes: those of ``TokenFusion``, where
    fusion_layer: index of the first bottleneck layer (scenic's name):
      ``num_layers`` (late fusion, no bottleneck) or at most
      ``num_layers - 2``;
  and
    n_bottlenecks: number of bottleneck tokens (scenic's name).
  """
  n_bottlenecks: int = 4

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """``{name: Encoding}``, each with ``tokens [batch, h, w, c]`` or
    ``[batch, time, d_m]`` -> ``[batch, dim]``."""
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
