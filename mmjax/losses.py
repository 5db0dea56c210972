"""Losses and per-example metrics of the heads."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax


def head_targets(heads: ml_collections.ConfigDict) -> dict[str, tuple[str, float]]:
  """head name -> (batch key of its labels, loss weight)."""
  return {name: (head.target, float(head.get("weight", 1.0)))
          for name, head in heads.items()}


def metric_names(head_names: list[str]) -> list[str]:
  """The metrics ``classification_terms`` returns for heads ``head_names``
  (in that order), as evaluation logs them."""
  names = ["accuracy", "loss"]
  if len(head_names) > 1:
    for name in head_names:
      names += [f"loss/{name}", f"accuracy/{name}"]
  return names


def classification_terms(logits: Mapping[str, jax.Array],
                         batch: Mapping[str, jax.Array],
                         targets: Mapping[str, tuple[str, float]]
                         ) -> dict[str, jax.Array]:
  """Per-example loss and correctness, ``[batch]`` each.

  Returns ``loss`` (weighted sum over heads of softmax cross-entropy),
  ``accuracy`` (of the first head) and, with several heads,
  ``loss/<head>`` and ``accuracy/<head>`` for each.
  """
  terms = {}
  total = 0.0
  for i, (name, (target, weight)) in enumerate(targets.items()):
    labels = batch[target]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[name], labels)
    correct = (jnp.argmax(logits[name], -1) == labels).astype(jnp.float32)
    total = total + weight * loss
    if i == 0:
      terms["accuracy"] = correct
    if len(targets) > 1:
      terms[f"loss/{name}"] = loss
      terms[f"accuracy/{name}"] = correct
  terms["loss"] = total
  return terms
