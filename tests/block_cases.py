"""A small case of every registered encoder and fusion block, for the tests
that run them all: ``test_block_parallel.py`` (4 data-parallel devices agree
with one), ``test_mixed_precision.py`` (bfloat16) and
``test_modality_order.py`` (the order of a fusion block's encodings).

``CASES`` maps a block's registered name to ``(make_module(axis_name),
make_inputs())``: ``make_module`` builds the block (with BatchNorm over
``axis_name`` where it has any) and ``make_inputs`` returns the tuple of its
call's positional inputs, numpy arrays of a global batch of ``B``. The blocks
are small versions of those in each block's own test file.
"""

from __future__ import annotations

import numpy as np

from mmjax.encoders import Encoding
from mmjax.encoders.image import ConvEncoder
from mmjax.encoders.image import LeNetEncoder
from mmjax.encoders.resnet import ResNetEncoder
from mmjax.encoders.sequence import Conv1DEncoder, MLPEncoder
from mmjax.encoders.text import (DANEncoder, GRUEncoder, LSTMEncoder,
                                 TextTransformerEncoder)
from mmjax.encoders.vit import ViTEncoder
from mmjax.fusion.attention import BottleneckFusion
from mmjax.fusion.attention import MultimodalTransformerFusion
from mmjax.fusion.bilinear import MFBFusion, MutanFusion
from mmjax.fusion.concat import ConcatFusion
from mmjax.fusion.crossmodal import MulTFusion
from mmjax.fusion.decision import DecisionFusion
from mmjax.fusion.film import FiLMFusion
from mmjax.fusion.gated import GatedFusion, NonLocalGatedFusion
from mmjax.fusion.multiplicative import MultiplicativeFusion
from mmjax.fusion.tensor import LowRankFusion, TensorFusion

from helpers import attention_encodings

B = 8  # Global batch: 2 examples on each of 4 devices.


# The blocks of test_blocks.py and test_fusion_zoo.py.


def _rng(i):
  return np.random.default_rng(i)


def _images():
  return (_rng(0).normal(size=(B, 16, 16, 3)).astype(np.float32),)


def _tokens():
  mask = np.arange(6)[None] < _rng(1).integers(1, 7, B)[:, None]
  return (_rng(2).integers(1, 20, (B, 6)) * mask).astype(np.int32), mask


def _pooled(num):
  return ({f"m{i}": Encoding(pooled=_rng(3 + i).normal(size=(B, 4 + i)).astype(
      np.float32)) for i in range(num)},)


def _film_inputs():
  _, mask = _tokens()
  return ({"image": Encoding(pooled=_rng(5).normal(size=(B, 4)).astype(np.float32),
                             tokens=_rng(6).normal(size=(B, 4, 4, 8)).astype(np.float32)),
           "question": Encoding(pooled=_rng(7).normal(size=(B, 10)).astype(np.float32),
                                tokens=_rng(8).normal(size=(B, 6, 8)).astype(np.float32),
                                mask=mask)},)


CASES = {
    "cnn": (lambda axis: ConvEncoder(features=(4, 8), dim=8, axis_name=axis),
            _images),
    "lstm": (lambda axis: LSTMEncoder(vocab_size=20, embed_dim=4, hidden=8),
             _tokens),
    "concat": (lambda axis: ConcatFusion(hidden=(8,)), lambda: _pooled(3)),
    "film": (lambda axis: FiLMFusion(target="image", num_blocks=1, channels=8,
                                     dim=8, axis_name=axis), _film_inputs),
    "tensor": (lambda axis: TensorFusion(dim=8, project=3), lambda: _pooled(3)),
    "low_rank": (lambda axis: LowRankFusion(rank=2, dim=8), lambda: _pooled(3)),
    "gated": (lambda axis: GatedFusion(dim=8), lambda: _pooled(3)),
    "multiplicative": (lambda axis: MultiplicativeFusion(form="matrix", dim=8),
                       lambda: _pooled(2)),
}


# The encoder zoo (test_encoder_zoo.py). The BatchNorm conv stacks get small
# images: their first-layer gradients sum over every pixel and reach ~50, so
# float32 round-off in a near-cancelling entry can exceed
# test_block_parallel.py's absolute tolerance (LeNet at 28x28 did: 3.4e-5 on
# an entry of 0.019 among entries of ~25). These sizes keep the worst element
# under ~0.3 of the tolerance.

_VOCAB = 20


def _np_images(h=16, w=16, c=3):
  return (np.random.default_rng(60).normal(size=(B, h, w, c))
          .astype(np.float32), None)


def _np_tokens():
  rng = np.random.default_rng(61)
  mask = np.arange(6)[None] < rng.integers(1, 7, B)[:, None]
  return (rng.integers(1, _VOCAB, (B, 6)) * mask).astype(np.int32), mask


def _np_waves():
  rng = np.random.default_rng(62)
  mask = np.arange(16)[None] < rng.integers(1, 17, B)[:, None]
  return rng.normal(size=(B, 16)).astype(np.float32), mask


_ENCODER_ZOO_CASES = {
    "lenet": (lambda axis: LeNetEncoder(channels=2, num_blocks=2,
                                        axis_name=axis),
              lambda: _np_images(16, 16, 1)),
    "resnet": (lambda axis: ResNetEncoder(stage_sizes=(1, 1), width=4, dim=8,
                                          axis_name=axis),
               lambda: _np_images(8, 8)),
    "vit": (lambda axis: ViTEncoder(patch_size=8, dim=8, num_layers=1,
                                    num_heads=2, mlp_dim=16), _np_images),
    "gru": (lambda axis: GRUEncoder(vocab_size=_VOCAB, embed_dim=4, hidden=8),
            _np_tokens),
    "dan": (lambda axis: DANEncoder(vocab_size=_VOCAB, embed_dim=4,
                                    hidden=(8,), dim=8), _np_tokens),
    "text_transformer": (
        lambda axis: TextTransformerEncoder(vocab_size=_VOCAB, dim=8,
                                            num_layers=1, num_heads=2,
                                            mlp_dim=16, max_len=8),
        _np_tokens),
    "conv1d": (lambda axis: Conv1DEncoder(features=(4, 8), kernel_size=3,
                                          dim=8, axis_name=axis), _np_waves),
    "mlp": (lambda axis: MLPEncoder(hidden=(8,), dim=8),
            lambda: (np.random.default_rng(63).normal(size=(B, 6))
                     .astype(np.float32), None)),
}


# MFB, MUTAN, non-local gated and decision fusion (test_fusion_bilinear.py).


def _bilinear_inputs():
  rng = np.random.default_rng(7)
  normal = lambda *s: rng.normal(size=(8, *s)).astype(np.float32)
  mask = np.arange(5)[None] < np.array([5, 2, 1, 0, 3, 4, 5, 1])[:, None]
  return ({"image": Encoding(pooled=normal(6), tokens=normal(2, 2, 3)),
           "question": Encoding(pooled=normal(5),
                                tokens=normal(5, 4) * mask[..., None],
                                mask=mask),
           "audio": Encoding(pooled=normal(3))},)


_BILINEAR_CASES = {
    "mfb": (lambda axis: MFBFusion(dim=4, factor=2), _bilinear_inputs),
    "mutan": (lambda axis: MutanFusion(dim=4, hidden=3, rank=2),
              _bilinear_inputs),
    "nonlocal_gated": (lambda axis: NonLocalGatedFusion(dim=4),
                       _bilinear_inputs),
    "decision": (lambda axis: DecisionFusion(dim=4), _bilinear_inputs),
}


# Attention fusion blocks (test_fusion_attention.py): its blocks
# "mult_no_self", "mm_early" and "mbt".

_TINY_ATTENTION = dict(dim=8, num_heads=2, mlp_dim=16, max_len=8)


def _attention_inputs():
  return (attention_encodings(batch=B, seed=3,
                              text_lengths=(5, 2, 1, 0, 3, 4, 5, 1)),)


_ATTENTION_CASES = {
    "mult": (lambda axis: MulTFusion(num_layers=1, self_layers=0,
                                     **_TINY_ATTENTION), _attention_inputs),
    "mm_transformer": (
        lambda axis: MultimodalTransformerFusion(num_layers=1, fusion_layer=0,
                                                 **_TINY_ATTENTION),
        _attention_inputs),
    "mbt": (lambda axis: BottleneckFusion(num_layers=2, fusion_layer=0,
                                          n_bottlenecks=2, **_TINY_ATTENTION),
            _attention_inputs),
}

for _cases in (_ENCODER_ZOO_CASES, _BILINEAR_CASES, _ATTENTION_CASES):
  for _name, _case in _cases.items():
    assert _name not in CASES, f"duplicate block case {_name}"
    CASES[_name] = _case
