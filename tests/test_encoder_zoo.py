"""Tests for the encoder zoo: LeNet, ResNet, ViT, GRU, DAN, the text
transformer, the 1-D conv encoder and the MLP.

Their data-parallel cases (4 devices agree with one) are in
``block_cases.py``.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax.encoders  # Registers the encoders.
from mmjax.encoders import image
from mmjax.encoders.image import LeNetEncoder
from mmjax.encoders.resnet import ResNetEncoder
from mmjax.encoders.sequence import Conv1DEncoder, MLPEncoder
from mmjax.encoders.text import (DANEncoder, GRUEncoder, LSTMEncoder,
                                 TextTransformerEncoder)
from mmjax.encoders.vit import ViTEncoder
from mmjax.registry import ENCODERS

from helpers import (B, T, apply_module, assert_every_param_gets_grad,
                     assert_jit_agrees, init_module, padded_question,
                     param_count, rbg_key)

VOCAB = 20


def _images(h=16, w=16, c=3):
  return jax.random.normal(rbg_key(50), (B, h, w, c))


def _encode(enc, variables, *inputs, train: bool):
  """The ``Encoding``, without the updated BatchNorm statistics."""
  out = apply_module(enc, variables, *inputs, train=train)
  return out[0] if train else out


def _shapes(enc, *inputs):
  """(variables, eval-mode ``Encoding``) as shapes, without computing them."""
  variables = jax.eval_shape(functools.partial(init_module, enc), *inputs)
  out = jax.eval_shape(functools.partial(enc.apply, train=False), variables,
                       *inputs)
  return variables, out


def _waves(t=20, f=None):
  shape = (B, t) if f is None else (B, t, f)
  x = jax.random.normal(rbg_key(51), shape)
  mask = jnp.arange(t)[None] < jnp.array([t, 13, 1, 7])[:, None]
  return x, mask


# Each case: (module, inputs, expected pooled shape, expected tokens shape).
CASES = {
    "lenet": (LeNetEncoder(channels=2, num_blocks=1),
              lambda: (_images(28, 28, 1),), (B, 4), (B, 7, 7, 4)),
    "resnet": (ResNetEncoder(stage_sizes=(1, 1), width=4, dim=8),
               lambda: (_images(),), (B, 8), (B, 8, 8, 8)),
    "vit": (ViTEncoder(patch_size=4, dim=8, num_layers=1, num_heads=2,
                       mlp_dim=16), lambda: (_images(),), (B, 8), (B, 16, 8)),
    "gru": (GRUEncoder(vocab_size=VOCAB, embed_dim=4, hidden=8),
            padded_question, (B, 8), (B, T, 8)),
    "dan": (DANEncoder(vocab_size=VOCAB, embed_dim=4, hidden=(8,), dim=8),
            padded_question, (B, 8), (B, T, 4)),
    "text_transformer": (
        TextTransformerEncoder(vocab_size=VOCAB, dim=8, num_layers=1,
                               num_heads=2, mlp_dim=16, max_len=8),
        padded_question, (B, 8), (B, T, 8)),
    "conv1d": (Conv1DEncoder(features=(4, 8), kernel_size=3, dim=8),
               _waves, (B, 8), (B, 5, 8)),
    "mlp": (MLPEncoder(hidden=(8,), dim=8),
            lambda: (jax.random.normal(rbg_key(52), (B, 3, 4)),), (B, 8), None),
}
TEXT = ("gru", "dan", "text_transformer")


def test_registry_names():
  expected = {
      "lenet": LeNetEncoder, "resnet": ResNetEncoder, "vit": ViTEncoder,
      "lstm": LSTMEncoder, "gru": GRUEncoder, "dan": DANEncoder,
      "text_transformer": TextTransformerEncoder, "conv1d": Conv1DEncoder,
      "mlp": MLPEncoder}
  for name, cls in expected.items():
    assert ENCODERS.get(name) is cls
  assert set(CASES) | {"lstm"} == set(expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoder(name):
  """Shapes, finiteness, jit agreement and a gradient for every parameter."""
  enc, make_inputs, pooled_shape, tokens_shape = CASES[name]
  inputs = make_inputs()
  variables = init_module(enc, *inputs)
  for train in (False, True):
    out = _encode(enc, variables, *inputs, train=train)
    chex.assert_shape(out.pooled, pooled_shape)
    chex.assert_tree_all_finite(out)
    if tokens_shape is None:
      assert out.tokens is None
    else:
      chex.assert_shape(out.tokens, tokens_shape)
  if len(inputs) == 1:
    assert out.mask is None
  elif name == "conv1d":  # Downsampled twice by stride 2.
    chex.assert_trees_all_equal(out.mask, inputs[1][:, ::4])
  else:
    chex.assert_trees_all_equal(out.mask, inputs[1])
  assert_jit_agrees(enc, variables, *inputs)
  assert_every_param_gets_grad(enc, variables, *inputs)


@pytest.mark.parametrize("name", TEXT + ("conv1d",))
def test_ignores_padding(name):
  """Changing the input at padded positions leaves the output unchanged."""
  enc, make_inputs, _, _ = CASES[name]
  x, mask = make_inputs()
  if name == "conv1d":
    other_x = jnp.where(mask[..., None] if x.ndim == 3 else mask, x, 5. + x)
  else:
    other_x = jnp.where(mask, x, (x + 7) % VOCAB)
  assert np.any(np.asarray(other_x != x))
  variables = init_module(enc, x, mask)
  for train in (False, True):
    encode = jax.jit(functools.partial(_encode, enc, train=train))
    out = encode(variables, x, mask)
    other = encode(variables, other_x, mask)
    chex.assert_trees_all_close(other.pooled, out.pooled, atol=1e-5, rtol=1e-5)
    out_mask = out.mask[..., None]
    chex.assert_trees_all_close(other.tokens * out_mask, out.tokens * out_mask,
                                atol=1e-5, rtol=1e-5)
  # Not vacuous: without the mask the padding does change the result.
  assert not np.allclose(encode(variables, x, None).pooled,
                         encode(variables, other_x, None).pooled)


def test_conv1d_ignores_how_much_padding_follows():
  """The same 7-frame signal padded to 16, 17 and 18 frames: the same pooled
  output and the same tokens at real steps (with running statistics; batch
  statistics in training do count padded steps, as documented)."""
  enc = Conv1DEncoder(features=(4, 8), kernel_size=5, stride=2, dim=6)
  signal = np.random.default_rng(0).normal(size=(2, 7, 3)).astype(np.float32)
  variables = init_module(enc, np.zeros((2, 16, 3), np.float32),
                          np.ones((2, 16), bool))
  # Running statistics that are not the identity, so BatchNorm matters.
  variables = jax.tree.map(lambda x: x + 0.3, variables)
  outputs = []
  for length in (16, 17, 18):
    x = np.zeros((2, length, 3), np.float32)
    x[:, :7] = signal
    mask = np.arange(length)[None] < 7
    out = _encode(enc, variables, x, np.repeat(mask, 2, 0), train=False)
    real = int(out.mask[0].sum())
    outputs.append((out.pooled, out.tokens[:, :real]))
  for pooled, tokens in outputs[1:]:
    chex.assert_trees_all_close(pooled, outputs[0][0], atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(tokens, outputs[0][1], atol=1e-6, rtol=1e-6)


# LeNet.


def _lenet_params(in_channels: int, c: int, k: int) -> int:
  """Closed form: the 5x5 conv and its BatchNorm scale and bias, then block
  ``i`` of ``k``: a 3x3 conv from ``c 2**i`` to ``c 2**(i+1)`` channels and its
  BatchNorm. Summing the geometric series gives the expression returned."""
  return 25 * in_channels * c + 2 * c + 6 * c**2 * (4**k - 1) + 4 * c * (2**k - 1)


def test_lenet_multibench_sizes():
  """MultiBench's AV-MNIST encoders: 28x28 images, 112x112 spectrograms."""
  for num_blocks, x, dim in [(3, jnp.zeros((2, 28, 28, 1)), 48),
                             (5, jnp.zeros((2, 112, 112)), 192)]:  # No channel.
    _, out = _shapes(LeNetEncoder(num_blocks=num_blocks), x)
    chex.assert_shape(out.pooled, (2, dim))
    chex.assert_shape(out.tokens, (2, 1, 1, dim))


@pytest.mark.parametrize("in_channels, channels, num_blocks, side", [
    (1, 6, 3, 28), (1, 6, 5, 112), (3, 2, 0, 8)])
def test_lenet_param_count(in_channels, channels, num_blocks, side):
  enc = LeNetEncoder(channels=channels, num_blocks=num_blocks)
  x = jnp.zeros((1, side, side, in_channels))
  assert param_count(enc, x) == _lenet_params(in_channels, channels,
                                              num_blocks)
  if (in_channels, channels, num_blocks) == (1, 6, 3):
    # MultiBench's image LeNet, by hand: 5*5*1*6 + 2*6 for the first layer,
    # then 3*3*6*12 + 2*12, 3*3*12*24 + 2*24 and 3*3*24*48 + 2*48.
    assert param_count(enc, x) == 13_938


def test_lenet_pools_like_torch():
  """2x2 pools drop an odd last row, as ``F.max_pool2d`` does."""
  _, out = _shapes(LeNetEncoder(channels=2, num_blocks=1),
                   jnp.zeros((B, 17, 16)))  # 17 -> 8 -> 4 rows.
  chex.assert_shape(out.tokens, (B, 4, 4, 4))
  chex.assert_shape(out.pooled, (B, 4))


def test_max_pool_2x2_matches_flax_max_pool():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 10, 3)))
  chex.assert_trees_all_equal(
      image.max_pool_2x2(x),
      nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"))


def test_lenet_shape_errors():
  enc = LeNetEncoder(channels=2, num_blocks=3)
  with pytest.raises(ValueError, match=r"LeNetEncoder.*num_blocks=3.*at least "
                     r"16.*\(2, 15, 28, 1\)"):
    init_module(enc, jnp.zeros((2, 15, 28, 1)))
  with pytest.raises(ValueError, match=r"LeNetEncoder.*\(2, 28\)"):
    init_module(enc, jnp.zeros((2, 28)))


# ResNet.


def test_resnet_projection_only_where_shape_changes():
  variables, out = _shapes(ResNetEncoder(stage_sizes=(2, 1), width=4, dim=0),
                           _images(8, 8))
  params = variables["params"]
  assert "proj" not in params["stage0_block0"]  # 4 -> 4 channels, stride 1.
  assert "proj" not in params["stage0_block1"]
  chex.assert_shape(params["stage1_block0"]["proj"]["kernel"], (1, 1, 4, 8))
  chex.assert_shape(out.tokens, (B, 4, 4, 8))
  # dim=0: pooled is the global average, with no Dense layer.
  assert "pool_dense" not in params
  chex.assert_shape(out.pooled, (B, 8))


def test_resnet20_param_count():
  """He et al.'s CIFAR ResNet-20 (stage_sizes (3, 3, 3), width 16)."""
  enc = ResNetEncoder(stage_sizes=(3, 3, 3), width=16, dim=0)
  count = param_count(enc, jnp.zeros((1, 32, 32, 3)))
  # Each 3x3 conv c_in -> c_out has 9 c_in c_out weights, each BatchNorm 2 c.
  stem = 9 * 3 * 16 + 2 * 16
  block = lambda c_in, c: 9 * c_in * c + 9 * c * c + 4 * c
  projection = lambda c_in, c: c_in * c + 2 * c
  stages = (3 * block(16, 16)
            + block(16, 32) + projection(16, 32) + 2 * block(32, 32)
            + block(32, 64) + projection(32, 64) + 2 * block(64, 64))
  assert count == stem + stages == 271_824
  # Less the projections (the paper's CIFAR nets use parameter-free
  # zero-padding shortcuts instead), this is the paper's "0.27M".
  assert count - projection(16, 32) - projection(32, 64) == 269_072


def test_resnet_shape_error():
  with pytest.raises(ValueError, match=r"ResNetEncoder.*\(4, 16, 16\)"):
    init_module(ResNetEncoder(), jnp.zeros((4, 16, 16)))


# ViT.


def test_vit_pools():
  """The CLS token and its position exist only with ``pool="cls"``."""
  x = _images()
  kwargs = dict(patch_size=8, dim=8, num_layers=1, num_heads=2, mlp_dim=16)
  for pool, num_tokens in [("cls", 4 + 1), ("mean", 4)]:
    variables, out = _shapes(ViTEncoder(pool=pool, **kwargs), x)
    params = variables["params"]
    assert ("cls" in params) == (pool == "cls")
    chex.assert_shape(params["PositionEmbedding_0"]["embedding"],
                      (num_tokens, 8))
    chex.assert_shape(out.tokens, (B, 4, 8))
    chex.assert_shape(out.pooled, (B, 8))


def test_vit_errors():
  with pytest.raises(ValueError, match=r"patch_size=5.*\(4, 16, 16, 3\)"):
    init_module(ViTEncoder(patch_size=5), jnp.zeros((4, 16, 16, 3)))
  with pytest.raises(ValueError, match=r"pool='max'; valid: cls, mean"):
    init_module(ViTEncoder(pool="max"), jnp.zeros((4, 16, 16, 3)))


# Text encoders.


def test_gru_pools_last_real_token_and_zero_when_empty():
  enc, _, _, _ = CASES["gru"]
  ids, mask = padded_question()
  variables = init_module(enc, ids, mask)
  assert "GRUCell_0" in variables["params"]
  encode = jax.jit(functools.partial(enc.apply, train=False))
  out = encode(variables, ids, mask)
  last = mask.sum(-1) - 1
  chex.assert_trees_all_close(out.pooled, out.tokens[jnp.arange(B), last],
                              atol=1e-6, rtol=1e-6)
  assert not np.any(np.asarray(out.tokens[~mask]))
  empty = encode(variables, ids, jnp.zeros_like(mask))
  assert not np.any(np.asarray(empty.pooled))


def test_dan_pooled_ignores_order():
  enc, _, _, _ = CASES["dan"]
  ids, _ = padded_question()
  variables = init_module(enc, ids)
  out = enc.apply(variables, ids, train=False)
  flipped = enc.apply(variables, ids[:, ::-1], train=False)
  chex.assert_trees_all_close(flipped.pooled, out.pooled, atol=1e-6)
  assert out.mask is None


def test_text_errors():
  ids = jnp.zeros((4, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"GRUEncoder.*\(4, 6, 1\)"):
    init_module(GRUEncoder(vocab_size=VOCAB), ids[..., None])
  with pytest.raises(ValueError, match=r"DANEncoder mask.*\(4, 5\).*\(4, 6\)"):
    init_module(DANEncoder(vocab_size=VOCAB), ids, jnp.ones((4, 5), bool))
  with pytest.raises(ValueError, match=r"6 tokens; max_len is 4"):
    init_module(TextTransformerEncoder(vocab_size=VOCAB, max_len=4), ids)


# Sequences and vectors.


def test_conv1d_frames_and_no_mask():
  x, _ = _waves(t=10, f=5)
  variables, out = _shapes(
      Conv1DEncoder(features=(4,), kernel_size=3, stride=3, dim=8), x)
  chex.assert_shape(variables["params"]["Conv_0"]["kernel"], (3, 5, 4))
  chex.assert_shape(out.tokens, (B, 4, 4))  # ceil(10 / 3) steps.
  assert out.mask is None


def test_conv1d_errors():
  enc = Conv1DEncoder()
  with pytest.raises(ValueError, match=r"Conv1DEncoder.*\(4, 2, 3, 1\)"):
    init_module(enc, jnp.zeros((4, 2, 3, 1)))
  with pytest.raises(ValueError, match=r"mask shape \(4, 9\).*\(4, 8\)"):
    init_module(enc, jnp.zeros((4, 8)), jnp.ones((4, 9), bool))


def test_mlp_dropout_only_in_training():
  enc = MLPEncoder(hidden=(16,), dim=8, dropout=0.5)
  x = jax.random.normal(rbg_key(53), (B, 6))
  variables = init_module(enc, x)
  train_out = _encode(enc, variables, x, train=True)
  eval_out = enc.apply(variables, x, train=False)
  assert not np.allclose(train_out.pooled, eval_out.pooled)
  with pytest.raises(ValueError, match=r"MLPEncoder.*\(4,\)"):
    init_module(enc, jnp.zeros((4,)))
