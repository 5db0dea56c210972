"""Optimizers and learning-rate schedules from ``config.optim``.

Each is registered by name (``registry.OPTIMIZERS``, ``registry.SCHEDULES``):
``config.optim.name`` and ``config.optim.schedule`` pick them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmjax.registry import OPTIMIZERS
from mmjax.registry import SCHEDULES


def make_schedule(optim: ml_collections.ConfigDict,
                  total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step: ``config.optim.schedule``."""
  return SCHEDULES.get(optim.schedule)(optim, total_steps)


@SCHEDULES.register("constant")
def constant(optim: ml_collections.ConfigDict, total_steps: int
             ) -> optax.Schedule:
  """``learning_rate`` after ``warmup_steps`` of linear warmup."""
  del total_steps  # Unused.
  lr, warmup = optim.learning_rate, optim.warmup_steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)),
       optax.constant_schedule(lr)], [warmup])


@SCHEDULES.register("warmup_cosine")
def warmup_cosine(optim: ml_collections.ConfigDict, total_steps: int
                  ) -> optax.Schedule:
  """Linear warmup over ``warmup_steps``, then cosine decay to 0 at
  ``total_steps``."""
  warmup = optim.warmup_steps
  return optax.warmup_cosine_decay_schedule(
      0.0, optim.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1))


@SCHEDULES.register("step")
def step(optim: ml_collections.ConfigDict, total_steps: int
         ) -> optax.Schedule:
  """``learning_rate`` times ``decay_factor`` from each of ``decay_steps`` on
  (steps counted from 0, warmup included), after ``warmup_steps`` of linear
  warmup."""
  del total_steps  # Unused.
  warmup = optim.warmup_steps
  decay_steps = [int(s) for s in optim.decay_steps]
  if decay_steps != sorted(set(decay_steps)):
    raise ValueError("config.optim.decay_steps must be increasing, without "
                     f"repeats: got {tuple(optim.decay_steps)}.")
  decayed = optax.piecewise_constant_schedule(
      optim.learning_rate, {s: optim.decay_factor for s in decay_steps})
  if not warmup:
    return decayed
  return lambda count: decayed(count) * jnp.minimum(count / warmup, 1.0)


def make_optimizer(optim: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Clipping by global norm (``grad_clip_norm``; 0 clips nothing), then the
  optimizer ``config.optim.name``.

  Weight decay applies to kernels and embeddings (rank >= 2), not to biases
  or normalisation scales.
  """
  base = OPTIMIZERS.get(optim.name)(optim, schedule)
  if optim.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), base)
  return base


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@OPTIMIZERS.register("adamw")
def adamw(optim: ml_collections.ConfigDict,
          schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (``b1``, ``b2``, decoupled ``weight_decay``)."""
  return optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                     weight_decay=optim.weight_decay, mask=_decay_mask)


@OPTIMIZERS.register("sgd")
def sgd(optim: ml_collections.ConfigDict,
        schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with ``momentum`` (0: none) and ``weight_decay`` added to the
  gradient."""
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay, mask=_decay_mask),
      optax.sgd(schedule, momentum=optim.momentum or None))
