"""Output heads."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.registry import HEADS


@HEADS.register("classifier")
class ClassifierHead(nn.Module):
  """MLP head: ``hidden`` ReLU layers, each followed by dropout, then a
  linear layer to logits (or, with one output, a regression head's values).

  Attributes:
    num_classes: number of outputs: classes, or 1 for a regression loss
      (``models.build_model`` sets it; ``mmjax.losses``).
    hidden: widths of the hidden layers; ``()`` gives a linear classifier.
    dropout: dropout rate after each hidden layer (rng collection
      ``'dropout'``, only when training).
    dtype: compute dtype, also of the logits (``MultimodalModel`` casts them
      to float32 for the loss); parameters stay float32.
  """
  num_classes: int
  hidden: tuple[int, ...] = (256,)
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """``[batch, dim]`` fused features -> ``[batch, num_classes]`` outputs."""
    if x.ndim != 2:
      raise ValueError(
          f"ClassifierHead needs features of shape [batch, dim]; got {x.shape}.")
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
