"""Tests for the tensor, low-rank, gated and multiplicative fusion blocks."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax.fusion  # Registers the fusion blocks.
from mmjax.encoders import Encoding
from mmjax.fusion.gated import GatedFusion
from mmjax.fusion.multiplicative import MultiplicativeFusion
from mmjax.fusion.tensor import LowRankFusion, TensorFusion, outer_product
from mmjax.registry import FUSIONS

from helpers import (B, check_registered_fusion, init_module, param_count,
                     pooled_encoding)

DIM = 6

BLOCKS = {
    "tensor": ("tensor", TensorFusion, dict(dim=DIM)),
    "tensor_project": ("tensor", TensorFusion, dict(dim=DIM, project=3)),
    "low_rank": ("low_rank", LowRankFusion, dict(rank=3, dim=DIM)),
    "gated": ("gated", GatedFusion, dict(dim=DIM)),
    "gated_softmax": ("gated", GatedFusion, dict(dim=DIM, gate="softmax")),
    "mult_matrix": ("multiplicative", MultiplicativeFusion,
                    dict(form="matrix", dim=DIM)),
    "mult_vector": ("multiplicative", MultiplicativeFusion,
                    dict(form="vector", dim=DIM)),
    "mult_scalar": ("multiplicative", MultiplicativeFusion,
                    dict(form="scalar", dim=DIM)),
}


def _encs(num: int) -> dict[str, Encoding]:
  """``num`` modalities with distinct widths 4, 5, 6, ..."""
  return {f"m{i}": pooled_encoding(i, 4 + i) for i in range(num)}


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("block", BLOCKS)
def test_fusion_block(block, num_modalities):
  name, cls, kwargs = BLOCKS[block]
  out = check_registered_fusion(name, cls, kwargs, _encs(num_modalities))
  chex.assert_shape(out, (B, DIM))


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_tensor_param_count(num_modalities):
  encs = _encs(num_modalities)
  widths = [4 + i for i in range(num_modalities)]
  assert param_count(TensorFusion(dim=DIM), encs) == (
      math.prod(d + 1 for d in widths) * DIM + DIM)
  p = 3
  assert param_count(TensorFusion(dim=DIM, project=p), encs) == (
      sum((d + 1) * p for d in widths) + (p + 1)**num_modalities * DIM + DIM)


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_low_rank_param_count_and_names(num_modalities):
  encs = _encs(num_modalities)
  widths = [4 + i for i in range(num_modalities)]
  rank = 3
  fusion = LowRankFusion(rank=rank, dim=DIM)
  assert param_count(fusion, encs) == (
      rank * sum(d + 1 for d in widths) * DIM + DIM)
  # One trainable factor per modality, registered as a parameter (MultiBench's
  # LMF builds its factors outside the parameter list, so they never train).
  params = init_module(fusion, encs)["params"]
  assert set(params) == {f"factor_m{i}" for i in range(num_modalities)} | {
      "bias"}


def test_gated_and_multiplicative_param_counts():
  encs = _encs(3)
  dx, dz = 4, 5 + 6
  widths = [4, 5, 6]
  # One tanh projection per modality, (d_i + 1) * DIM; the gates read all
  # 4 + 5 + 6 inputs: 3 sigmoid gates (or one softmax Dense of 3 * DIM).
  for gate in ("sigmoid", "softmax"):
    assert param_count(GatedFusion(dim=DIM, gate=gate), encs) == (
        sum((d + 1) * DIM for d in widths) + (sum(widths) + 1) * 3 * DIM)
  # Two modalities: one gate z over both inputs, whatever ``gate``.
  for gate in ("sigmoid", "softmax"):
    assert param_count(GatedFusion(dim=DIM, gate=gate), _encs(2)) == (
        (4 + 1) * DIM + (5 + 1) * DIM + (4 + 5 + 1) * DIM)
  common = dx * DIM + dz * DIM + DIM
  counts = {"matrix": dz * dx * DIM, "vector": (dz + 1) * DIM,
            "scalar": dz + 1}
  for form, extra in counts.items():
    assert param_count(
        MultiplicativeFusion(form=form, dim=DIM), encs) == extra + common


def test_tensor_outer_product_keeps_unimodal_terms():
  encs = _encs(2)
  z0, z1 = encs["m0"].pooled, encs["m1"].pooled
  ones = jnp.ones((B, 1))
  flat = outer_product([jnp.concatenate([z, ones], -1) for z in (z0, z1)])
  full = flat.reshape(B, 5, 6)
  chex.assert_trees_all_close(full[:, :4, :5], z0[:, :, None] * z1[:, None])
  chex.assert_trees_all_close(full[:, :4, 5], z0)
  chex.assert_trees_all_close(full[:, 4, :5], z1)
  chex.assert_trees_all_close(full[:, 4, 5], jnp.ones(B))


def test_low_rank_equals_tensor_fusion_with_its_full_weight():
  """LMF is TFN before its ReLU, with weight ``sum_r (x)_m W_m^r``."""
  encs = _encs(3)
  fusion = LowRankFusion(rank=3, dim=DIM)
  params = init_module(fusion, encs)["params"]
  params = {**params, "bias": jax.random.normal(jax.random.key(5), (DIM,))}
  out = fusion.apply({"params": params}, encs, train=False)
  w0, w1, w2 = (params[f"factor_m{i}"] for i in range(3))
  full_KxD = jnp.einsum("rid,rjd,rkd->ijkd", w0, w1, w2).reshape(-1, DIM)
  zs = [jnp.concatenate([e.pooled, jnp.ones((B, 1))], -1)
        for e in encs.values()]
  expected = outer_product(zs) @ full_KxD + params["bias"]
  chex.assert_trees_all_close(out, expected, atol=1e-4, rtol=1e-4)


def test_gated_two_modalities_is_a_convex_mix():
  encs = _encs(2)
  fusion = GatedFusion(dim=DIM)
  variables = init_module(fusion, encs)
  out = fusion.apply(variables, encs, train=False)
  p = variables["params"]
  h = [jnp.tanh(e.pooled @ p[f"proj_{n}"]["kernel"] + p[f"proj_{n}"]["bias"])
       for n, e in encs.items()]
  lo, hi = jnp.minimum(*h), jnp.maximum(*h)
  assert np.all(np.asarray((out >= lo - 1e-6) & (out <= hi + 1e-6)))


def test_multiplicative_forms_differ_and_take_x_by_name():
  encs = _encs(3)
  outs = {}
  for form in ("matrix", "vector", "scalar"):
    fusion = MultiplicativeFusion(form=form, dim=DIM)
    outs[form] = fusion.apply(init_module(fusion, encs), encs, train=False)
  assert not np.allclose(outs["matrix"], outs["vector"])
  assert not np.allclose(outs["vector"], outs["scalar"])
  # x is the first modality by name, whatever the dict's order.
  fusion = MultiplicativeFusion(dim=DIM)
  reordered = {"m1": encs["m1"], "m0": encs["m0"], "m2": encs["m2"]}
  assert init_module(fusion, encs)["params"]["W"].shape == (11, 4, DIM)
  assert init_module(fusion, reordered)["params"]["W"].shape == (11, 4, DIM)


@pytest.mark.parametrize("block", ["tensor", "low_rank", "gated",
                                   "multiplicative"])
def test_shape_errors(block):
  fusion = FUSIONS.get(block)(dim=DIM)
  encs = {"image": pooled_encoding(0, 4),
          "question": Encoding(pooled=jnp.zeros((B, 3, 2)))}
  with pytest.raises(ValueError, match=r"'question'.*\(4, 3, 2\)"):
    init_module(fusion, encs)
  encs = {"image": pooled_encoding(0, 4),
          "question": Encoding(pooled=jnp.zeros((2, 3)))}
  with pytest.raises(ValueError, match=r"batch size.*'question': \(2, 3\)"):
    init_module(fusion, encs)
  with pytest.raises(ValueError, match=r"at least two.*\['image'\].*'concat'"):
    init_module(fusion, {"image": pooled_encoding(0, 4)})


def test_unknown_gated_gate():
  with pytest.raises(ValueError, match="'tanh'.*Valid: sigmoid, softmax"):
    init_module(GatedFusion(dim=DIM, gate="tanh"), _encs(3))


def test_unknown_multiplicative_form():
  with pytest.raises(ValueError, match="'outer'.*matrix, vector, scalar"):
    init_module(MultiplicativeFusion(form="outer"), _encs(2))
