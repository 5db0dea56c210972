"""Every encoder and fusion block: 4 data-parallel devices agree with one.

Each case runs one training-mode forward and backward pass on a global batch
of 8, once on a single device and once split over the 4 simulated devices by
``mmjax.parallel.DataParallel``. Outputs, parameter gradients (summed over
devices) and updated BatchNorm statistics must match: this is what catches a
block that normalises or pools over the local batch only.

The cases come from each block's test file (``PARALLEL_CASES``), plus the
blocks defined below. Every block runs under ``pmap``; under ``shard_map``
(the same per-device code, mapped differently) the blocks that communicate
across devices (BatchNorm over ``axis_name``) and one of each other kind
run, which keeps the suite's time in budget.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mmjax import parallel
from mmjax.encoders import Encoding
from mmjax.encoders.image import ConvEncoder
from mmjax.encoders.text import LSTMEncoder
from mmjax.fusion.concat import ConcatFusion
from mmjax.fusion.film import FiLMFusion
from mmjax.fusion.gated import GatedFusion
from mmjax.fusion.multiplicative import MultiplicativeFusion
from mmjax.fusion.tensor import LowRankFusion, TensorFusion
import test_encoder_zoo
import test_fusion_attention
import test_fusion_bilinear

B = 8  # Global batch: 2 examples on each of 4 devices.


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
for _module in (test_encoder_zoo, test_fusion_bilinear, test_fusion_attention):
  for _name, _case in _module.PARALLEL_CASES.items():
    assert _name not in CASES, f"duplicate parallel case {_name}"
    CASES[_name] = _case


def _without_dropout(module):
  return module.clone(dropout=0.0) if hasattr(module, "dropout") else module


def _block_step(variables, inputs, *, make_module, axis_name):
  """One training-mode pass -> (outputs, gradients, new batch stats).

  Outputs are gathered and gradients summed over ``axis_name``, so every
  device returns the global result.
  """
  module = _without_dropout(make_module(axis_name))
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    out, new_state = module.apply({"params": params, **rest}, *inputs,
                                  train=True, mutable=["batch_stats"])
    leaves = [x for x in jax.tree.leaves(out)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    # A fixed projection of each output, the same for every example.
    total = sum(jnp.sum(x * _rng(10 + i).normal(size=x.shape[1:]))
                for i, x in enumerate(leaves))
    return total, (out, new_state)

  grads, (out, new_state) = jax.grad(loss, has_aux=True)(variables["params"])
  if axis_name is not None:
    grads = lax.psum(grads, axis_name)
    out = jax.tree.map(lambda x: lax.all_gather(x, axis_name, tiled=True), out)
  return out, grads, new_state


def _run(name, backend):
  make_module, make_inputs = CASES[name]
  inputs = make_inputs()
  variables = make_module(None).init(
      {"params": jax.random.key(0, impl="rbg")}, *inputs, train=False)
  if backend is None:
    return jax.jit(lambda v, x: _block_step(
        v, x, make_module=make_module, axis_name=None))(variables, inputs)
  dp = parallel.DataParallel(backend)
  step = dp.train_step(lambda v, x, axis_name: (v, _block_step(
      v, x, make_module=make_module, axis_name=axis_name)))
  _, result = step(dp.replicate(variables), dp.shard_batch(inputs))
  return result


# Blocks with cross-device BatchNorm, plus an RNN, a pooled fusion and a
# token-attention fusion.
SHARD_MAP_CASES = ("cnn", "lenet", "resnet", "conv1d", "film", "lstm",
                   "tensor", "mult")
PARAMS = ([(name, "pmap") for name in sorted(CASES)] +
          [(name, "shard_map") for name in SHARD_MAP_CASES])


@pytest.mark.parametrize("name,backend", PARAMS)
def test_four_devices_agree_with_one(name, backend):
  assert jax.device_count() == 4, "conftest sets 4 simulated CPU devices"
  expected = _run(name, None)
  got = _run(name, backend)
  chex.assert_trees_all_close(got, expected, atol=2e-5, rtol=2e-4)
  # Not vacuous: the block has gradients, and they are not all zero.
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(expected[1]))
