"""The fused LeNet block against the layers it replaces.

Reference: ``lax.conv_general_dilated`` (SAME, no bias), flax's
``nn.BatchNorm`` in training mode, ReLU and ``image.max_pool_2x2``. Values,
batch statistics and gradients (input, kernel, scale, bias) must agree, in
the usual and the planar layout, on one device and with the statistics
averaged over 4 devices.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mmjax.encoders import fused_conv, image

from helpers import FUSED_CONV_CASES, fused_conv_inputs, fused_conv_loss

ATOL = 2e-5


def _lax_conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _reference_block(x, kernel, scale, bias, axis_name=None):
  """The unfused layers, with flax's BatchNorm: ``(out, mean, var)``."""
  y = _lax_conv(x, kernel)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.0,
                    axis_name=axis_name)
  features = kernel.shape[-1]
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": jnp.zeros(features),
                               "var": jnp.ones(features)}}
  normed, updates = bn.apply(variables, y, mutable=["batch_stats"])
  stats = updates["batch_stats"]  # momentum 0: the batch statistics.
  return image.max_pool_2x2(nn.relu(normed)), stats["mean"], stats["var"]


def _planar_block(x, kernel, scale, bias, axis_name=None):
  """``conv_bn_relu_pool`` in the planar layout, on and to NHWC maps."""
  out, mean, var = fused_conv.conv_bn_relu_pool(
      fused_conv.to_planar(x), kernel, scale, bias, axis_name, True)
  return fused_conv.from_planar(out), mean, var


BLOCKS = {"usual": fused_conv.conv_bn_relu_pool, "planar": _planar_block}


def _assert_trees_close(actual, expected, atol=ATOL, rtol=1e-4):
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=atol,
                                 rtol=rtol), actual, expected)


@pytest.mark.parametrize("planar", [False, True])
@pytest.mark.parametrize("in_channels,size", [(1, 5), (1, 3), (3, 3), (2, 4)])
def test_conv_same_matches_lax(in_channels, size, planar):
  x, kernel, _, _ = fused_conv_inputs((2, 9, 10), in_channels, 4, size)
  if planar:
    out = fused_conv.from_planar(fused_conv.conv_same(
        fused_conv.to_planar(x), kernel, planar=True))
  else:
    out = fused_conv.conv_same(x, kernel)
  np.testing.assert_allclose(out, _lax_conv(x, kernel), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", BLOCKS)
@pytest.mark.parametrize("shape,in_channels,out_channels,size",
                         FUSED_CONV_CASES)
def test_block_matches_unfused_layers(shape, in_channels, out_channels, size,
                                      layout):
  block = BLOCKS[layout]
  args = fused_conv_inputs((4,) + shape, in_channels, out_channels, size)
  _assert_trees_close(jax.jit(block)(*args), jax.jit(_reference_block)(*args))
  grad = lambda block: jax.jit(jax.grad(
      functools.partial(fused_conv_loss, block), argnums=(0, 1, 2, 3)))(*args)
  _assert_trees_close(grad(block), grad(_reference_block))


@pytest.mark.parametrize("layout", BLOCKS)
def test_tied_maxima_share_the_gradient(layout):
  """Windows with several maxima (a constant input region) split the
  gradient between them, as ``jnp.max``'s gradient does."""
  x, kernel, scale, bias = fused_conv_inputs((4, 8, 8), 1, 3, 3)
  x = x.at[:, :4, :4].set(0.0)  # Equal convolution outputs inside.
  scale = jnp.abs(scale) + 0.1
  grad = lambda block: jax.grad(functools.partial(fused_conv_loss, block),
                                argnums=(0, 1, 2, 3))(x, kernel, scale, bias)
  _assert_trees_close(grad(BLOCKS[layout]), grad(_reference_block))


@pytest.mark.parametrize("first", [1.5, -0.0, np.nan, np.inf])
def test_computed_once_returns_its_input_bit_for_bit(first):
  """Both branches of its conditional (the second when the first element is
  not finite) return the input exactly."""
  x = jnp.asarray([first, -0.0, np.nan, -np.inf, 3e-39, -2.5], jnp.float32)
  out = jax.jit(fused_conv._computed_once)(x)
  np.testing.assert_array_equal(np.asarray(out).view(np.uint32),
                                np.asarray(x).view(np.uint32))


def test_planar_gradient_keeps_its_materialising_conditional():
  """XLA must not simplify ``_computed_once`` away in a planar block's
  backward pass, or the output gradient is recomputed in each loop that
  reads it (the AV-MNIST step 10-18% slower)."""
  args = fused_conv_inputs((4, 16, 16), 1, 3, 5)
  grad = jax.jit(jax.grad(functools.partial(fused_conv_loss, _planar_block),
                          argnums=1))
  assert "conditional(" in grad.lower(*args).compile().as_text()


@pytest.mark.parametrize("layout", BLOCKS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_block_with_statistics_over_devices(layout, in_channels):
  """Under ``pmap``, statistics and their gradients cover all devices."""
  devices = jax.local_devices()[:4]
  assert len(devices) == 4, "conftest.py simulates 4 CPU devices"
  x, kernel, scale, bias = fused_conv_inputs((8, 10, 10), in_channels, 4, 5)
  x = (x.reshape(4, 2, 10, 10, in_channels) *
       jnp.arange(1, 5).reshape(4, 1, 1, 1, 1))

  def per_device(block):
    def fn(x, kernel, scale, bias):
      loss = functools.partial(fused_conv_loss, block, axis_name="batch")
      return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(
          x, kernel, scale, bias)
    return jax.pmap(fn, axis_name="batch", in_axes=(0, None, None, None),
                    devices=devices)(x, kernel, scale, bias)

  _assert_trees_close(per_device(BLOCKS[layout]),
                      per_device(_reference_block))


@pytest.mark.parametrize("side,num_blocks", [(28, 3), (30, 2), (64, 2)])
def test_lenet_fused_matches_lax(side, num_blocks):
  """The encoder's two ``conv_impl``s: the same variables at
  initialisation, and the same outputs, statistics and gradients (the fused
  one's layouts: at side 64 all three blocks planar, at 28 and 30 the first
  block planar and the later ones usual)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, side, side))
  encoders = {impl: image.LeNetEncoder(channels=3, num_blocks=num_blocks,
                                       conv_impl=impl)
              for impl in image.CONV_IMPLS}
  variables = {impl: enc.init(jax.random.PRNGKey(1), x, train=False)
               for impl, enc in encoders.items()}
  np.testing.assert_equal(jax.device_get(variables["fused"]),
                          jax.device_get(variables["lax"]))

  def train_pass(enc):
    def loss(params):
      encoding, updates = enc.apply(
          {"params": params,
           "batch_stats": variables["lax"]["batch_stats"]},
          x, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(encoding.pooled)), updates
    return jax.jit(jax.grad(loss, has_aux=True))(variables["lax"]["params"])

  _assert_trees_close(train_pass(encoders["fused"]),
                      train_pass(encoders["lax"]))
  evaluate = lambda enc: enc.apply(variables["lax"], x, train=False)
  _assert_trees_close(evaluate(encoders["fused"]), evaluate(encoders["lax"]))


def test_lenet_fused_promotes_inputs_as_nn_conv():
  """Half-precision images with several channels are promoted to the
  kernel's float32, as ``nn.Conv`` promotes them."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 12, 12, 3)).astype(
      jnp.float16)
  outputs = {}
  for impl in image.CONV_IMPLS:
    enc = image.LeNetEncoder(channels=2, num_blocks=1, conv_impl=impl)
    variables = enc.init(jax.random.PRNGKey(1), x, train=False)
    outputs[impl], _ = enc.apply(variables, x, train=True,
                                 mutable=["batch_stats"])
  assert outputs["fused"].pooled.dtype == jnp.float32
  _assert_trees_close(outputs["fused"], outputs["lax"])


def test_unknown_conv_impl_lists_the_valid_ones():
  enc = image.LeNetEncoder(conv_impl="cudnn")
  with pytest.raises(ValueError, match=r"conv_impl='cudnn'.*fused, lax"):
    enc.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28)), train=False)
