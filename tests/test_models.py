"""Assembled models: each way of wiring encoders, fusion and heads trains every weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses, models
from test_config import load_experiment

B, T, VOCAB, CLASSES = 8, 6, 12, 5


def _batch():
  rng = np.random.default_rng(0)
  mask = np.arange(T)[None] < rng.integers(1, T + 1, B)[:, None]
  return {"image": rng.normal(size=(B, 32, 32, 3)).astype(np.float32),
          "question": (rng.integers(2, VOCAB, (B, T)) * mask).astype(np.int32),
          "question_mask": mask,
          "answer": rng.integers(0, CLASSES, B).astype(np.int32)}


def _small(config):
  """The experiment's model at a size that compiles quickly."""
  config.model.encoders.image.features = (8, 16)
  if config.model.encoders.image.dim:
    config.model.encoders.image.dim = 16
  config.model.encoders.question.update(embed_dim=8, hidden=16)
  if config.model.fusion.name == "film":
    config.model.fusion.update(channels=8, dim=16)
  if config.model.fusion.name in ("mult", "mm_transformer", "mbt"):
    config.model.fusion.update(dim=8, num_heads=2, mlp_dim=16)
  return config


# One variant per way the model wires its parts: feature-map tokens (film),
# pooled vectors (concat), per-modality heads (decision), token sequences
# (mm_transformer) and a single modality. Each fusion block's own gradient
# test is in its test file.
@pytest.mark.parametrize("arg", ["fusion=film", "fusion=concat",
                                 "fusion=decision", "fusion=mm_transformer",
                                 "modalities=image"])
def test_every_parameter_gets_a_gradient_from_the_training_loss(arg):
  config = _small(load_experiment().get_config(arg))
  model = models.build_model(config.model, vocab_sizes={"question": VOCAB},
                             num_classes={"answer": CLASSES}, axis_name=None)
  batch = _batch()
  variables = jax.jit(lambda b: model.init(jax.random.PRNGKey(0), b,
                                           train=False))(batch)
  targets = losses.head_targets(config.model.heads)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, batch, train=True,
                            mutable=["batch_stats"],
                            rngs={"dropout": jax.random.PRNGKey(1)})  # mfb.
    return jnp.mean(losses.classification_terms(logits, batch, targets)["loss"])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  dead = [jax.tree_util.keystr(path) for path, g in
          jax.tree_util.tree_leaves_with_path(grads) if not np.any(np.asarray(g))]
  assert not dead, f"{arg}: parameters that never train: {dead}"
  fused = set(config.model.modalities)
  assert {k.split("_", 1)[1] for k in variables["params"]
          if k.startswith("encoders_")} == fused


def test_missing_modality_in_batch_is_named():
  config = _small(load_experiment().get_config(""))
  model = models.build_model(config.model, vocab_sizes={"question": VOCAB},
                             num_classes={"answer": CLASSES}, axis_name=None)
  batch = _batch()
  del batch["question"]
  with pytest.raises(ValueError, match="fuses modality 'question'.*image"):
    model.init(jax.random.PRNGKey(0), batch, train=False)
