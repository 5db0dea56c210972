"""Attention fusion blocks: MulT, the multimodal transformer and MBT.

Their data-parallel cases (4 devices agree with one) are in
``block_cases.py``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax.fusion  # Registers the fusion blocks.
from mmjax.encoders import Encoding
from mmjax.fusion.attention import BottleneckFusion
from mmjax.fusion.attention import MultimodalTransformerFusion
from mmjax.fusion.crossmodal import MulTFusion
from mmjax.registry import FUSIONS

from helpers import (TEXT_LENGTHS, assert_every_param_gets_grad,
                     attention_encodings, init_module, param_count)

B = 4
D = 8  # dim of every tiny block.
TINY = dict(dim=D, num_heads=2, mlp_dim=16, max_len=8)

# Compiling a transformer takes seconds on CPU, so the tests share few, small
# blocks and compile each function once (``_jit_apply``).
BLOCKS = {
    "mult": MulTFusion(num_layers=1, self_layers=1, **TINY),
    "mult_no_self": MulTFusion(num_layers=1, self_layers=0, **TINY),
    "mm_early": MultimodalTransformerFusion(num_layers=1, fusion_layer=0,
                                            **TINY),
    "mm_mid": MultimodalTransformerFusion(num_layers=2, fusion_layer=1, **TINY),
    "mm_late": MultimodalTransformerFusion(num_layers=1, fusion_layer=1,
                                           **TINY),
    "mbt": BottleneckFusion(num_layers=2, fusion_layer=0, n_bottlenecks=2,
                            **TINY),
    "mbt_towers": BottleneckFusion(num_layers=3, fusion_layer=1,
                                   n_bottlenecks=2, **TINY),
}


def _variables(module, encs, seed=0):
  """Random variables of the module's shapes, from tracing its init only."""
  shapes = jax.eval_shape(functools.partial(init_module, module), encs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.normal(scale=0.5, size=x.shape), x.dtype),
      shapes)


@functools.cache
def _jit_apply(block):
  return jax.jit(functools.partial(BLOCKS[block].apply, train=False))


def _with_tokens(encs, name, tokens, **changes):
  return {**encs, name: encs[name].replace(tokens=tokens, **changes)}


def _change_text(encs):
  """Adds 1 to every real text token."""
  text = encs["text"]
  return _with_tokens(encs, "text", text.tokens + text.mask[..., None])


@pytest.mark.parametrize("num", [2, 3])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_shapes(block, num):
  """Traced only; the tests below compute values."""
  encs = attention_encodings(num)
  module = BLOCKS[block]
  out = jax.eval_shape(functools.partial(module.apply, train=False),
                       _variables(module, encs), encs)
  chex.assert_shape(out, (B, D))


def test_registry():
  assert FUSIONS.get("mult") is MulTFusion
  assert FUSIONS.get("mm_transformer") is MultimodalTransformerFusion
  assert FUSIONS.get("mbt") is BottleneckFusion


@pytest.mark.parametrize("block", ["mult", "mm_mid", "mbt"])
def test_jit_agrees_with_eager(block):
  """In eval mode only (helpers.assert_jit_agrees also compiles training
  mode, the same graph at dropout 0). The encodings come in reverse order:
  jit sorts a dict's keys, so this also catches a block whose result depends
  on the order of the dict."""
  encs = attention_encodings()
  variables = _variables(BLOCKS[block], encs)
  eager = BLOCKS[block].apply(variables, dict(reversed(encs.items())),
                              train=False)
  chex.assert_trees_all_close(_jit_apply(block)(variables, encs), eager,
                              atol=1e-5, rtol=1e-5)


# mm_transformer builds its layers as mbt does (TokenFusion.layer).
@pytest.mark.parametrize("block", ["mult", "mbt"])
def test_dropout_only_in_training(block):
  encs = attention_encodings()
  variables = _variables(BLOCKS[block], encs)
  dropped = BLOCKS[block].clone(dropout=0.5)
  rngs = {"dropout": jax.random.key(0, impl="rbg")}
  chex.assert_trees_all_close(
      dropped.apply(variables, encs, train=False, rngs=rngs),
      _jit_apply(block)(variables, encs), atol=1e-5, rtol=1e-5)
  assert not np.allclose(dropped.apply(variables, encs, train=True, rngs=rngs),
                         _jit_apply(block)(variables, encs))


# Between them, every kind of parameter: MulT's pairs and per-target layers,
# the joint CLS (early), towers with their CLS tokens and shared layers (mid),
# MBT's bottleneck layers and the late-fusion output.
@pytest.mark.parametrize("block,num", [("mult", 2), ("mm_early", 3),
                                       ("mm_mid", 3), ("mbt", 3)])
def test_every_parameter_gets_a_gradient(block, num):
  encs = attention_encodings(num)
  assert_every_param_gets_grad(BLOCKS[block], _variables(BLOCKS[block], encs),
                               encs)


@pytest.mark.parametrize("block", ["mult", "mm_early", "mm_mid", "mbt"])
def test_padding_is_ignored(block):
  """Values at padded positions do not matter, and a padded example gives
  what its unpadded sequence gives alone (this one catches missing masks)."""
  encs = attention_encodings()
  variables = _variables(BLOCKS[block], encs)
  apply = _jit_apply(block)
  out = apply(variables, encs)
  chex.assert_tree_all_finite(out)  # Example 3 has no real text token.

  text = encs["text"]
  noise = 100. * np.random.default_rng(7).normal(size=text.tokens.shape)
  noisy = _with_tokens(encs, "text", np.where(text.mask[..., None],
                                              text.tokens, noise))
  chex.assert_trees_all_close(apply(variables, noisy), out, atol=1e-5)

  i, length = 1, TEXT_LENGTHS[1]
  alone = {"image": encs["image"].replace(pooled=encs["image"].pooled[i:i + 1],
                                          tokens=encs["image"].tokens[i:i + 1]),
           "text": Encoding(pooled=text.pooled[i:i + 1],
                            tokens=text.tokens[i:i + 1, :length])}
  chex.assert_trees_all_close(apply(variables, alone)[0], out[i], atol=1e-5)


def test_mm_transformer_early_and_late_fusion_have_their_own_layers():
  """The parameter layout of each; that early fusion mixes the modalities
  and late fusion does not is tested on outputs in test_models.py."""
  encs = attention_encodings()
  early = MultimodalTransformerFusion(num_layers=2, fusion_layer=0, **TINY)
  late = early.clone(fusion_layer=2)
  p_early = _variables(early, encs)["params"]
  p_late = _variables(late, encs)["params"]
  assert set(p_early) == {"embed", "cls", "layer_0", "layer_1", "ln_out"}
  assert set(p_late) == {"embed", "image_layer_0", "image_layer_1",
                         "text_layer_0", "text_layer_1", "ln_out_image",
                         "ln_out_text", "out"}
  assert "cls_image" in p_late["embed"] and "cls_image" not in p_early["embed"]


def test_mbt_without_fusion_layers_is_late_mm_transformer():
  encs = attention_encodings()
  mbt = BottleneckFusion(num_layers=1, fusion_layer=1, n_bottlenecks=2, **TINY)
  variables = _variables(BLOCKS["mm_late"], encs)
  chex.assert_trees_all_equal_structs(variables, _variables(mbt, encs))
  chex.assert_trees_all_close(mbt.apply(variables, encs, train=False),
                              _jit_apply("mm_late")(variables, encs),
                              atol=1e-5, rtol=1e-5)


def _intermediates(module, variables, encs):
  """Every submodule's output: ``{name: {"__call__": (output,)}}``."""
  _, state = module.apply(variables, encs, train=False,
                          capture_intermediates=True, mutable=["intermediates"])
  return state["intermediates"]


@pytest.mark.parametrize("num_layers,fusion_layer,fuses",
                         [(2, 0, True), (3, 1, True), (2, 2, False)])
def test_mbt_fuses_only_through_the_bottleneck(num_layers, fusion_layer,
                                               fuses):
  """The text reaches the image's CLS iff two layers pass the bottleneck on,
  and never in the layer where it first enters the bottleneck: image tokens
  do not attend to text tokens."""
  module = BottleneckFusion(num_layers=num_layers, fusion_layer=fusion_layer,
                            n_bottlenecks=2, **TINY)
  encs = attention_encodings()
  variables = _variables(module, encs)
  before = _intermediates(module, variables, encs)
  after = _intermediates(module, variables, _change_text(encs))

  def changed(name):
    (x,), (y,) = before[name]["__call__"], after[name]["__call__"]
    return not np.allclose(x, y, atol=1e-5)

  assert changed("ln_out_text")  # The text's final CLS.
  assert changed("ln_out_image") == fuses
  if fuses:  # The output includes the image's copy of the bottleneck.
    assert not changed(f"image_layer_{fusion_layer}")
    assert changed(f"image_layer_{fusion_layer + 1}")


def test_mbt_refuses_a_single_fusion_layer():
  module = BLOCKS["mbt"].clone(num_layers=2, fusion_layer=1)
  with pytest.raises(ValueError, match="single bottleneck layer.*<= 0"):
    _variables(module, attention_encodings())


def test_mm_transformer_tokens_meet_in_the_first_shared_layer():
  """Contrast with MBT: the shared layers mix modalities directly."""
  module = BLOCKS["mm_mid"]
  encs = attention_encodings()
  variables = _variables(module, encs)
  before = _intermediates(module, variables, encs)
  after = _intermediates(module, variables, _change_text(encs))
  (x,), (y,) = (before["image_layer_0"]["__call__"],
                after["image_layer_0"]["__call__"])
  np.testing.assert_allclose(x, y, atol=1e-6)
  (x,), (y,) = before["layer_1"]["__call__"], after["layer_1"]["__call__"]
  n_image = 1 + 6  # The joint CLS and the image's 2 x 3 tokens come first.
  assert not np.allclose(x[:, :n_image], y[:, :n_image], atol=1e-5)


@pytest.mark.parametrize("block", ["mult", "mm_early", "mbt"])
def test_missing_tokens_name_the_modality(block):
  encs = attention_encodings()
  encs["text"] = Encoding(pooled=encs["text"].pooled)
  with pytest.raises(ValueError, match=r"modality 'text' gave none.*tokens"):
    _variables(BLOCKS[block], encs)


@pytest.mark.parametrize("block", ["mult", "mm_early", "mbt"])
def test_config_errors(block):
  encs = attention_encodings()
  module = BLOCKS[block]
  with pytest.raises(ValueError, match="num_heads=3 does not divide dim=8"):
    _variables(module.clone(num_heads=3), encs)
  with pytest.raises(ValueError, match="at least two modalities"):
    _variables(module, {"image": encs["image"]})
  with pytest.raises(ValueError, match=r"'text'.*\(4, 5, 7\).*\(4, 4\)"):
    _variables(module, _with_tokens(encs, "text", encs["text"].tokens,
                                    mask=np.ones((4, 4), bool)))
  if block != "mult":
    with pytest.raises(ValueError, match="fusion_layer <= num_layers=2"):
      _variables(module.clone(num_layers=2, fusion_layer=3), encs)


def test_parameter_counts_at_mm_shapes_sizes():
  """Exact counts for experiments/mm_shapes.py: cnn tokens [8, 8, 64], lstm
  tokens [16, 128]; dim 64, mlp_dim 128, max_len 256."""
  encs = {"image": Encoding(pooled=jnp.zeros((2, 64)),
                            tokens=jnp.zeros((2, 8, 8, 64))),
          "question": Encoding(pooled=jnp.zeros((2, 128)),
                               tokens=jnp.zeros((2, 16, 128)),
                               mask=jnp.ones((2, 16), bool))}
  d, mlp = 64, 128
  ln = 2 * d
  layer = (ln + 4 * (d * d + d)  # Pre-attention LayerNorm, q, k, v, out.
           + ln + (d * mlp + mlp) + (mlp * d + d))  # LayerNorm, MLP.
  proj_and_pos = (64 + 128) * d + 2 * 256 * d
  late = proj_and_pos + 2 * d + 2 * d + 4 * layer + 2 * ln + 2 * d * d + d
  counts = {
      # Per pair: 2 cross layers (+ context LayerNorm) and a LayerNorm; per
      # target: one self layer of width (M - 1) * d = d and its LayerNorm.
      "mult": proj_and_pos + 2 * (2 * (layer + ln) + ln) + 2 * (layer + ln)
              + 2 * d * d + d,
      # Modality embeddings, one CLS, 2 shared layers, final LayerNorm.
      "mm_transformer": proj_and_pos + 2 * d + d + 2 * layer + ln,
      # + a CLS per modality, 2 layers per modality, 2 LayerNorms, Dense.
      "mm_transformer_late": late,
      "mbt": late + 4 * d,  # + the bottleneck tokens.
  }
  modules = {
      "mult": MulTFusion(dim=64, num_layers=2, self_layers=1, num_heads=4,
                         mlp_dim=128),
      "mm_transformer": MultimodalTransformerFusion(
          dim=64, num_layers=2, fusion_layer=0, num_heads=4, mlp_dim=128),
      "mm_transformer_late": MultimodalTransformerFusion(
          dim=64, num_layers=2, fusion_layer=2, num_heads=4, mlp_dim=128),
      "mbt": BottleneckFusion(dim=64, num_layers=2, fusion_layer=0,
                              n_bottlenecks=4, num_heads=4, mlp_dim=128),
  }
  assert {k: param_count(m, encs) for k, m in modules.items()} == counts
  assert counts == {"mult": 255_168, "mm_transformer": 112_320,
                    "mm_transformer_late": 187_712, "mbt": 187_968}
