"""Tests for the MFB, MUTAN, non-local gated and decision-level fusions.

Their data-parallel cases (4 devices agree with one) are in
``block_cases.py``.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax.fusion  # Registers the fusion blocks.
from mmjax.encoders import Encoding
from mmjax.fusion.bilinear import MFBFusion, MutanFusion, signed_sqrt
from mmjax.fusion.decision import DecisionFusion
from mmjax.fusion.gated import NonLocalGatedFusion
from mmjax.heads import ClassifierHead
from mmjax.models import MultimodalModel
from mmjax.registry import FUSIONS

from helpers import (B, check_registered_fusion, image_encoding, init_module,
                     param_count, pooled_encoding, sequence_encoding)

DIM = 6

BLOCKS = {
    "mfb": ("mfb", MFBFusion, dict(dim=DIM, factor=3, dropout=0.1)),
    "mutan": ("mutan", MutanFusion, dict(dim=DIM, hidden=5, rank=3,
                                         dropout=0.1)),
    "nonlocal_gated": ("nonlocal_gated", NonLocalGatedFusion, dict(dim=DIM)),
    "decision": ("decision", DecisionFusion, dict(dim=DIM)),
}

# pooled widths of _encs' modalities, in order.
POOLED = (12, 10, 6)


def _encs(num: int) -> dict[str, Encoding]:
  """A feature map (``[B, 2, 2, 3]`` tokens), a padded sequence (``[B, 6, 5]``
  tokens and mask) and a pooled-only modality, the first ``num`` of them."""
  encs = {"image": image_encoding(h=2, c=3), "question": sequence_encoding(d=5),
          "audio": pooled_encoding(2, 6)}
  return dict(list(encs.items())[:num])


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("block", BLOCKS)
def test_fusion_block(block, num_modalities):
  name, cls, kwargs = BLOCKS[block]
  encs = _encs(num_modalities)
  out = check_registered_fusion(name, cls, kwargs, encs)
  if name == "decision":
    assert list(out) == sorted(encs)  # Sorted modality order.
    chex.assert_tree_shape_prefix(out, (B, DIM))
  else:
    chex.assert_shape(out, (B, DIM))


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_param_counts(num_modalities):
  encs = _encs(num_modalities)
  widths = POOLED[:num_modalities]
  k, h, r = 3, 5, 4
  assert param_count(MFBFusion(dim=DIM, factor=k), encs) == (
      sum((d + 1) * DIM * k for d in widths))
  assert param_count(MutanFusion(dim=DIM, hidden=h, rank=r), encs) == (
      sum((d + 1) * h + (h + 1) * r * h for d in widths) + (h + 1) * DIM)
  m = 7  # A core output width of its own (the paper: hidden 310, mm_dim 510).
  assert param_count(MutanFusion(dim=DIM, hidden=h, mm_dim=m, rank=r),
                     encs) == (
      sum((d + 1) * h + (h + 1) * r * m for d in widths) + (m + 1) * DIM)
  token_widths = (3, 5, 6)[:num_modalities]  # audio: its pooled, one token.
  assert param_count(NonLocalGatedFusion(dim=DIM), encs) == (
      sum((c + 1) * DIM + (d + 1) * DIM + (DIM + 1) * DIM + DIM * DIM
          for c, d in zip(token_widths, widths))
      + (num_modalities * DIM + 1) * DIM)
  assert param_count(DecisionFusion(dim=DIM), encs) == (
      sum((d + 1) * DIM for d in widths))


def test_mfb_is_sum_pooled_product_and_unit_norm():
  encs = _encs(3)
  k = 3
  raw = MFBFusion(dim=DIM, factor=k, normalize=False)
  params = init_module(raw, encs)["params"]
  projs = [e.pooled @ params[f"proj_{n}"]["kernel"] + params[f"proj_{n}"]["bias"]
           for n, e in encs.items()]
  expected = (projs[0] * projs[1] * projs[2]).reshape(B, DIM, k).sum(-1)
  out = raw.apply({"params": params}, encs, train=False)
  chex.assert_trees_all_close(out, expected, atol=1e-4, rtol=1e-4)

  normed = MFBFusion(dim=DIM, factor=k, normalize=True)
  for train in (False, True):  # Also with dropout on the product.
    z = normed.apply({"params": params}, encs, train=train,
                     rngs={"dropout": jax.random.key(3, impl="rbg")})
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), np.ones(B),
                               rtol=1e-5)
  z = normed.apply({"params": params}, encs, train=False)
  power = jnp.sign(expected) * jnp.sqrt(jnp.abs(expected))
  chex.assert_trees_all_close(
      z, power / jnp.linalg.norm(power, axis=-1, keepdims=True), atol=1e-3)


def test_mfb_gradients_are_finite_at_zero():
  encs = {n: Encoding(pooled=jnp.zeros((B, 4))) for n in ("a", "b")}
  fusion = MFBFusion(dim=DIM, factor=3)
  params = init_module(fusion, encs)["params"]

  def loss(p, e):
    return fusion.apply({"params": p}, e, train=True,
                        rngs={"dropout": jax.random.key(1, impl="rbg")}).sum()

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  for scale in (0., 1e-12):
    chex.assert_tree_all_finite(
        grad_fn(params, jax.tree.map(lambda x: x + scale, encs)))
  # The safe signed square root stays close to the exact one.
  z = jnp.array([-4., -1e-3, 0., 1e-3, 2.])
  chex.assert_trees_all_close(signed_sqrt(z),
                              jnp.sign(z) * jnp.sqrt(jnp.abs(z)), atol=1e-4)
  chex.assert_tree_all_finite(jax.grad(lambda z: signed_sqrt(z).sum())(z))


@pytest.mark.parametrize("mm_dim", [0, 7])
def test_mutan_is_a_rank_r_sum_of_products(mm_dim):
  encs = _encs(2)
  h, r = 5, 3
  m = mm_dim or h  # 0 ties the core's output width to hidden.
  fusion = MutanFusion(dim=DIM, hidden=h, mm_dim=mm_dim, rank=r)
  params = init_module(fusion, encs)["params"]
  assert params["rank_image"]["kernel"].shape == (h, r * m)
  dense = lambda x, p: x @ p["kernel"] + p["bias"]
  z = 0.
  for i in range(r):
    prod = 1.
    for n, e in encs.items():
      x = jnp.tanh(dense(e.pooled, params[f"proj_{n}"]))
      prod = prod * dense(x, params[f"rank_{n}"])[:, i * m:(i + 1) * m]
    z = z + prod
  out = fusion.apply({"params": params}, encs, train=False)
  chex.assert_trees_all_close(out, dense(z, params["out"]), atol=1e-4,
                              rtol=1e-4)


def test_nonlocal_gated_ignores_padding_and_reads_the_other_context():
  encs = _encs(2)
  fusion = NonLocalGatedFusion(dim=DIM)
  variables = init_module(fusion, encs)
  out = fusion.apply(variables, encs, train=False)
  q = encs["question"]
  assert not np.all(np.asarray(q.mask))
  padded = q.replace(tokens=jnp.where(q.mask[..., None], q.tokens, 7.))
  chex.assert_trees_all_close(
      fusion.apply(variables, {**encs, "question": padded}, train=False), out,
      atol=1e-6)
  # The question's own summary reads its tokens; its pooled vector reaches the
  # output only through the image tokens' gates.
  other = q.replace(pooled=q.pooled + 1.)
  assert not np.allclose(
      fusion.apply(variables, {**encs, "question": other}, train=False), out)


@pytest.mark.parametrize("block", ["mfb", "mutan", "nonlocal_gated"])
def test_needs_two_modalities(block):
  label = {"mfb": "MFB", "mutan": "MUTAN", "nonlocal_gated": "Non-local gated"}
  with pytest.raises(ValueError,
                     match=rf"{label[block]} fusion needs at least two.*"
                     r"\['image'\].*'concat'"):
    init_module(FUSIONS.get(block)(dim=DIM), {"image": pooled_encoding(0, 4)})


def test_shape_errors_name_modality():
  encs = {"image": pooled_encoding(0, 4),
          "question": Encoding(pooled=jnp.zeros((B, 3, 2)))}
  for block in ("mfb", "mutan", "decision"):
    with pytest.raises(ValueError, match=r"'question'.*\(4, 3, 2\)"):
      init_module(FUSIONS.get(block)(dim=DIM), encs)
  with pytest.raises(ValueError, match="Decision fusion needs at least one"):
    init_module(DecisionFusion(dim=DIM), {})


# Decision-level fusion in the model.


class _TinyEncoder(nn.Module):
  """``[batch, features] -> Encoding(pooled=Dense(dim))``."""
  dim: int = 5

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool) -> Encoding:
    del mask, train
    return Encoding(pooled=nn.Dense(self.dim)(x))


def _model(modalities, fusion):
  return MultimodalModel(
      encoders={m: _TinyEncoder(dim=4 + i) for i, m in enumerate(modalities)},
      fusion=fusion,
      heads={"answer": ClassifierHead(num_classes=3, hidden=(4,))})


def _model_batch():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(B, 7)).astype(np.float32),
          "question": rng.normal(size=(B, 3)).astype(np.float32)}


@pytest.mark.parametrize("modalities", [("image", "question"), ("image",)])
def test_decision_logits_are_the_mean_of_per_modality_heads(modalities):
  model = _model(modalities, DecisionFusion(dim=DIM))
  batch = _model_batch()
  params = init_module(model, batch)["params"]
  assert set(params) == ({f"encoders_{m}" for m in modalities} | {"fusion"}
                         | {f"heads_answer_{m}" for m in modalities})
  logits = model.apply({"params": params}, batch, train=False)["answer"]
  chex.assert_shape(logits, (B, 3))

  encodings = {m: _TinyEncoder(dim=4 + i).apply(
      {"params": params[f"encoders_{m}"]}, batch[m], train=False)
               for i, m in enumerate(modalities)}
  features = DecisionFusion(dim=DIM).apply({"params": params["fusion"]},
                                           encodings, train=False)
  head = ClassifierHead(num_classes=3, hidden=(4,))
  per_modality = [head.apply({"params": params[f"heads_answer_{m}"]},
                             features[m], train=False) for m in modalities]
  if len(modalities) == 2:  # Not vacuous: the two predictions differ.
    assert not np.allclose(per_modality[0], per_modality[1], atol=1e-3)
  chex.assert_trees_all_close(logits, sum(per_modality) / len(modalities),
                              atol=1e-5, rtol=1e-5)


def test_other_fusions_keep_the_parameter_tree():
  model = _model(("image", "question"), mmjax.fusion.concat.ConcatFusion(
      hidden=(DIM,)))
  params = init_module(model, _model_batch())["params"]
  assert set(params) == {"encoders_image", "encoders_question", "fusion",
                         "heads_answer"}
