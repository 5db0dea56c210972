"""Optimizers and learning-rate schedules from ``config.optim``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "step")


def make_schedule(optim: ml_collections.ConfigDict,
                  total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step.

  ``constant``: ``lr`` after ``warmup_steps`` of linear warmup.
  ``warmup_cosine``: linear warmup, then cosine decay to 0 at ``total_steps``.
  ``step``: ``lr`` times ``decay_factor`` from each of ``decay_steps`` on
  (steps counted from 0, warmup included), after ``warmup_steps`` of linear
  warmup.
  """
  lr, warmup = optim.learning_rate, optim.warmup_steps
  if optim.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)),
         optax.constant_schedule(lr)], [warmup])
  if optim.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1))
  if optim.schedule == "step":
    decay_steps = [int(s) for s in optim.decay_steps]
    if decay_steps != sorted(set(decay_steps)):
      raise ValueError("config.optim.decay_steps must be increasing, without "
                       f"repeats: got {tuple(optim.decay_steps)}.")
    decayed = optax.piecewise_constant_schedule(
        lr, {s: optim.decay_factor for s in decay_steps})
    if not warmup:
      return decayed
    return lambda step: decayed(step) * jnp.minimum(step / warmup, 1.0)
  raise ValueError(f"Unknown config.optim.schedule {optim.schedule!r}. "
                   f"Valid: {', '.join(SCHEDULES)}.")


def make_optimizer(optim: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Clipping by global norm, then AdamW or SGD (momentum) with weight decay.

  Weight decay applies to kernels and embeddings (rank >= 2), not to biases
  or normalisation scales.
  """
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  if optim.name == "adamw":
    base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                       weight_decay=optim.weight_decay, mask=decay_mask)
  elif optim.name == "sgd":
    base = optax.chain(
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=optim.momentum or None))
  else:
    raise ValueError(f"Unknown config.optim.name {optim.name!r}. "
                     f"Valid: {', '.join(OPTIMIZERS)}.")
  if optim.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), base)
  return base
