"""Every encoder and fusion block: 4 data-parallel devices agree with one.

Each case runs one training-mode forward and backward pass on a global batch
of 8, once on a single device and once split over the 4 simulated devices by
``mmjax.parallel.DataParallel``. Outputs, parameter gradients (summed over
devices) and updated BatchNorm statistics must match: this is what catches a
block that normalises or pools over the local batch only.

The cases are ``block_cases.CASES``, small versions of the blocks of each
block's own test file. Every block runs under ``pmap``; under ``shard_map``
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

from block_cases import CASES


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
    total = sum(jnp.sum(x * np.random.default_rng(10 + i).normal(
        size=x.shape[1:])) for i, x in enumerate(leaves))
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
