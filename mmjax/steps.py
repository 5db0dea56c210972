"""Train state and the pure, per-device train and eval steps.

The steps are written for one device's shard of the batch. Statistics that
must agree across devices (gradients, BatchNorm statistics, metrics) are
averaged with ``lax.pmean`` over ``axis_name``; ``mmjax.parallel`` maps them
over devices with pmap or shard_map. Bound with ``functools.partial``::

    step = functools.partial(train_step, model=model, tx=tx, ...)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mmjax import losses

PyTree = Any
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in checkpoints.

  Attributes:
    step: number of updates applied, int32 scalar.
    params: model parameters.
    batch_stats: BatchNorm running statistics (empty dict if none).
    opt_state: optimizer state.
    rng: PRNG key (raw uint32 ``[2]``), split every step.
    skipped_updates: updates skipped for non-finite values, int32 scalar.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  skipped_updates: jax.Array


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       example_batch: Mapping[str, Any],
                       rng: jax.Array) -> TrainState:
  """Initialises parameters from one example batch (shapes only matter)."""
  stacked = create_seed_states(model, tx, example_batch, [rng])
  return jax.tree.map(lambda x: x[0], stacked)


def create_seed_states(model: nn.Module, tx: optax.GradientTransformation,
                       example_batch: Mapping[str, Any],
                       rngs: Sequence[jax.Array]) -> TrainState:
  """One train state per key of ``rngs``, stacked: every leaf ``[seeds,
  ...]``.

  Each state is initialised on its own (not under ``vmap``), so seed ``k``'s
  state equals ``create_train_state`` with ``rngs[k]`` for every PRNG
  implementation. Compiled once for all seeds: running a scanned RNN's
  initialisation op by op takes tens of seconds on CPU.
  """

  @jax.jit
  def init(example_batch, rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init({"params": init_rng, "dropout": init_rng},
                           example_batch, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=state_rng,
                      skipped_updates=jnp.zeros((), jnp.int32))

  return stack_trees([init(dict(example_batch), rng) for rng in rngs])


def stack_trees(trees: Sequence[PyTree]) -> PyTree:
  """Trees of one structure -> one tree, every leaf ``[len(trees), ...]``."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# config.train.seeds_program: how ``over_seeds`` maps a step over the seeds;
# "auto" is "vmap" on GPU/TPU and "unroll" on CPU (train.py).
SEEDS_PROGRAMS = ("auto", "vmap", "unroll")


def over_seeds(step_fn: Callable[..., Any], *, batch_axis: int | None,
               vectorize: bool = True) -> Callable[..., Any]:
  """``step_fn`` (``train_step`` or ``eval_step``, bound) over a stack of
  independent train states, as one program.

  Args:
    step_fn: ``(state, batch, *, axis_name) -> outputs``.
    batch_axis: the batch's seed axis (seed ``k`` reads ``batch[:, k]`` when
      it is 1), or ``None`` when every seed reads the same batch.
    vectorize: ``jax.vmap`` over the seeds (one batched computation: the
      point on GPU/TPU, where one small model leaves the chip idle); else
      one copy of ``step_fn`` per seed, unrolled into the program (on CPU,
      where XLA runs vmapped convolutions as slow grouped ones, and a
      ``lax.map`` loop ran 6x slower per seed than the unrolled copies).

  Returns:
    ``(states, batch, *, axis_name) -> outputs``, for ``states`` with leaves
    ``[seeds, ...]``; every output leaf gets a leading ``[seeds]`` axis.
    Collectives over ``axis_name`` (gradients, BatchNorm statistics) stay
    within each seed.
  """

  def step(states, batch, *, axis_name):
    one_seed = functools.partial(step_fn, axis_name=axis_name)
    if vectorize:
      return jax.vmap(one_seed, in_axes=(0, batch_axis))(states, batch)
    num_seeds = jax.tree.leaves(states)[0].shape[0]
    outputs = []
    for k in range(num_seeds):
      seed_batch = batch if batch_axis is None else jax.tree.map(
          lambda x: jnp.take(x, k, axis=batch_axis), batch)
      outputs.append(one_seed(jax.tree.map(lambda x: x[k], states), seed_batch))
    return stack_trees(outputs)

  return step


def _mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  return jax.lax.pmean(x, axis_name) if axis_name else x


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
               model: nn.Module, tx: optax.GradientTransformation,
               learning_rate_fn: Callable[[jax.Array], jax.Array],
               objective: Callable[..., dict[str, jax.Array]],
               axis_name: str | None,
               skip_nonfinite_updates: bool = False
               ) -> tuple[TrainState, Metrics]:
  """One optimizer update on one device's ``[per_device_batch, ...]`` shard.

  ``objective(outputs, batch, params, axis_name) -> terms`` gives the loss
  and metrics of the model's outputs: ``[batch]`` per-example values or
  scalars of the global batch, averaged here (``losses.Supervised``: the
  heads' losses; ``contrastive.Objective``: CLIP or SigLIP, which gathers
  the batch over ``axis_name``).

  Returns the new state and scalar metrics averaged over devices: the
  objective's terms (``loss``, ``accuracy``, and per head with several),
  ``grad_norm`` (global, and ``grad_norm/<group>`` for each top-level part of
  the model), ``learning_rate``, and with uncertainty weighting each head's
  learned ``loss_weight/<head>`` (the one this update's loss used).
  """
  rng, next_rng = jax.random.split(state.rng)
  if axis_name:  # A different dropout mask on each device.
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch,
        train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    terms = objective(logits, batch, params, axis_name)
    return jnp.mean(terms["loss"]), (terms, updates)

  grads, (terms, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = _mean(grads, axis_name)
  batch_stats = _mean(updates.get("batch_stats", {}), axis_name)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)

  metrics = {k: _mean(jnp.mean(v), axis_name) for k, v in terms.items()}
  log_variances = state.params.get(losses.LOG_VARIANCES)
  if log_variances is not None:
    metrics.update(losses.learned_weights(log_variances))
  metrics["grad_norm"] = optax.tree.norm(grads)
  for group, group_grads in grads.items():  # encoders_<modality>, fusion, heads_*
    metrics[f"grad_norm/{group}"] = optax.tree.norm(group_grads)
  # The optimizer's schedule counts applied updates only.
  metrics["learning_rate"] = learning_rate_fn(state.step - state.skipped_updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state,
                            rng=next_rng)
  if skip_nonfinite_updates:
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, state.replace(
                                 step=state.step + 1, rng=next_rng,
                                 skipped_updates=state.skipped_updates + 1))
    metrics["skipped_updates"] = new_state.skipped_updates
  return new_state, metrics


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *,
              model: nn.Module, targets: Mapping[str, losses.Task],
              axis_name: str | None, mask_key: str = "_mask") -> Metrics:
  """Sums of per-example metrics over the real examples of all devices.

  Returns ``{metric: sum, ..., "count": number of real examples}``; divide by
  ``count`` for means (``mmjax.metrics.MeanAccumulator`` does).
  """
  logits = model.apply({"params": state.params,
                        "batch_stats": state.batch_stats}, batch, train=False)
  terms = losses.head_terms(logits, batch, targets,
                            state.params.get(losses.LOG_VARIANCES))
  mask = batch[mask_key].astype(jnp.float32)
  sums = {k: jnp.sum(v * mask) for k, v in terms.items()}
  sums["count"] = jnp.sum(mask)
  return jax.lax.psum(sums, axis_name) if axis_name else sums
