"""Gated Multimodal Unit.

Arevalo, Solorio, Montes-y-Gómez & González, 2017, "Gated Multimodal Units
for Information Fusion", arXiv:1702.01992.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.inputs import check_multimodal
from mmjax.registry import FUSIONS


@FUSIONS.register("gated")
class GatedFusion(nn.Module):
  """Gated Multimodal Unit (Arevalo et al. 2017).

  Each modality is mapped to ``h_m = tanh(Dense_m(z_m))``, ``[batch, dim]``.
  A gate computed from the concatenation of every ``pooled`` (dict order)
  mixes them feature by feature: ``out = sum_m g_m * h_m``.

  With two modalities the gate is the paper's ``g = sigmoid(Dense(dim)([z_1,
  z_2]))``, ``out = g * h_1 + (1 - g) * h_2``. With ``M > 2`` modalities (the
  paper's extension) a ``Dense(M * dim)`` gives ``M`` logits per feature and
  a softmax over modalities gives the gates; for ``M = 2`` that is the same
  family as the sigmoid gate, with twice the gate parameters.

  The paper's equations have no biases; every ``Dense`` here keeps one.

  Parameter count, ``d_m`` the pooled widths and ``D = sum_m d_m``:
  ``sum_m (d_m + 1) * dim + (D + 1) * G * dim`` with ``G = 1`` for two
  modalities and ``G = M`` otherwise.

  Attributes:
    dim: width of the output.
  """
  dim: int = 128

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each ``pooled [batch, d_m]``, into
    ``[batch, dim]``."""
    del train
    check_multimodal(encodings, "Gated")
    h_BxMxD = jnp.stack([
        jnp.tanh(nn.Dense(self.dim, name=f"proj_{name}")(enc.pooled))
        for name, enc in encodings.items()], axis=1)
    z_BxK = jnp.concatenate([enc.pooled for enc in encodings.values()],
                            axis=-1)
    num = len(encodings)
    if num == 2:
      g_BxD = nn.sigmoid(nn.Dense(self.dim, name="gate")(z_BxK))
      return g_BxD * h_BxMxD[:, 0] + (1. - g_BxD) * h_BxMxD[:, 1]
    logits_BxMxD = nn.Dense(num * self.dim, name="gate")(z_BxK).reshape(
        -1, num, self.dim)
    g_BxMxD = jax.nn.softmax(logits_BxMxD, axis=1)
    return (g_BxMxD * h_BxMxD).sum(axis=1)
