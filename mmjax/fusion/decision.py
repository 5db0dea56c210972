"""Decision-level (late) fusion: one prediction per modality, averaged.

Snoek, Worring & Smeulders, 2005, "Early versus Late Fusion in Semantic Video
Analysis", ACM Multimedia 2005.

Ramachandram & Taylor, 2017, "Deep Multimodal Learning: A Survey on Recent
Advances and Trends", IEEE Signal Processing Magazine.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_pooled, in_sorted_order
from mmjax.registry import FUSIONS


@FUSIONS.register("decision")
class DecisionFusion(Fusion):
  """Keeps the modalities apart, so that each gets its own prediction.

  Each modality's ``pooled [batch, d_m]`` goes through its own ``Dense(dim)``
  and ReLU, and the block returns ``{modality: [batch, dim]}``: the model
  applies each head to each modality's features and averages the logits
  (``mmjax.models``). The modalities interact only in that average of
  decisions.

  Works with one modality (then it is a unimodal model with one more layer).

  Where this differs from late fusion as Snoek et al. (2005) define it:

  1. There, each modality's classifier is trained on its own, and a second
     classifier, trained on the unimodal scores, combines them. Here the
     combination is a fixed, unweighted mean of logits (mmjax's choice), and
     every part is trained end to end through the loss on that mean, so no
     per-modality classifier is trained to predict alone.
  2. The per-modality ``Dense(dim)`` and ReLU are mmjax's, so that each
     head reads ``[batch, dim]`` features as after any other fusion.

  Parameter count, ``d_m`` the pooled widths: ``sum_m (d_m + 1) * dim`` (the
  per-modality heads are counted with the heads).

  Attributes:
    dim: width of each modality's features.
    dtype: compute dtype; parameters stay float32.
  """
  dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> dict[str, jax.Array]:
    """``{name: Encoding}``, each ``pooled [batch, d_m]`` -> ``{name:
    [batch, dim]}``."""
    del train
    if not encodings:
      raise ValueError("Decision fusion needs at least one modality.")
    check_pooled(encodings, "Decision")
    encodings = in_sorted_order(encodings)
    return {name: nn.relu(nn.Dense(self.dim, dtype=self.dtype,
                                   name=f"proj_{name}")(enc.pooled))
            for name, enc in encodings.items()}
