"""Tests for the encoders, fusion blocks and head."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmjax.encoders  # Registers the encoders.
import mmjax.fusion  # Registers the fusion blocks.
from mmjax.encoders import Encoding
from mmjax.encoders.image import ConvEncoder
from mmjax.encoders.text import LSTMEncoder
from mmjax.fusion.concat import ConcatFusion
from mmjax.fusion.film import FiLMFusion
from mmjax.heads import ClassifierHead
from mmjax.registry import ENCODERS, FUSIONS, HEADS

from helpers import (B, T, apply_module, assert_every_param_gets_grad,
                     assert_jit_agrees, image_encoding, init_module,
                     padded_question, param_count, pooled_encoding, rbg_key,
                     sequence_encoding)


def _images(h=16, w=16, c=3):
  return jax.random.normal(rbg_key(10), (B, h, w, c))


# Registries.


def test_registries_list_parts():
  assert {"cnn", "lstm"} <= set(ENCODERS.names())
  assert {"concat", "film", "tensor", "low_rank", "gated",
          "multiplicative"} <= set(FUSIONS.names())
  assert HEADS.names() == ["classifier"]
  assert ENCODERS.get("cnn") is ConvEncoder
  assert ENCODERS.get("lstm") is LSTMEncoder
  assert FUSIONS.get("concat") is ConcatFusion
  assert FUSIONS.get("film") is FiLMFusion
  assert HEADS.get("classifier") is ClassifierHead


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="'nope'.*concat, .*film"):
    FUSIONS.get("nope")


def test_config_dict_maps_onto_attributes():
  enc = ENCODERS.get("cnn")(**{"features": (32, 64), "dim": 128})
  assert (enc.features, enc.dim, enc.axis_name) == ((32, 64), 128, None)


def test_default_parameter_counts():
  """Exact counts at default settings: 32x32x3 images, 12-token questions."""
  images = jnp.zeros((2, 32, 32, 3))
  ids = jnp.zeros((2, 12), jnp.int32)
  # 3x3 convs 3->32, 32->64 without bias, BatchNorm scale and shift, Dense
  # of the flattened 8x8x64 map: 9*3*32 + 2*32 + 9*32*64 + 2*64
  # + (8*8*64 + 1)*128.
  assert param_count(ConvEncoder(), images) == 543_904
  # Embedding 64x64; LSTM, 4 gates of input kernel 64x128 and hidden kernel
  # 128x128 with bias: 64*64 + 4*(64*128 + 128*128 + 128).
  assert param_count(LSTMEncoder(vocab_size=64), ids) == 102_912
  encs = {"image": Encoding(pooled=jnp.zeros((2, 128)),
                            tokens=jnp.zeros((2, 8, 8, 64))),
          "question": Encoding(pooled=jnp.zeros((2, 128)))}
  assert param_count(ConcatFusion(), encs) == 0
  # channels 64, 2 blocks, dim 128, 2 coordinate channels, conditioning 128:
  # stem (64+2+1)*64 + 2 blocks * [(64+2+1)*64 + 9*64*64 + (128+1)*2*64]
  # + paper classifier (64+2)*128 + 2*128 (1x1 conv, BatchNorm).
  assert param_count(FiLMFusion(), encs) == 128_320
  # The same but the flatten output: (64+2+1)*64 + (8*8*64 + 1)*128.
  assert param_count(FiLMFusion(classifier="flatten"), encs) == 648_320
  # (128+1)*256 + (256+1)*10.
  assert param_count(ClassifierHead(num_classes=10),
                     jnp.zeros((2, 128))) == 35_594


# ConvEncoder.


def test_conv_encoder():
  enc = ConvEncoder(features=(8, 16), dim=32)
  x = _images()
  variables = init_module(enc, x)
  out = enc.apply(variables, x, train=False)
  chex.assert_shape(out.pooled, (B, 32))
  chex.assert_shape(out.tokens, (B, 4, 4, 16))
  assert out.mask is None
  assert_jit_agrees(enc, variables, x)
  assert_every_param_gets_grad(enc, variables, x)


def test_conv_encoder_shape_errors():
  enc = ConvEncoder(features=(8, 16))
  with pytest.raises(ValueError, match=r"ConvEncoder.*\(4, 16, 16\)"):
    init_module(enc, jnp.zeros((4, 16, 16)))
  with pytest.raises(ValueError, match=r"at least 4.*\(4, 3, 16, 3\)"):
    init_module(enc, jnp.zeros((4, 3, 16, 3)))


# LSTMEncoder.


def test_lstm_encoder():
  enc = LSTMEncoder(vocab_size=20, embed_dim=8, hidden=16)
  ids, mask = padded_question()
  variables = init_module(enc, ids, mask)
  out = enc.apply(variables, ids, mask, train=False)
  chex.assert_shape(out.pooled, (B, 16))
  chex.assert_shape(out.tokens, (B, T, 16))
  chex.assert_trees_all_equal(out.mask, mask)
  assert_jit_agrees(enc, variables, ids, mask)
  assert_every_param_gets_grad(enc, variables, ids, mask)


def test_lstm_ignores_padding():
  enc = LSTMEncoder(vocab_size=20, embed_dim=8, hidden=16)
  ids, mask = padded_question()
  other_ids = jnp.where(mask, ids, (ids + 7) % 20)
  assert np.any(np.asarray(other_ids != ids))
  variables = init_module(enc, ids, mask)
  out = enc.apply(variables, ids, mask, train=False)
  other = enc.apply(variables, other_ids, mask, train=False)
  chex.assert_trees_all_close(other, out, atol=1e-6, rtol=1e-6)

  # pooled is the output at each sequence's last real token ...
  last = mask.sum(-1) - 1
  chex.assert_trees_all_close(out.pooled, out.tokens[jnp.arange(B), last],
                              atol=1e-6, rtol=1e-6)
  assert not np.any(np.asarray(out.tokens[~mask]))
  # ... which differs from reading the padded sequence to its end.
  unmasked = enc.apply(variables, ids, None, train=False)
  assert not np.allclose(unmasked.pooled[1:], out.pooled[1:])


def test_lstm_empty_sequence_pools_to_zero():
  enc = LSTMEncoder(vocab_size=20, embed_dim=8, hidden=16)
  ids, _ = padded_question()
  mask = jnp.zeros_like(ids, bool)
  out = enc.apply(init_module(enc, ids, mask), ids, mask, train=False)
  assert not np.any(np.asarray(out.pooled))


def test_lstm_shape_errors():
  enc = LSTMEncoder(vocab_size=20)
  with pytest.raises(ValueError, match=r"LSTMEncoder.*\(4, 6, 1\)"):
    init_module(enc, jnp.zeros((4, 6, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
    init_module(enc, jnp.zeros((4, 6), jnp.int32), jnp.ones((4, 5), bool))


# ConcatFusion.


@pytest.mark.parametrize("num_modalities", [1, 2, 3])
def test_concat_fusion(num_modalities):
  encs = {f"m{i}": pooled_encoding(i, 5 + i) for i in range(num_modalities)}
  total = sum(5 + i for i in range(num_modalities))
  no_mlp = ConcatFusion()
  out = no_mlp.apply(init_module(no_mlp, encs), encs, train=False)
  chex.assert_shape(out, (B, total))
  fusion = ConcatFusion(hidden=(16, 8))
  variables = init_module(fusion, encs)
  chex.assert_shape(fusion.apply(variables, encs, train=False), (B, 8))
  assert_jit_agrees(fusion, variables, encs)
  assert_every_param_gets_grad(fusion, variables, encs)


def test_concat_shape_errors():
  fusion = ConcatFusion()
  encs = {"image": pooled_encoding(0, 5),
          "question": Encoding(pooled=jnp.zeros((B, 3, 2)))}
  with pytest.raises(ValueError, match=r"'question'.*\(4, 3, 2\)"):
    init_module(fusion, encs)
  encs = {"image": pooled_encoding(0, 5),
          "question": Encoding(pooled=jnp.zeros((2, 3)))}
  with pytest.raises(ValueError, match=r"batch size.*'question': \(2, 3\)"):
    init_module(fusion, encs)


# FiLMFusion.

FILM_CASES = {
    "image+question": ("image", lambda: {
        "image": image_encoding(), "question": pooled_encoding(0, 10)}),
    "image+question+audio": ("image", lambda: {
        "audio": pooled_encoding(1, 6), "image": image_encoding(),
        "question": pooled_encoding(0, 10)}),
    "sequence_target": ("question", lambda: {
        "image": pooled_encoding(2, 12), "question": sequence_encoding()}),
}


@pytest.mark.parametrize("classifier", ["paper", "flatten"])
@pytest.mark.parametrize("case", FILM_CASES)
def test_film_fusion(case, classifier):
  target, make_encs = FILM_CASES[case]
  encs = make_encs()
  fusion = FiLMFusion(target=target, num_blocks=2, channels=8, dim=16,
                      classifier=classifier)
  variables = init_module(fusion, encs)
  chex.assert_shape(fusion.apply(variables, encs, train=False), (B, 16))
  assert ("batch_stats" in variables) == (target == "image")
  assert_jit_agrees(fusion, variables, encs)
  assert_every_param_gets_grad(fusion, variables, encs)


def test_unknown_film_classifier():
  with pytest.raises(ValueError, match="'mlp'.*Valid: paper, flatten"):
    init_module(FiLMFusion(classifier="mlp"), FILM_CASES["image+question"][1]())


def test_film_coords_are_optional():
  encs = FILM_CASES["image+question"][1]()
  with_coords = FiLMFusion(channels=8, dim=16)
  without = FiLMFusion(channels=8, dim=16, use_coords=False)
  kernel = lambda m: init_module(m, encs)["params"]["stem"]["kernel"]
  chex.assert_shape(kernel(with_coords), (1, 1, 8 + 2, 8))
  chex.assert_shape(kernel(without), (1, 1, 8, 8))


def test_film_sequence_target_ignores_padding():
  encs = FILM_CASES["sequence_target"][1]()
  seq = encs["question"]
  noisy = seq.replace(tokens=jnp.where(
      seq.mask[..., None], seq.tokens, 3. + seq.tokens**2))
  assert not np.allclose(noisy.tokens, seq.tokens)
  for classifier in ("paper", "flatten"):
    fusion = FiLMFusion(target="question", channels=8, dim=16,
                        classifier=classifier)
    variables = init_module(fusion, encs)
    out = fusion.apply(variables, encs, train=False)
    other = fusion.apply(variables, {**encs, "question": noisy}, train=False)
    chex.assert_trees_all_close(other, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("encs, message", [
    ({"question": pooled_encoding(0, 10)},
     r"target modality 'image' is missing; present modalities: \['question'\]"),
    ({"image": image_encoding()},
     r"FiLM needs a conditioning modality.*'concat' for unimodal"),
    ({"image": Encoding(pooled=jnp.zeros((B, 10)), tokens=jnp.zeros((8, 10))),
      "question": pooled_encoding(0, 10)},
     r"'image' needs tokens of shape \[batch, height, width, channels\]"
     r".*got \(8, 10\)"),
    ({"image": pooled_encoding(1, 10), "question": pooled_encoding(0, 10)},
     r"'image' needs tokens.*gave none"),
    ({"image": image_encoding(), "question": Encoding(pooled=jnp.zeros((B,)))},
     r"'question' needs pooled of shape \[batch, dim\]; got \(4,\)"),
    ({"image": image_encoding(),
      "question": Encoding(pooled=jnp.zeros((2, 3)))},
     r"'image' has tokens \(4, 4, 4, 8\).*batch size 2"),
])
def test_film_shape_errors(encs, message):
  with pytest.raises(ValueError, match=message):
    init_module(FiLMFusion(), encs)


def test_film_sequence_mask_shape_error():
  encs = FILM_CASES["sequence_target"][1]()
  bad = encs["question"].replace(mask=jnp.ones((B, T + 1), bool))
  with pytest.raises(ValueError, match=r"'question'.*\(4, 6, 8\).*\(4, 7\)"):
    init_module(FiLMFusion(target="question"), {**encs, "question": bad})


# ClassifierHead.


def test_classifier_head():
  head = ClassifierHead(num_classes=7, hidden=(16, 8), dropout=0.5)
  x = jax.random.normal(rbg_key(40), (B, 12))
  variables = init_module(head, x)
  chex.assert_shape(head.apply(variables, x, train=False), (B, 7))
  train_out, _ = apply_module(head, variables, x, train=True)
  assert not np.allclose(train_out, head.apply(variables, x, train=False))
  assert_jit_agrees(head, variables, x)
  assert_every_param_gets_grad(head, variables, x)


def test_classifier_head_shape_error():
  with pytest.raises(ValueError, match=r"ClassifierHead.*\(4, 3, 2\)"):
    init_module(ClassifierHead(num_classes=3), jnp.zeros((4, 3, 2)))
