"""Both data-parallel backends on 4 simulated devices match one device."""

import functools

import chex
import jax
import numpy as np
import pytest

from mmjax import losses, models, optim, parallel, steps

from helpers import small_film_batches, small_film_config

NUM_STEPS = 20


def _train_losses(backend, devices):
  config = small_film_config()
  dp = parallel.DataParallel(backend, devices=devices)
  model = models.build_model(config.model, vocab_sizes={"question": 20},
                             num_classes={"answer": 5}, axis_name=parallel.AXIS)
  schedule = optim.make_schedule(config.optim, NUM_STEPS)
  tx = optim.make_optimizer(config.optim, schedule)
  batches = list(small_film_batches()) * (NUM_STEPS // 2)
  state = steps.create_train_state(model, tx, batches[0], jax.random.PRNGKey(0))
  state = dp.replicate(state)
  train_step = functools.partial(
      steps.train_step, model=model, tx=tx, learning_rate_fn=schedule,
      objective=losses.Supervised(losses.head_targets(config.model.heads)))

  chex.clear_trace_counter()  # Counts are kept per source line, across runs.

  @chex.assert_max_traces(n=1)  # 20 steps must not recompile.
  def traced_once(state, batch, axis_name):
    return train_step(state, batch, axis_name=axis_name)

  step = dp.train_step(traced_once)
  history = []
  for batch in batches:
    state, metrics = step(state, dp.shard_batch(batch))
    history.append(float(metrics["loss"]))
  return np.array(history), jax.device_get(dp.unreplicate(state).params)


@pytest.fixture(scope="module")
def single_device():
  return _train_losses("pmap", jax.devices()[:1])


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_four_devices_match_one(backend, single_device):
  assert jax.device_count() == 4, "conftest sets 4 simulated CPU devices"
  ref_losses, ref_params = single_device
  losses_4, params_4 = _train_losses(backend, jax.devices())
  assert ref_losses[-1] < ref_losses[0]  # It trains: the comparison is not vacuous.
  np.testing.assert_allclose(losses_4, ref_losses, atol=1e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               params_4, ref_params)


def test_unknown_backend_lists_valid_ones():
  with pytest.raises(ValueError, match="pmap, shard_map"):
    parallel.DataParallel("tpu_magic")


def test_batch_not_divisible_by_devices_is_explained():
  dp = parallel.DataParallel("pmap")
  with pytest.raises(ValueError, match="divisible by 4"):
    dp.shard_batch({"x": np.zeros((6, 2))})


def test_cpu_devices_after_jax_started_must_match_them():
  jax.devices()  # The backends run four devices (conftest.py).
  parallel.use_cpu_devices(0)  # JAX's default: nothing to change.
  parallel.use_cpu_devices(4)  # What runs already.
  with pytest.raises(RuntimeError, match="already started 4 CPU device"):
    parallel.use_cpu_devices(2)
  with pytest.raises(ValueError, match="cpu_devices=-1"):
    parallel.use_cpu_devices(-1)
  assert jax.device_count() == 4


def _slow_step(state, batch, axis_name):
  """A step that takes tens of milliseconds: 8 matmuls of 1024x1024."""
  x = state + batch.sum()
  for _ in range(8):
    x = jax.lax.pmean(x @ x / x.shape[0], axis_name)
  return x, {"norm": jax.numpy.linalg.norm(x)}


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_split_cpu_runs_one_step_at_a_time(backend):
  """On devices split from one CPU a step returns computed outputs (the next
  one then cannot hold pool threads its collectives wait on); one device
  keeps JAX's asynchronous dispatch."""
  assert not parallel.DataParallel(backend, jax.devices()[:1]
                                   ).waits_for_each_step
  dp = parallel.DataParallel(backend)
  assert dp.waits_for_each_step
  state = np.eye(1024, dtype=np.float32)
  batch = dp.shard_batch({"x": np.ones((dp.num_devices, 1), np.float32)})["x"]
  for step in (dp.train_step(_slow_step), dp.eval_step(_slow_step)):
    jax.block_until_ready(step(dp.replicate(state), batch))  # Compiles.
    outputs = step(dp.replicate(state), batch)
    assert all(x.is_ready() for x in jax.tree.leaves(outputs))
    assert step.lower(dp.replicate(state), batch).compile() is not None
