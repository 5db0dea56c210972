"""Late fusion by concatenation: the baseline every fusion is compared with.

It follows no single paper; MultiBench's late-fusion baseline (Liang et al.
2021, arXiv:2107.07502: concatenated encoder outputs, then an MLP) is the
same model, with the MLP split here between ``hidden`` and the head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.encoders.base import Encoding
from mmjax.fusion.base import Fusion, check_pooled, in_sorted_order
from mmjax.registry import FUSIONS


@FUSIONS.register("concat")
class ConcatFusion(Fusion):
  """Late fusion: concatenate each modality's ``pooled`` vector, then an MLP.

  With one modality this is the unimodal baseline, the same code path as the
  multimodal model.

  Parameter count, ``D = sum_m dim_m`` and ``h_0 = D``: ``sum_l (h_{l-1} +
  1) * hidden[l]``.

  Attributes:
    hidden: widths of the MLP's ReLU layers; ``()`` returns the concatenation
      (in the encoders' dtype).
    dtype: compute dtype; parameters stay float32.
  """
  hidden: tuple[int, ...] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encodings: dict[str, Encoding], *,
               train: bool) -> jax.Array:
    """Fuses ``{name: Encoding}``, each with ``pooled [batch, dim_m]``.

    Returns:
      ``[batch, hidden[-1]]``, or ``[batch, sum_m dim_m]`` if ``hidden`` is
      empty.
    """
    del train
    if not encodings:
      raise ValueError("Concat fusion needs at least one modality.")
    check_pooled(encodings, "Concat")
    encodings = in_sorted_order(encodings)
    x = jnp.concatenate([enc.pooled for enc in encodings.values()], axis=-1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return x
