"""Assembled models: each way of wiring encoders, fusion and heads trains every weight."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses, models
from mmjax.encoders import Encoding

from e2e import load_experiment
from helpers import CLASSES, T, VOCAB, model_batch, small_model


# One variant per way the model wires its parts: feature-map tokens (film),
# pooled vectors (concat), per-modality heads (decision), token sequences
# (mm_transformer) and a single modality. Each fusion block's own gradient
# test is in its test file.
@pytest.mark.parametrize("arg", ["fusion=film", "fusion=concat",
                                 "fusion=decision", "fusion=mm_transformer",
                                 "modalities=image"])
def test_every_parameter_gets_a_gradient_from_the_training_loss(arg):
  config = small_model(load_experiment().get_config(arg))
  model = models.build_model(config.model, vocab_sizes={"question": VOCAB},
                             num_classes={"answer": CLASSES}, axis_name=None)
  batch = model_batch()
  variables = jax.jit(lambda b: model.init(jax.random.PRNGKey(0), b,
                                           train=False))(batch)
  targets = losses.head_targets(config.model.heads)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, batch, train=True,
                            mutable=["batch_stats"],
                            rngs={"dropout": jax.random.PRNGKey(1)})  # mfb.
    return jnp.mean(losses.head_terms(logits, batch, targets)["loss"])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  dead = [jax.tree_util.keystr(path) for path, g in
          jax.tree_util.tree_leaves_with_path(grads) if not np.any(np.asarray(g))]
  assert not dead, f"{arg}: parameters that never train: {dead}"
  fused = set(config.model.modalities)
  assert {k.split("_", 1)[1] for k in variables["params"]
          if k.startswith("encoders_")} == fused


def test_missing_modality_in_batch_is_named():
  config = small_model(load_experiment().get_config(""))
  model = models.build_model(config.model, vocab_sizes={"question": VOCAB},
                             num_classes={"answer": CLASSES}, axis_name=None)
  batch = model_batch()
  del batch["question"]
  with pytest.raises(ValueError, match="fuses modality 'question'.*image"):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.PRNGKey(0), batch)  # Tracing raises it.


def _fused(arg, encodings):
  """The output ``[batch, dim]`` of the experiment's fusion block, with random
  weights (from tracing its init only: compiling it takes seconds)."""
  config = small_model(load_experiment().get_config(arg))
  fusion = models.build_model(
      config.model, vocab_sizes={"question": VOCAB},
      num_classes={"answer": CLASSES}, axis_name=None).fusion
  shapes = jax.eval_shape(functools.partial(fusion.init, train=False),
                          jax.random.PRNGKey(0), encodings)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda x: rng.normal(scale=0.5, size=x.shape).astype(x.dtype), shapes)
  out = jax.jit(functools.partial(fusion.apply, train=False))(variables,
                                                              encodings)
  return np.asarray(out, np.float64)


def test_early_fusion_mixes_the_modalities_and_late_fusion_does_not():
  """Late fusion (``mm_transformer_late``) runs one tower per modality and
  returns ``Dense`` of the concatenated towers' outputs, so its output is a
  sum ``f(image) + g(question)``: for two images a, b and two questions x, y,
  ``out(a,x) - out(a,y) - out(b,x) + out(b,y) = 0``. Early fusion
  (``mm_transformer``) attends across the modalities' tokens from the first
  layer, so how its output changes with the question depends on the image.

  The encoders see one modality each, so the features the heads get mix the
  modalities exactly when the fusion block's output does; the block is
  tested alone (the encoders take seconds to compile)."""
  rng = np.random.default_rng(0)
  image_2xHxWxC = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
  question_2xTxD = rng.normal(size=(2, T, 16)).astype(np.float32)
  mask_2xT = np.arange(T)[None] < np.array([[T], [T - 2]])
  pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (image, question) of 4 examples.
  i, q = np.array(pairs).T
  question_BxTxD = question_2xTxD[q] * mask_2xT[q][..., None]
  encodings = {
      "image": Encoding(pooled=image_2xHxWxC[i].mean((1, 2)),
                        tokens=image_2xHxWxC[i]),
      "question": Encoding(pooled=question_BxTxD[:, 0], tokens=question_BxTxD,
                           mask=mask_2xT[q])}
  for arg, mixes in (("fusion=mm_transformer", True),
                     ("fusion=mm_transformer_late", False)):
    out = _fused(arg, encodings)
    interaction = out[0] - out[1] - out[2] + out[3]
    # Both outputs depend on each modality.
    scale = min(np.abs(out[0] - out[1]).max(), np.abs(out[0] - out[2]).max())
    assert scale > 1e-2, (arg, scale)
    ratio = np.abs(interaction).max() / scale
    assert (ratio > 0.05) if mixes else (ratio < 1e-5), (arg, ratio)


def _init_and_apply(config):
  """The config's model initialised on ``model_batch()`` (PRNGKey 0) and its
  eval-mode logits there."""
  model = models.build_model(config.model, vocab_sizes={"question": VOCAB},
                             num_classes={"answer": CLASSES}, axis_name=None)
  batch = model_batch()
  variables = jax.jit(lambda b: model.init(jax.random.PRNGKey(0), b,
                                           train=False))(batch)
  logits = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables,
                                                                 batch)
  return variables, logits


def _shapes(variables):
  return {jax.tree_util.keystr(path): x.shape
          for path, x in jax.tree_util.tree_leaves_with_path(variables)}


@pytest.mark.parametrize("arg", ["fusion=film", "fusion=mm_transformer"])
def test_token_only_image_encoder_is_built_without_its_pooled_projection(arg):
  """FiLM reads the image's feature map only, mm_transformer every
  modality's tokens: with the image cnn's ``dim=128`` ``build_model`` leaves
  out its pooled ``Dense``, which would never train, and builds the model of
  ``dim=0``, parameter for parameter and bit for bit."""
  built = {}
  for dim in (0, 128):
    config = small_model(load_experiment().get_config(arg))
    config.model.encoders.image.dim = dim
    built[dim] = _init_and_apply(config)
  (variables_0, logits_0), (variables_128, logits_128) = built[0], built[128]
  assert _shapes(variables_128) == _shapes(variables_0)
  for x, y in zip(jax.tree.leaves((variables_128, logits_128)),
                  jax.tree.leaves((variables_0, logits_0)), strict=True):
    np.testing.assert_array_equal(x, y)


def test_pooled_fusion_keeps_the_image_encoder_pooled_projection():
  """Concat reads the image's ``pooled``: ``dim=128`` keeps its Dense."""
  config = small_model(load_experiment().get_config("fusion=concat"))
  config.model.encoders.image.dim = 128
  shapes = _shapes(_init_and_apply(config)[0]["params"])
  assert shapes["['encoders_image']['Dense_0']['kernel']"][-1] == 128
