"""Helpers shared by several test files (not collected by pytest: the name
does not start with ``test_``). A helper that one test file alone uses stays
in that file. ``e2e.py`` holds the helpers of end-to-end runs (``ROOT``,
``load_experiment``, the small ``mm_shapes`` and its command line);
``block_cases.py`` the data-parallel case of every encoder and fusion block.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.encoders import Encoding
from mmjax.registry import FUSIONS

import e2e

# Blocks: encoders, fusion blocks and heads, applied alone.

B = 4  # Batch size.
T = 6  # Question length.


def rbg_key(i: int) -> jax.Array:
  """The PRNG key ``i`` of the "rbg" generator.

  The "rbg" generator, because on CPU the default threefry (partitionable
  since jax 0.5) takes seconds to compile for each new parameter shape.
  """
  return jax.random.key(i, impl="rbg")


def init_module(module, *args, **kwargs):
  """``module``'s variables, initialised in eval mode on ``args``."""
  return module.init({"params": rbg_key(0), "dropout": rbg_key(1)}, *args,
                     train=False, **kwargs)


def apply_module(module, variables, *args, train: bool):
  """Applies ``module``; in training also returns the updated batch stats."""
  return module.apply(variables, *args, train=train,
                      mutable=["batch_stats"] if train else False,
                      rngs={"dropout": rbg_key(2)})


def assert_jit_agrees(module, variables, *args):
  """Asserts jitted and eager application agree, in eval and training mode."""
  for train in (False, True):
    f = functools.partial(apply_module, module, train=train)
    eager = f(variables, *args)
    jitted = jax.jit(f)(variables, *args)
    chex.assert_trees_all_close(jitted, eager, atol=1e-5, rtol=1e-5)


def assert_every_param_gets_grad(module, variables, *args):
  """Asserts each parameter leaf gets some non-zero gradient in training.

  The loss is a fixed random projection of every float output leaf, so no
  output direction is favoured and no gradient cancels by symmetry.
  """
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(p):
    out, _ = apply_module(module, {"params": p, **rest}, *args, train=True)
    leaves = [x for x in jax.tree.leaves(out)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(jnp.sum(x * np.random.default_rng(i).normal(size=x.shape))
               for i, x in enumerate(leaves))

  grads = jax.jit(jax.grad(loss))(params)
  dead = [jax.tree_util.keystr(path)
          for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert jax.tree.leaves(grads), "module has no parameters"
  assert not dead, f"parameters with all-zero gradient: {dead}"


def check_registered_fusion(name: str, cls, kwargs: dict,
                            encs: dict[str, Encoding]):
  """Checks the fusion block registered as ``name`` is ``cls`` and, built
  with ``kwargs`` on ``encs``: gives finite outputs, agrees under jit and
  gives every parameter a gradient. Returns its eval-mode output."""
  assert FUSIONS.get(name) is cls
  fusion = cls(**kwargs)
  variables = init_module(fusion, encs)
  out = fusion.apply(variables, encs, train=False)
  chex.assert_tree_all_finite(out)
  assert_jit_agrees(fusion, variables, encs)
  assert_every_param_gets_grad(fusion, variables, encs)
  return out


def param_count(module, *args, **kwargs) -> int:
  """The number of ``module``'s parameters on ``args``, from shapes only."""
  shapes = jax.eval_shape(functools.partial(init_module, module, **kwargs),
                          *args)
  return sum(x.size for x in jax.tree.leaves(shapes.get("params", {})))


def padded_question(vocab=20):
  """``(ids [B, T] int32 in [0, vocab), mask [B, T] bool)``: lengths T, 4, 1
  and 3; the ids at padded positions are random too."""
  ids = jax.random.randint(rbg_key(11), (B, T), 0, vocab)
  lengths = jnp.array([T, 4, 1, 3])
  mask = jnp.arange(T)[None] < lengths[:, None]
  return ids, mask


def pooled_encoding(i: int, dim: int) -> Encoding:
  """A pooled-only ``Encoding``: pooled ``[B, dim]``, standard normal, drawn
  from key ``20 + i``."""
  return Encoding(pooled=jax.random.normal(rbg_key(20 + i), (B, dim)))


def image_encoding(h=4, c=8) -> Encoding:
  """A feature map's ``Encoding``: pooled ``[B, 12]`` and tokens
  ``[B, h, h, c]``, no mask."""
  return Encoding(pooled=jax.random.normal(rbg_key(30), (B, 12)),
                  tokens=jax.random.normal(rbg_key(31), (B, h, h, c)))


def sequence_encoding(d=8) -> Encoding:
  """A padded sequence's ``Encoding``: pooled ``[B, 10]``, tokens
  ``[B, T, d]`` (zero at padding) and ``padded_question``'s mask ``[B, T]``."""
  _, mask = padded_question()
  tokens = jax.random.normal(rbg_key(32), (B, T, d)) * mask[..., None]
  return Encoding(pooled=jax.random.normal(rbg_key(33), (B, 10)),
                  tokens=tokens, mask=mask)


# Attention fusion blocks (MulT, the multimodal transformer, MBT).

# Text lengths include 0: an example with no real text token.
TEXT_LENGTHS, AUDIO_LENGTHS = (5, 2, 1, 0), (3, 1, 2, 3)


def _mask(lengths, t):
  return np.arange(t)[None] < np.asarray(lengths)[:, None]


def attention_encodings(num=2, batch=B, seed=0, text_lengths=TEXT_LENGTHS,
                        audio_lengths=AUDIO_LENGTHS):
  """An image-like feature map [b, 2, 3, 6] (no mask), a padded text sequence
  [b, 5, 7] and (num=3) a padded audio sequence [b, 3, 5]; padding is zero."""
  rng = np.random.default_rng(seed)
  text_mask, audio_mask = _mask(text_lengths, 5), _mask(audio_lengths, 3)

  def f32(*shape):
    return rng.normal(size=shape).astype(np.float32)

  encs = {"image": Encoding(pooled=f32(batch, 4), tokens=f32(batch, 2, 3, 6)),
          "text": Encoding(pooled=f32(batch, 3),
                           tokens=f32(batch, 5, 7) * text_mask[..., None],
                           mask=text_mask)}
  if num == 3:
    encs["audio"] = Encoding(pooled=f32(batch, 2),
                             tokens=f32(batch, 3, 5) * audio_mask[..., None],
                             mask=audio_mask)
  return encs


# The fused LeNet block (mmjax.encoders.fused_conv).

# (spatial shape, in channels, out channels, kernel size): LeNet's first
# layer on one channel, a wider layer, and odd sides whose last row and
# column the pool drops.
FUSED_CONV_CASES = [((11, 12), 1, 6, 5), ((8, 8), 4, 6, 3), ((7, 9), 2, 3, 3),
                    ((9, 10), 3, 2, 4)]


def fused_conv_inputs(shape, in_channels, out_channels, size, seed=0):
  """``(x [*shape, in_channels], kernel [size, size, in_channels,
  out_channels], scale [out_channels], bias [out_channels])``, float32; the
  first scale is negative."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape + (in_channels,)).astype(np.float32)
  kernel = rng.normal(size=(size, size, in_channels, out_channels)) * 0.3
  # Negative scales pool the window's minimum.
  scale = rng.normal(size=out_channels)
  scale[0] = -abs(scale[0])
  bias = rng.normal(size=out_channels) * 0.5
  return tuple(jnp.asarray(a, jnp.float32) for a in (x, kernel, scale, bias))


def fused_conv_loss(block, x, kernel, scale, bias, axis_name=None):
  """A loss that weighs each output, mean and variance differently."""
  out, mean, var = block(x, kernel, scale, bias, axis_name)
  weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  return jnp.sum(out * weights) + jnp.sum(mean * 0.3) - jnp.sum(var * 0.2)


# Assembled models of the experiment files.

VOCAB, CLASSES = 12, 5  # model_batch's question vocabulary and answer classes.


def model_batch(batch_size: int = 8):
  """An ``mm_shapes``-like batch: image ``[batch_size, 32, 32, 3]`` float32,
  question ``[batch_size, T]`` int32 ids in ``[2, VOCAB)``, zero after each
  example's length, question_mask ``[batch_size, T]`` bool and answer
  ``[batch_size]`` int32 in ``[0, CLASSES)``."""
  rng = np.random.default_rng(0)
  mask = np.arange(T)[None] < rng.integers(1, T + 1, batch_size)[:, None]
  return {"image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
          "question": (rng.integers(2, VOCAB, (batch_size, T))
                       * mask).astype(np.int32),
          "question_mask": mask,
          "answer": rng.integers(0, CLASSES, batch_size).astype(np.int32)}


def small_model(config):
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


# A small FiLM model trained step by step, without the data pipeline.


def small_film_config():
  """The ``model`` and ``optim`` of a small FiLM model (cnn image, lstm
  question, one FiLM block, a classifier of ``answer``) and AdamW; for a
  question vocabulary of 20 and 5 classes, as ``small_film_batches``."""
  return ml_collections.ConfigDict(dict(
      model=dict(
          modalities=("image", "question"),
          encoders=dict(image=dict(name="cnn", features=(8, 16), dim=16),
                        question=dict(name="lstm", embed_dim=8, hidden=16)),
          fusion=dict(name="film", target="image", num_blocks=1, channels=8,
                      dim=16),
          heads=dict(answer=dict(name="classifier", target="answer",
                                 hidden=(16,)))),
      optim=dict(name="adamw", learning_rate=3e-3, schedule="warmup_cosine",
                 warmup_steps=2, weight_decay=1e-4, b1=0.9, b2=0.999,
                 grad_clip_norm=1.0)))


def small_film_batches(batch_size: int = 8):
  """Two fixed random batches, alternated, so that the loss can fall.

  Each: image ``[batch_size, 16, 16, 3]`` float32, question
  ``[batch_size, 7]`` int32 ids in ``[2, 20)`` (zero-padded), question_mask
  ``[batch_size, 7]`` bool and answer ``[batch_size]`` int32 in ``[0, 5)``.
  """
  rng = np.random.default_rng(0)
  for _ in range(2):
    lengths = rng.integers(2, 7, batch_size)
    mask = np.arange(7)[None] < lengths[:, None]
    yield {"image": rng.normal(size=(batch_size, 16, 16, 3)).astype(np.float32),
           "question": (rng.integers(2, 20, (batch_size, 7))
                        * mask).astype(np.int32),
           "question_mask": mask,
           "answer": rng.integers(0, 5, batch_size).astype(np.int32)}


# End-to-end runs (see also e2e.py).


def keep_best_config(data_dir, **overrides):
  """The small runlocal mm_shapes model (``e2e.small_config``) on
  ``data_dir``: 8 steps, validating every 2 and keeping the checkpoint of the
  best validation accuracy; then ``overrides`` (``{"a.b": value}``)."""
  return e2e.small_config(data_dir, **{
      "train.steps": 8, "train.eval_every_steps": 2,
      "checkpoint.keep_best": "validation/accuracy", **overrides})
