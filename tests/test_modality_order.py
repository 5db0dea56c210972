"""Every fusion block is one function of its modalities, whatever the order
of the encodings dict, eagerly and under ``jax.jit`` (which rebuilds a dict
argument with sorted keys)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mmjax.encoders import Encoding
from mmjax.registry import FUSIONS

import block_cases


def _encodings(name: str) -> dict[str, Encoding]:
  """The block's test encodings, with a third, pooled-only modality for
  FiLM so that the order of its conditioning modalities matters."""
  _, make_inputs = block_cases.CASES[name]
  (encodings,) = make_inputs()
  if name == "film":
    extra = np.random.default_rng(9).normal(size=(block_cases.B, 3))
    encodings = {**encodings, "audio": Encoding(pooled=extra.astype(np.float32))}
  return encodings


def _outputs(out) -> list[np.ndarray]:
  """Decision fusion's ``{modality: features}`` by name; arrays as they are."""
  if isinstance(out, dict):
    return [np.asarray(out[k]) for k in sorted(out)]
  return [np.asarray(out)]


@pytest.mark.parametrize("name", sorted(FUSIONS.names()))
def test_fusion_ignores_the_order_of_the_encodings_dict(name):
  make_module, _ = block_cases.CASES[name]
  module = make_module(None)
  encodings = _encodings(name)
  assert len(encodings) >= 2, name
  reversed_order = dict(reversed(list(encodings.items())))
  assert list(reversed_order) != sorted(reversed_order)
  apply = lambda variables, enc: module.apply(variables, enc, train=False)

  # Initialised on the reversed dict, the parameters fit either order. Under
  # jit the block sees the keys sorted; eagerly, reversed.
  variables = module.init({"params": jax.random.PRNGKey(0),
                           "dropout": jax.random.PRNGKey(1)}, reversed_order,
                          train=False)
  in_sorted_order = _outputs(jax.jit(apply)(variables, reversed_order))
  in_reversed_order = _outputs(apply(variables, reversed_order))
  for x, y in zip(in_reversed_order, in_sorted_order, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
