"""Mixed precision, ``config.model.dtype``: every part computes in bfloat16
with float32 parameters; the model's logits, loss, gradients and optimizer
state stay float32; and the fused LeNet block agrees with the unfused layers
in bfloat16. (That ``mm_shapes`` trains to float32's accuracy in bfloat16 is
``test_mixed_precision_accuracy.py``, a file of its own so that the test
runner can run it next to these.)

The parts are ``block_cases.CASES`` (every registered encoder and fusion
block, small versions of those their own test files build) and a classifier
head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from mmjax import config_lib, losses, models, optim, steps
from mmjax.encoders import fused_conv, image
from mmjax.heads import ClassifierHead
from mmjax.registry import ENCODERS, FUSIONS, HEADS

import block_cases
from e2e import load_experiment
from helpers import (CLASSES, FUSED_CONV_CASES, VOCAB, apply_module,
                     fused_conv_inputs, fused_conv_loss, init_module,
                     model_batch, rbg_key, small_model)

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
MATMULS = ("dot_general", "conv_general_dilated")

PARTS = {
    **block_cases.CASES,
    "classifier": (lambda axis: ClassifierHead(num_classes=5, hidden=(8,)),
                   lambda: (np.random.default_rng(0).normal(size=(8, 6))
                            .astype(np.float32),)),
}


def _part(name: str, dtype) -> tuple:
  """``(module in dtype, inputs)``; the inputs are float32, as the data
  pipeline gives them, so a part must cast them itself."""
  make_module, make_inputs = PARTS[name]
  return make_module(None).clone(dtype=dtype), make_inputs()


def _float_leaves(tree) -> list[jax.Array]:
  return [x for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]


def _matmul_dtypes(jaxpr: jax_core.Jaxpr) -> list[tuple[str, tuple]]:
  """``(primitive, operand dtypes)`` of every matmul and convolution in
  ``jaxpr`` and its sub-jaxprs (scans, jits, custom derivatives)."""
  found = [(eqn.primitive.name, tuple(v.aval.dtype for v in eqn.invars))
           for eqn in jaxpr.eqns if eqn.primitive.name in MATMULS]
  for sub in jax_core.subjaxprs(jaxpr):
    found += _matmul_dtypes(sub)
  return found


def _projection_loss(out) -> jax.Array:
  """A fixed random projection of every float output, summed in float32."""
  return sum(jnp.sum(x.astype(F32) * np.random.default_rng(i).normal(
      size=x.shape)) for i, x in enumerate(_float_leaves(out)))


def test_parts_cover_every_registered_name():
  assert set(PARTS) == (set(ENCODERS.names()) | set(FUSIONS.names())
                        | set(HEADS.names()))


@pytest.mark.parametrize("name", sorted(PARTS))
def test_part_computes_in_bfloat16_with_float32_parameters(name):
  """Parameters and BatchNorm statistics float32, outputs bfloat16, and every
  matmul and convolution of the training pass, forward and backward, on
  bfloat16 operands."""
  module, inputs = _part(name, BF16)
  variables = jax.eval_shape(functools.partial(init_module, module), *inputs)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {F32}
  for train in (False, True):
    out = jax.eval_shape(functools.partial(apply_module, module, train=train),
                         variables, *inputs)
    outputs = _float_leaves(out[0] if train else out)
    assert outputs and all(x.dtype == BF16 for x in outputs), outputs

  def loss(params, rest):
    out, _ = apply_module(module, {"params": params, **rest}, *inputs,
                          train=True)
    return _projection_loss(out)

  rest = {k: v for k, v in variables.items() if k != "params"}
  jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], rest)
  matmuls = _matmul_dtypes(jaxpr.jaxpr)
  assert matmuls, "no matmul or convolution found"
  not_bf16 = [m for m in matmuls if set(m[1]) != {BF16}]
  assert not not_bf16, f"{name}: matmuls not in bfloat16: {not_bf16}"


@pytest.mark.parametrize("name", sorted(PARTS))
def test_part_in_bfloat16_is_close_to_float32(name):
  """The same parameters and inputs, one training-mode pass: bfloat16
  outputs within bfloat16 rounding, accumulated over a few layers, of the
  float32 ones."""
  module, inputs = _part(name, F32)
  variables = jax.jit(functools.partial(init_module, module))(*inputs)

  @jax.jit
  def both(variables, inputs):
    return tuple(_float_leaves(apply_module(module.clone(dtype=dtype),
                                            variables, *inputs,
                                            train=True)[0])
                 for dtype in (F32, BF16))

  expected, got = both(variables, inputs)
  for x, y in zip(got, expected):
    scale = float(jnp.max(jnp.abs(y)))
    np.testing.assert_allclose(np.asarray(x, np.float32), y,
                               atol=0.05 * scale, rtol=0.05)


# The model.

MODEL_VARIANTS = ("fusion=film", "fusion=concat", "fusion=decision",
                  "fusion=mm_transformer", "modalities=image")


def _model(arg: str, dtype: str) -> tuple[models.MultimodalModel, ...]:
  config = small_model(load_experiment().get_config(arg))
  config.model.dtype = dtype
  config_lib.validate_config(config)
  return models.build_model(config.model, vocab_sizes={"question": VOCAB},
                            num_classes={"answer": CLASSES},
                            axis_name=None), config


@pytest.mark.parametrize("arg", MODEL_VARIANTS)
def test_model_in_bfloat16_returns_float32_logits(arg):
  """``config.model.dtype`` reaches every part: the model's matmuls run in
  bfloat16 and its logits are float32."""
  model, _ = _model(arg, "bfloat16")
  batch = model_batch()
  variables = jax.eval_shape(functools.partial(model.init, rbg_key(0),
                                               train=False), batch)
  apply = functools.partial(model.apply, train=False)
  logits = jax.eval_shape(apply, variables, batch)
  assert {x.dtype for x in jax.tree.leaves(logits)} == {F32}
  matmuls = _matmul_dtypes(jax.make_jaxpr(apply)(variables, batch).jaxpr)
  assert matmuls and all(set(m[1]) == {BF16} for m in matmuls), matmuls


def test_configs_without_dtype_build_float32_models():
  """Configs saved before ``model.dtype`` existed still validate and build
  float32 models."""
  config = small_model(load_experiment().get_config("fusion=film"))
  del config.model["dtype"]
  config_lib.validate_config(config)
  model = models.build_model(config.model, vocab_sizes={"question": VOCAB},
                             num_classes={"answer": CLASSES}, axis_name=None)
  parts = [*model.encoders.values(), model.fusion, *model.heads.values()]
  assert {part.dtype for part in parts} == {F32}


def test_unknown_dtype_lists_the_valid_ones():
  config = small_model(load_experiment().get_config(""))
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match=r"model\.dtype 'float16'.*Valid: "
                     r"float32, bfloat16.*loss scaling"):
    config_lib.validate_config(config)


def test_train_step_in_bfloat16_keeps_float32_state_and_loss():
  """Gradients, updated parameters, optimizer state, BatchNorm statistics
  and the loss are float32; the step does update the parameters."""
  model, config = _model("fusion=film", "bfloat16")
  config.optim.warmup_steps = 0  # A learning rate above 0 at step 0.
  batch = model_batch()
  schedule = optim.make_schedule(config.optim, config.train.steps)
  tx = optim.make_optimizer(config.optim, schedule)
  state = steps.create_train_state(model, tx, batch, rbg_key(0))
  targets = losses.head_targets(config.model.heads)

  def loss(params):
    logits, _ = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch,
        train=True, mutable=["batch_stats"])
    return jnp.mean(losses.head_terms(logits, batch, targets)["loss"])

  loss_value, grads = jax.eval_shape(jax.value_and_grad(loss), state.params)
  assert loss_value.dtype == F32
  step = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, learning_rate_fn=schedule,
      objective=losses.Supervised(targets), axis_name=None))
  new_state, metrics = step(state, batch)
  for tree in (grads, new_state.params, new_state.opt_state,
               new_state.batch_stats):
    assert {x.dtype for x in _float_leaves(tree)} == {F32}
  assert metrics["loss"].dtype == F32
  assert np.isfinite(metrics["loss"])
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a != b))),
                         state.params, new_state.params)
  assert all(jax.tree.leaves(changed))


# The fused LeNet block.


@pytest.mark.parametrize("planar", [False, True])
@pytest.mark.parametrize("shape,in_channels,out_channels,size",
                         FUSED_CONV_CASES)
def test_fused_block_gradients_have_the_primal_dtypes(shape, in_channels,
                                                      out_channels, size,
                                                      planar):
  """bfloat16 input, float32 kernel, scale and bias: the output is bfloat16,
  the statistics float32, and each gradient has its argument's dtype, in
  both layouts."""
  x, kernel, scale, bias = fused_conv_inputs((4,) + shape, in_channels,
                                             out_channels, size)
  if planar:
    x = fused_conv.to_planar(x)
  block = functools.partial(fused_conv.conv_bn_relu_pool, planar=planar)
  args = (x.astype(BF16), kernel, scale, bias)
  out, mean, var = jax.eval_shape(block, *args)
  assert (out.dtype, mean.dtype, var.dtype) == (BF16, F32, F32)
  grads = jax.eval_shape(jax.grad(functools.partial(fused_conv_loss, block),
                                  argnums=(0, 1, 2, 3)), *args)
  assert [g.dtype for g in grads] == [BF16, F32, F32, F32]


def _relative_error(tree, reference) -> float:
  """``|tree - reference| / |reference|``, L2 norms over all leaves."""
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float32))
                                   for x in jax.tree.leaves(t)])
  a, b = flat(tree), flat(reference)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("side,num_blocks", [(28, 3), (30, 2)])
def test_lenet_fused_is_as_accurate_as_lax_in_bfloat16(side, num_blocks):
  """Both ``conv_impl``s in bfloat16, from the same float32 variables and
  against float32: the fused block's training outputs, batch statistics,
  parameter gradients and evaluation outputs are as close to float32 as the
  unfused layers' are.

  (Neither is close in every gradient entry: at batch 4, BatchNorm's
  backward pass, which subtracts means of the incoming gradients, turns
  bfloat16 rounding into errors of ~10% (L2) in the first layers'
  gradients, for the unfused layers as for the fused block.)
  """
  x = jax.random.normal(jax.random.PRNGKey(0), (4, side, side))

  def train_pass(impl, dtype):
    enc = image.LeNetEncoder(channels=3, num_blocks=num_blocks,
                             conv_impl=impl, dtype=dtype)

    def loss(params):
      encoding, updates = enc.apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          x, train=True, mutable=["batch_stats"])
      pooled = encoding.pooled.astype(F32)
      return jnp.sum(jnp.sin(pooled)), (encoding.pooled, updates)

    @jax.jit
    def run(variables):
      grads, (pooled, updates) = jax.grad(loss, has_aux=True)(
          variables["params"])
      return pooled, updates, grads, enc.apply(variables, x,
                                               train=False).pooled

    return run(variables)

  variables = image.LeNetEncoder(channels=3, num_blocks=num_blocks).init(
      jax.random.PRNGKey(1), x, train=False)
  fused, unfused = train_pass("fused", BF16), train_pass("lax", BF16)
  reference = train_pass("lax", F32)
  assert fused[0].dtype == fused[3].dtype == BF16
  for tree in fused[1:3]:
    assert {x.dtype for x in jax.tree.leaves(tree)} == {F32}
  for what, got, ref, float32 in zip(
      ("outputs", "statistics", "gradients", "evaluation"), fused, unfused,
      reference):
    error, ref_error = (_relative_error(got, float32),
                        _relative_error(ref, float32))
    assert 0 < error <= 1.5 * ref_error, (what, error, ref_error)
