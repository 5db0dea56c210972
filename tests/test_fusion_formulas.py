"""Fusion blocks against their papers' formulas.

Each test initialises a block, reads its parameters and recomputes the output
in NumPy (float64) from the paper's equation, written out here and not taken
from ``mmjax`` (no helper of the block is called). Parameters that start at
zero (biases, BatchNorm statistics) are replaced by random values first, so
that a formula that dropped them would fail. Where a formula test could pass
by accident (a gate that ignores a modality, a swapped order), a negative
control computes the wrong formula and asserts that it differs.

The blocks run in float32; comparisons use ``rtol = atol = 1e-5`` unless a
test says why not.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mmjax.fusion  # Registers the fusion blocks.
from mmjax.encoders import Encoding
from mmjax.fusion.bilinear import MFBFusion, MutanFusion
from mmjax.fusion.film import FiLMFusion, film
from mmjax.fusion.gated import GatedFusion
from mmjax.fusion.multiplicative import MultiplicativeFusion
from mmjax.fusion.tensor import LowRankFusion, TensorFusion

from helpers import init_module, param_count

B = 3
DIM = 5
TOL = dict(rtol=1e-5, atol=1e-5)


def _pooled(widths: dict[str, int], seed: int = 0) -> dict[str, Encoding]:
  """``{name: Encoding(pooled [B, width])}``, standard normal, in the given
  (not necessarily sorted) order."""
  rng = np.random.default_rng(seed)
  return {name: Encoding(pooled=rng.normal(size=(B, w)).astype(np.float32))
          for name, w in widths.items()}


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _randomised(params, seed: int, names=("bias", "b")):
  """``params`` with every leaf called one of ``names`` (zeros at init)
  replaced by standard normal values."""
  rng = np.random.default_rng(seed)

  def visit(path, leaf):
    if getattr(path[-1], "key", None) in names:
      return rng.normal(size=leaf.shape).astype(np.float32)
    return leaf
  return jax.tree_util.tree_map_with_path(visit, params)


def _setup(block, encs, seed=1):
  """``(variables with random biases, float64 params, block output)``."""
  variables = init_module(block, encs)
  variables = {**variables, "params": _randomised(variables["params"], seed)}
  out = block.apply(variables, encs, train=False)
  return variables, _f64(variables["params"]), np.asarray(out)


def _x(encs, name):
  return np.asarray(encs[name].pooled, np.float64)


def _sigmoid(a):
  return 1. / (1. + np.exp(-a))


def _relu(a):
  return np.maximum(a, 0.)


def _dense(p, x):
  return x @ p["kernel"] + p.get("bias", 0.)


# Tensor fusion (Zadeh et al. 2017, arXiv:1707.07250).


def _with_one(x):
  return np.concatenate([x, np.ones((x.shape[0], 1))], axis=-1)


def test_tensor_fusion_is_the_outer_product_of_inputs_with_a_one():
  """``ReLU(vec([z_a; 1] (x) [z_v; 1]) W + b)``; modalities by name, so
  ``audio`` comes first although the dict lists it second."""
  encs = _pooled({"video": 4, "audio": 3})
  _, p, out = _setup(TensorFusion(dim=DIM), encs)
  za, zv = _with_one(_x(encs, "audio")), _with_one(_x(encs, "video"))
  outer = np.einsum("bi,bj->bij", za, zv).reshape(B, -1)  # [B, 4 * 5]
  np.testing.assert_allclose(out, _relu(_dense(p["out"], outer)), **TOL)
  # Negative control: the other order is a different function.
  swapped = np.einsum("bi,bj->bij", zv, za).reshape(B, -1)
  assert not np.allclose(out, _relu(_dense(p["out"], swapped)), atol=1e-3)


def test_tensor_fusion_three_modalities():
  encs = _pooled({"c": 2, "a": 3, "b": 4})
  _, p, out = _setup(TensorFusion(dim=DIM), encs)
  za, zb, zc = (_with_one(_x(encs, n)) for n in "abc")
  outer = np.einsum("bi,bj,bk->bijk", za, zb, zc).reshape(B, -1)
  assert outer.shape == (B, 4 * 5 * 3)
  np.testing.assert_allclose(out, _relu(_dense(p["out"], outer)), **TOL)


def test_tensor_fusion_projects_each_modality_first():
  """``project``: mmjax's per-modality linear map before the product."""
  encs = _pooled({"a": 3, "b": 4})
  _, p, out = _setup(TensorFusion(dim=DIM, project=2), encs)
  za, zb = (_with_one(_dense(p[f"project_{n}"], _x(encs, n))) for n in "ab")
  outer = np.einsum("bi,bj->bij", za, zb).reshape(B, -1)
  np.testing.assert_allclose(out, _relu(_dense(p["out"], outer)), **TOL)


# Low-rank multimodal fusion (Liu et al. 2018, arXiv:1806.00064).


@pytest.mark.parametrize("names", ["ab", "abc"])
def test_low_rank_fusion_is_a_sum_over_rank_of_products_over_modalities(
    names):
  """``sum_r prod_m ([z_m; 1] W_m^r) + bias``."""
  rank = 3
  encs = _pooled({n: 2 + i for i, n in enumerate(reversed(names))})
  _, p, out = _setup(LowRankFusion(rank=rank, dim=DIM), encs)
  expected = np.zeros((B, DIM))
  for r in range(rank):
    term = np.ones((B, DIM))
    for n in names:
      term = term * (_with_one(_x(encs, n)) @ p[f"factor_{n}"][r])
    expected += term
  np.testing.assert_allclose(out, expected + p["bias"], **TOL)


# Multiplicative interactions (Jayakumar et al. 2020, ICLR, OpenReview
# rylnK6VtDH).


def _paper_mi(x, z, W, U, V, b):
  """The paper's ``f(x, z) = z^T W x + z^T U + V x + b``."""
  return np.einsum("bz,zxd,bx->bd", z, W, x) + z @ U + x @ V + b


def _mi_inputs():
  # x is "a" (first by name); z = [b; c] (4 + 2 wide).
  encs = _pooled({"c": 2, "a": 3, "b": 4})
  x = _x(encs, "a")
  z = np.concatenate([_x(encs, "b"), _x(encs, "c")], axis=-1)
  return encs, x, z


def test_multiplicative_matrix_is_the_paper_full_form():
  encs, x, z = _mi_inputs()
  _, p, out = _setup(MultiplicativeFusion(form="matrix", dim=DIM), encs)
  assert p["W"].shape == (6, 3, DIM)
  expected = _paper_mi(x, z, p["W"], p["U"]["kernel"], p["V"]["kernel"],
                       p["b"])
  np.testing.assert_allclose(out, expected, **TOL)
  # Negative control: without the bilinear term (concatenation, in effect).
  no_bilinear = _paper_mi(x, z, 0. * p["W"], p["U"]["kernel"],
                          p["V"]["kernel"], p["b"])
  assert not np.allclose(out, no_bilinear, atol=1e-3)


@pytest.mark.parametrize("form", ["vector", "scalar"])
def test_multiplicative_gated_forms_are_the_full_form_with_rank_one_W(form):
  """``vector``: ``(z W_v + b_v) * (V x) + z U + b``, which is the full form
  with ``W[z, x, d] = W_v[z, d] V[x, d]`` and ``V_full = diag(b_v) V``;
  ``scalar``: the same with one gate, ``W[z, x, d] = w_s[z] V[x, d]``."""
  encs, x, z = _mi_inputs()
  _, p, out = _setup(MultiplicativeFusion(form=form, dim=DIM), encs)
  V, U = p["V"]["kernel"], p["U"]["kernel"]
  gate = p["W_v"] if form == "vector" else p["w_s"]
  g_Z, g0 = gate["kernel"], gate["bias"]  # [6, DIM] and [DIM], or [6, 1], [1].
  direct = (z @ g_Z + g0) * (x @ V) + z @ U + p["b"]
  np.testing.assert_allclose(out, direct, **TOL)
  W_full = np.einsum("zd,xd->zxd", np.broadcast_to(g_Z, (6, DIM)), V)
  V_full = V * g0  # diag(b_v) V, or b_s V.
  np.testing.assert_allclose(out, _paper_mi(x, z, W_full, U, V_full, p["b"]),
                             **TOL)
  # Negative control: dropping the gate's bias (a purely multiplicative gate)
  # differs.
  assert not np.allclose(out, (z @ g_Z) * (x @ V) + z @ U + p["b"],
                         atol=1e-3)


# Gated Multimodal Unit (Arevalo et al. 2017, arXiv:1702.01992).


def _gmu_run(block, encs, variables):
  """``(output, {gate Dense name: its pre-sigmoid output})``."""
  out, state = block.apply(variables, encs, train=False,
                           capture_intermediates=True,
                           mutable=["intermediates"])
  logits = {k: np.asarray(v["__call__"][0])
            for k, v in state["intermediates"].items() if k.startswith("gate")}
  return np.asarray(out), logits


def test_gmu_two_modalities_is_the_paper_bimodal_unit():
  """``h_i = tanh(W_i x_i)``, ``z = sigmoid(W_z [x_1, x_2])``, ``out = z h_1
  + (1 - z) h_2``, ``x_1`` first by name."""
  encs = _pooled({"visual": 4, "text": 3})
  block = GatedFusion(dim=DIM)
  variables, p, _ = _setup(block, encs)
  out, logits = _gmu_run(block, encs, variables)
  h1 = np.tanh(_dense(p["proj_text"], _x(encs, "text")))
  h2 = np.tanh(_dense(p["proj_visual"], _x(encs, "visual")))
  x = np.concatenate([_x(encs, "text"), _x(encs, "visual")], axis=-1)
  z = _sigmoid(_dense(p["gate"], x))
  np.testing.assert_allclose(_sigmoid(logits["gate"]), z, **TOL)
  np.testing.assert_allclose(out, z * h1 + (1. - z) * h2, **TOL)
  # Negative control: the gate on the other modality.
  assert not np.allclose(out, z * h2 + (1. - z) * h1, atol=1e-3)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_gmu_three_modalities(gate):
  """``sigmoid`` (default), the paper's: ``z_i = sigmoid(W_zi [x_1, x_2,
  x_3])``, ``out = sum_i z_i h_i``. ``softmax`` (mmjax's option): ``z =
  softmax_i(W_z [x_1, x_2, x_3])`` over modalities."""
  names = ("a", "b", "c")
  encs = _pooled({"c": 2, "a": 3, "b": 4})
  block = GatedFusion(dim=DIM, gate=gate)
  variables, p, _ = _setup(block, encs)
  out, logits = _gmu_run(block, encs, variables)
  h = np.stack([np.tanh(_dense(p[f"proj_{n}"], _x(encs, n))) for n in names],
               axis=1)  # [B, 3, DIM]
  x = np.concatenate([_x(encs, n) for n in names], axis=-1)
  if gate == "sigmoid":
    a = np.stack([_dense(p[f"gate_{n}"], x) for n in names], axis=1)
    z = _sigmoid(a)
    np.testing.assert_allclose(
        np.stack([_sigmoid(logits[f"gate_{n}"]) for n in names], axis=1), z,
        **TOL)
    # Negative control: the paper's gates are independent, not a softmax.
    soft = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    assert not np.allclose(out, (soft * h).sum(axis=1), atol=1e-3)
  else:
    a = _dense(p["gate"], x).reshape(B, 3, DIM)
    z = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    assert set(logits) == {"gate"}
  np.testing.assert_allclose(out, (z * h).sum(axis=1), **TOL)


def test_gmu_each_gate_reads_every_modality():
  """Changing one modality's input changes every modality's gate, its own
  and the others' (a gate computed from its own modality alone would not
  move for the others)."""
  names = ("a", "b", "c")
  encs = _pooled({n: 3 for n in names})
  block = GatedFusion(dim=DIM)
  variables = init_module(block, encs)
  _, before = _gmu_run(block, encs, variables)
  changed = {**encs, "c": Encoding(pooled=encs["c"].pooled + 1.)}
  _, after = _gmu_run(block, changed, variables)
  for n in names:
    assert np.all(np.abs(after[f"gate_{n}"] - before[f"gate_{n}"]) > 1e-6), n


# FiLM (Perez et al. 2018, arXiv:1709.07871).


def test_film_identity_and_per_channel_broadcast():
  """mmjax's ``(1 + gamma) x + beta``: ``gamma = beta = 0`` is the identity,
  and ``gamma[b, c]``, ``beta[b, c]`` act on channel ``c`` of example ``b`` at
  every position, and on nothing else."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, 4, 3, 6)).astype(np.float32)
  zeros = np.zeros((B, 6), np.float32)
  np.testing.assert_array_equal(np.asarray(film(x, zeros, zeros)), x)
  gamma, beta = (rng.normal(size=(B, 6)).astype(np.float32) for _ in range(2))
  expected = ((1. + gamma[:, None, None, :]) * x.astype(np.float64)
              + beta[:, None, None, :])
  np.testing.assert_allclose(np.asarray(film(x, gamma, beta)), expected,
                             **TOL)
  bumped = gamma.copy()
  bumped[1, 2] += 1.
  diff = np.asarray(film(x, bumped, beta)) - np.asarray(film(x, gamma, beta))
  changed = np.argwhere(np.abs(diff) > 0)
  assert set(changed[:, 0]) == {1} and set(changed[:, 3]) == {2}
  seq = x[:, 0]  # [batch, time, channels] broadcasts the same way.
  np.testing.assert_allclose(np.asarray(film(seq, gamma, beta)),
                             expected[:, 0], **TOL)


def _coords(h, w):
  rows, cols = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w),
                           indexing="ij")
  return np.stack([rows, cols], axis=-1)  # [h, w, 2]: (row, column).


def _with_coords(x):
  grid = np.broadcast_to(_coords(*x.shape[1:3]), x.shape[:3] + (2,))
  return np.concatenate([x, grid], axis=-1)


def _conv1x1(p, x):
  return np.einsum("bhwc,cd->bhwd", x, p["kernel"][0, 0]) + p.get("bias", 0.)


def _conv3x3_same(kernel, x):
  """3x3 convolution, zero padding, stride 1, no bias."""
  _, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(np.einsum("bhwc,cd->bhwd", padded[:, i:i + h, j:j + w],
                       kernel[i, j]) for i in range(3) for j in range(3))


def _batch_norm(x, stats, params=None, eps=1e-5):
  """Inference-mode BatchNorm from the running statistics."""
  y = (x - stats["mean"]) / np.sqrt(stats["var"] + eps)
  if params is not None:
    y = y * params["scale"] + params["bias"]
  return y


def _random_stats(batch_stats, seed):
  """Running means ~N(0, 1) and variances in [0.5, 2]: BatchNorm that is not
  the identity, so the reference must apply it."""
  rng = np.random.default_rng(seed)

  def visit(path, leaf):
    if path[-1].key == "var":
      return rng.uniform(0.5, 2., leaf.shape).astype(np.float32)
    return rng.normal(size=leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(visit, batch_stats)


def _film_reference(p, stats, x, cond, num_blocks, classifier):
  """The FiLMed network on a ``[batch, h, w, c]`` target, in inference mode:
  a linear 1x1 stem; per block ``r = ReLU(conv1x1([x; coords]))``, ``x = r +
  ReLU((1 + gamma) BN(conv3x3(r)) + beta)``; then the output stage."""
  x = _conv1x1(p["stem"], _with_coords(x))
  for i in range(num_blocks):
    bp, bs = p[f"block_{i}"], stats[f"block_{i}"]
    r = _relu(_conv1x1(bp["Conv_0"], _with_coords(x)))
    y = _batch_norm(_conv3x3_same(bp["Conv_1"]["kernel"], r),
                    bs["BatchNorm_0"])
    gamma, beta = np.split(_dense(bp["Dense_0"], cond), 2, axis=-1)
    x = r + _relu((1. + gamma[:, None, None]) * y + beta[:, None, None])
  if classifier == "paper":
    # 1x1 conv (no bias), BatchNorm, ReLU, global max-pool.
    y = _conv1x1(p["out_proj"], _with_coords(x))
    return _relu(_batch_norm(y, stats["out_norm"], p["out_norm"])).max(
        axis=(1, 2))
  # mmjax's flatten: 1x1 conv, ReLU, flatten, Dense, ReLU.
  y = _relu(_conv1x1(p["out_proj"], _with_coords(x))).reshape(B, -1)
  return _relu(_dense(p["out_dense"], y))


@pytest.mark.parametrize("classifier", ["paper", "flatten"])
def test_film_fusion_is_the_papers_network(classifier):
  """The whole block in inference mode, from its parameters and (random)
  BatchNorm statistics; the conditioning is the other modalities' pooled
  vectors in name order."""
  rng = np.random.default_rng(3)
  image = rng.normal(size=(B, 4, 3, 5)).astype(np.float32)
  encs = {"question": Encoding(pooled=rng.normal(size=(B, 6)).astype(
              np.float32)),
          "image": Encoding(pooled=np.zeros((B, 1), np.float32),
                            tokens=image),
          "audio": Encoding(pooled=rng.normal(size=(B, 2)).astype(
              np.float32))}
  block = FiLMFusion(num_blocks=2, channels=4, dim=DIM, classifier=classifier)
  variables = init_module(block, encs)
  variables = {"params": _randomised(variables["params"], 4),
               "batch_stats": _random_stats(variables["batch_stats"], 5)}
  out = np.asarray(block.apply(variables, encs, train=False))
  cond = np.concatenate([_x(encs, "audio"), _x(encs, "question")], axis=-1)
  expected = _film_reference(_f64(variables["params"]),
                             _f64(variables["batch_stats"]),
                             image.astype(np.float64), cond, 2, classifier)
  np.testing.assert_allclose(out, expected, **TOL)


def test_film_zero_generator_leaves_features_unmodulated():
  """With the FiLM generators' weights at zero (``gamma = beta = 0``) the
  block no longer depends on the conditioning modality; with their initial
  weights it does."""
  rng = np.random.default_rng(6)
  encs = {"image": Encoding(pooled=np.zeros((B, 1), np.float32),
                            tokens=rng.normal(size=(B, 3, 3, 4)).astype(
                                np.float32)),
          "question": Encoding(pooled=rng.normal(size=(B, 5)).astype(
              np.float32))}
  other = {**encs, "question": Encoding(pooled=encs["question"].pooled + 1.)}
  block = FiLMFusion(num_blocks=2, channels=4, dim=DIM)
  variables = init_module(block, encs)
  apply = lambda v, e: np.asarray(block.apply(v, e, train=False))
  assert not np.allclose(apply(variables, encs), apply(variables, other))
  params = dict(variables["params"])
  for i in range(2):
    params[f"block_{i}"] = {
        **params[f"block_{i}"],
        "Dense_0": jax.tree.map(np.zeros_like, params[f"block_{i}"]["Dense_0"])}
  unmodulated = {**variables, "params": params}
  np.testing.assert_array_equal(apply(unmodulated, encs),
                                apply(unmodulated, other))


def test_film_sequence_paper_classifier_is_a_max_over_real_tokens():
  """``[batch, time, c]`` targets (mmjax's extension): the output is the max
  over real tokens of ``ReLU(LayerNorm(Dense(x)))``; padding never wins."""
  rng = np.random.default_rng(7)
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  tokens = rng.normal(size=(B, 4, 6)).astype(np.float32)
  encs = {"text": Encoding(pooled=np.zeros((B, 1), np.float32),
                           tokens=tokens, mask=mask),
          "image": Encoding(pooled=rng.normal(size=(B, 3)).astype(
              np.float32))}
  block = FiLMFusion(target="text", num_blocks=1, channels=4, dim=DIM)
  variables = init_module(block, encs)
  _, state = block.apply(variables, encs, train=False,
                         capture_intermediates=True,
                         mutable=["intermediates"])
  # The output stage's input: block_0's output.
  x = np.asarray(state["intermediates"]["block_0"]["__call__"][0], np.float64)
  p = _f64(variables["params"])
  y = _dense(p["out_proj"], x)
  mean = y.mean(-1, keepdims=True)
  y = (y - mean) / np.sqrt(((y - mean)**2).mean(-1, keepdims=True) + 1e-6)
  y = _relu(y * p["out_norm"]["scale"] + p["out_norm"]["bias"])
  expected = np.stack([y[b, mask[b]].max(axis=0) for b in range(B)])
  np.testing.assert_allclose(
      np.asarray(block.apply(variables, encs, train=False)), expected, **TOL)


def test_film_param_counts():
  """``mm_shapes``' FiLM config on its 8x8x64 image map and 128-d question,
  with each output stage, and a sequence target."""
  encs = {"image": Encoding(pooled=np.zeros((2, 1), np.float32),
                            tokens=np.zeros((2, 8, 8, 64), np.float32)),
          "question": Encoding(pooled=np.zeros((2, 128), np.float32))}
  count = lambda block: param_count(block, encs)
  film_config = dict(num_blocks=2, channels=32, dim=128)
  # stem (64+2+1)*32 + 2 * [(32+2+1)*32 + 9*32*32 + (128+1)*2*32]
  # + (32+2)*128 (1x1 conv, no bias) + 2*128 (BatchNorm scale and shift).
  assert count(FiLMFusion(**film_config)) == 43_936
  # ... + (32+2+1)*32 (1x1 conv) + (8*8*32 + 1)*128 (Dense of the flattened
  # map) in place of the paper's output stage.
  assert count(FiLMFusion(**film_config, classifier="flatten")) == 302_720
  seq = {"text": Encoding(pooled=np.zeros((2, 1), np.float32),
                          tokens=np.zeros((2, 7, 10), np.float32)),
         "image": Encoding(pooled=np.zeros((2, 3), np.float32))}
  block = FiLMFusion(target="text", num_blocks=1, channels=4, dim=DIM)
  # No coordinates on sequences: stem (10+1)*4 + [(4+1)*4 + 4*4 + (3+1)*2*4]
  # + 4*DIM (Dense, no bias) + 2*DIM (LayerNorm scale and shift).
  assert param_count(block, seq) == 44 + 68 + 6 * DIM
  flat = block.clone(classifier="flatten")
  # ... + (4+1)*4 + (4+1)*DIM in place of the paper's output stage.
  assert param_count(flat, seq) == 44 + 68 + 20 + 5 * DIM


# MFB (Yu et al. 2017, arXiv:1708.01471) and MUTAN (Ben-younes et al. 2017,
# arXiv:1705.06676).


def test_mfb_is_a_sum_pooled_product_of_projections():
  """``z = SumPool_k(prod_m (x_m U_m + b_m))``, the pool summing each run of
  ``k`` consecutive entries, then ``sign(z) sqrt(|z|)`` and L2
  normalisation."""
  k = 3
  encs = _pooled({"q": 4, "v": 3})
  raw = MFBFusion(dim=DIM, factor=k, normalize=False)
  _, p, out = _setup(raw, encs)
  prod = (_dense(p["proj_q"], _x(encs, "q"))
          * _dense(p["proj_v"], _x(encs, "v")))  # [B, DIM * k]
  z = prod.reshape(B, DIM, k).sum(-1)
  np.testing.assert_allclose(out, z, **TOL)
  variables = {"params": jax.tree.map(np.float32, p)}
  normed = np.asarray(MFBFusion(dim=DIM, factor=k).apply(variables, encs,
                                                         train=False))
  s = np.sign(z) * np.sqrt(np.abs(z))
  # The block's signed square root is within 1e-4 of the exact one, by design
  # (finite gradients at 0; see ``bilinear.signed_sqrt``).
  np.testing.assert_allclose(normed, s / np.linalg.norm(s, axis=-1,
                                                        keepdims=True),
                             rtol=0, atol=2e-4)


def test_mutan_is_a_rank_r_sum_of_products():
  """``x~_m = tanh(x_m W_m + b_m)``; ``z = sum_r prod_m (x~_m W_m^r +
  b_m^r)``; ``out = z W_o + b_o``."""
  rank, hidden, mm_dim = 2, 4, 3
  encs = _pooled({"v": 5, "q": 3})
  _, p, out = _setup(MutanFusion(dim=DIM, hidden=hidden, mm_dim=mm_dim,
                                 rank=rank), encs)
  z = np.zeros((B, mm_dim))
  for r in range(rank):
    term = np.ones((B, mm_dim))
    for n in ("q", "v"):
      xt = np.tanh(_dense(p[f"proj_{n}"], _x(encs, n)))
      cols = slice(r * mm_dim, (r + 1) * mm_dim)
      term = term * (xt @ p[f"rank_{n}"]["kernel"][:, cols]
                     + p[f"rank_{n}"]["bias"][cols])
    z += term
  np.testing.assert_allclose(out, _dense(p["out"], z), **TOL)

