"""Gated fusion: the Gated Multimodal Unit and a non-local token gate.

Arevalo, Solorio, Montes-y-Gómez & González, 2017, "Gated Multimodal Units
for Information Fusion", arXiv:1702.01992.

Wang, Girshick, Gupta & He, 2018, "Non-local Neural Networks",
arXiv:1711.07971.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_multimodal, in_sorted_order
from mmjax.fusion.tokens import token_sequences
from mmjax.registry import FUSIONS
from mmjax.transformer import masked_mean


# How GMU gates ``M >= 3`` modalities.
GATES = ("sigmoid", "softmax")


@FUSIONS.register("gated")
class GatedFusion(Fusion):
  """Gated Multimodal Unit (Arevalo et al. 2017, arXiv:1702.01992).

  Each modality ``i`` (sorted by name) is mapped from its ``pooled`` ``x_i``
  to ``h_i = tanh(Dense_i(x_i))``, ``[batch, dim]``; gates computed from the
  concatenation ``x = [x_1, ..., x_M]`` of every ``pooled`` mix them feature
  by feature.

  Two modalities, the paper's bimodal GMU::

    z = sigmoid(Dense(dim)(x))            parameter ``gate``
    out = z * h_1 + (1 - z) * h_2         [batch, dim]

  ``M >= 3`` modalities, with ``gate="sigmoid"`` (default), the paper's
  multimodal GMU: one sigmoid gate per modality, each from all the inputs::

    z_i = sigmoid(Dense_i(dim)(x))        parameter ``gate_<modality>``
    out = sum_i z_i * h_i                 [batch, dim]

  The gates are independent, so ``out`` is not a convex combination of the
  ``h_i``. ``gate="softmax"`` is mmjax's own alternative, not the paper's:
  one ``Dense(M * dim)`` (parameter ``gate``) gives ``M`` logits per feature
  and a softmax over modalities gives gates that sum to 1. The softmax runs in
  float32 whatever ``dtype``. With two modalities ``gate`` has no effect: a
  softmax over two logits is the sigmoid of their difference, the paper's
  single gate.

  Where this differs from the paper:

  1. Its equations have no biases; every ``Dense`` here keeps one.
  2. Its bimodal GMU gates the visual input by ``z`` and the text by ``1 -
     z``; here ``z`` gates the first modality by name.
  3. ``gate="softmax"`` (mmjax's option, above).

  Parameter count, ``d_i`` the pooled widths and ``D = sum_i d_i``:
  ``sum_i (d_i + 1) * dim + (D + 1) * G * dim``, with ``G = 1`` for two
  modalities and ``G = M`` otherwise (either gate).

  Attributes:
    dim: width of the output.
    gate: gating of ``M >= 3`` modalities, one of ``GATES``.
    dtype: compute dtype; parameters stay float32.
  """
  dim: int = 128
  gate: str = "sigmoid"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each ``pooled [batch, d_i]``, into
    ``[batch, dim]``."""
    del train
    if self.gate not in GATES:
      raise ValueError(f"Unknown GMU gate {self.gate!r}. Valid: "
                       f"{', '.join(GATES)}.")
    check_multimodal(encodings, "Gated")
    encodings = in_sorted_order(encodings)
    dense = functools.partial(nn.Dense, self.dim, dtype=self.dtype)
    h_BxMxD = jnp.stack([
        jnp.tanh(dense(name=f"proj_{name}")(enc.pooled))
        for name, enc in encodings.items()], axis=1)
    x_BxK = jnp.concatenate([enc.pooled for enc in encodings.values()],
                            axis=-1)
    num = len(encodings)
    if num == 2:
      z_BxD = nn.sigmoid(dense(name="gate")(x_BxK))
      return z_BxD * h_BxMxD[:, 0] + (1. - z_BxD) * h_BxMxD[:, 1]
    if self.gate == "sigmoid":
      z_BxMxD = jnp.stack([nn.sigmoid(dense(name=f"gate_{name}")(x_BxK))
                           for name in encodings], axis=1)
      return (z_BxMxD * h_BxMxD).sum(axis=1)
    logits_BxMxD = nn.Dense(num * self.dim, dtype=self.dtype, name="gate")(
        x_BxK).reshape(-1, num, self.dim)
    z_BxMxD = jax.nn.softmax(logits_BxMxD.astype(jnp.float32), axis=1)
    return (z_BxMxD.astype(self.dtype) * h_BxMxD).sum(axis=1)


@FUSIONS.register("nonlocal_gated")
class NonLocalGatedFusion(Fusion):
  """Gates every token of a modality by the global context of the others.

  For each modality ``m``, its tokens (``[batch, h, w, c]`` feature maps
  flattened to ``[batch, h*w, c]``; ``[batch, time, dim]`` sequences as they
  are; a modality with ``tokens=None`` contributes its ``pooled`` as a single
  token) are projected to ``h_m = Dense_m(dim)(tokens_m)``, ``[batch, N_m,
  dim]``. The context of ``m`` is the mean of the other modalities' pooled
  projections, ``c_m = mean_{n != m} Dense_n(dim)(pooled_n)``, ``[batch,
  dim]``. Each token gets a per-feature gate from itself and that context::

    g_m = sigmoid(Dense_m(dim)(h_m) + Dense_m(dim, no bias)(c_m))
    s_m = masked_mean(g_m * h_m)                     [batch, dim]
    out = Dense(dim)(concat_m s_m)                   [batch, dim]

  The output ``Dense`` is stored as one kernel per modality (``out_<modality>``,
  ``[dim, dim]``, initialised as the rows of one ``Dense`` of the concatenation
  would be) plus one bias, ``sum_m s_m W_m + b``: the same map, but independent
  of the dict order (which ``jax.jit`` sorts).

  This block is mmjax's own design; neither paper defines it. It borrows
  from two:

  1. From GMU (Arevalo et al. 2017, arXiv:1702.01992), a per-feature sigmoid
     gate computed from more than one modality. GMU gates pooled vectors and
     mixes the modalities through its gates; here every token is gated, and
     a ``Dense`` of the concatenated, pooled modalities mixes them.
  2. From non-local blocks (Wang et al. 2018, arXiv:1711.07971), a response
     at each position computed from a summary beyond it. A non-local block
     sums over all positions, weighted by pairwise affinities (a softmax for
     the embedded-Gaussian form), and adds the result to its input; here the
     summary is one context vector per modality (the plain mean of the other
     modalities' pooled projections, no pairwise weights), and it multiplies,
     through the gate, instead of adding.

  Padded tokens (``mask`` False) are zeroed before the projection and left
  out of the mean.

  Parameter count, ``c_m`` the token widths (``d_m`` where tokens are None),
  ``d_m`` the pooled widths and ``M`` modalities: ``sum_m [(c_m + 1) * dim +
  (d_m + 1) * dim + (dim + 1) * dim + dim * dim] + (M * dim + 1) * dim``.

  Attributes:
    dim: width of the projected tokens, the gates and the output.
    dtype: compute dtype; parameters stay float32.
  """
  dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}`` (``pooled [batch, d_m]``, optional
    ``tokens`` and ``mask``) into ``[batch, dim]``."""
    del train
    block = "Non-local gated"
    check_multimodal(encodings, block)
    encodings = in_sorted_order(encodings)
    sequences = token_sequences(
        {n: e for n, e in encodings.items() if e.tokens is not None}, block)
    batch = {n: e.pooled.shape[0] for n, e in encodings.items()}
    batch.update({n: x.shape[0] for n, (x, _) in sequences.items()})
    if len(set(batch.values())) > 1:
      raise ValueError(f"{block} modalities disagree on batch size between "
                       f"tokens and pooled: {batch}.")
    dense = functools.partial(nn.Dense, self.dim, dtype=self.dtype)
    ctx_MxBxD = jnp.stack([dense(name=f"context_{name}")(enc.pooled)
                           for name, enc in encodings.items()])
    num = len(encodings)
    # lecun_normal with the fan-in of the concatenation, num * dim.
    out_init = nn.initializers.variance_scaling(1. / num, "fan_in",
                                                "truncated_normal")
    out_BxD = 0.
    for i, (name, enc) in enumerate(encodings.items()):
      x_BxNxC, mask_BxN = sequences.get(name, (enc.pooled[:, None], None))
      h_BxNxD = dense(name=f"proj_{name}")(x_BxNxC)
      c_BxD = (ctx_MxBxD.sum(0) - ctx_MxBxD[i]) / (num - 1)
      g_BxNxD = nn.sigmoid(
          dense(name=f"gate_{name}")(h_BxNxD)
          + dense(use_bias=False, name=f"gate_context_{name}")(c_BxD)[:, None])
      s_BxD = masked_mean(g_BxNxD * h_BxNxD, mask_BxN)
      out_BxD = out_BxD + dense(use_bias=False, kernel_init=out_init,
                                name=f"out_{name}")(s_BxD)
    out_bias_D = self.param("out_bias", nn.initializers.zeros, (self.dim,))
    return out_BxD + out_bias_D.astype(self.dtype)
