"""``mmjax.complexity``: FLOPs per example and memory from XLA's analyses, and
the ahead-of-time compilation the steps' calls reuse."""

import logging

import jax
import ml_collections
import numpy as np
import pytest

from mmjax import complexity
from mmjax import parallel
from mmjax import train
from mmjax.data import pipeline

import e2e


def _matmul_step(state, batch, axis_name):
  """``state [64, 64] += mean over devices of x^T x`` for ``x [batch, 64]``."""
  x_BxD = batch["x"]
  return state + jax.lax.pmean(x_BxD.T @ x_BxD, axis_name), {}


def _matmul_sums(state, batch, axis_name):
  """``sum over devices of sum(x @ state)``."""
  return {"sum": jax.lax.psum((batch["x"] @ state).sum(), axis_name)}


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_flops_count_one_devices_share(backend):
  matmul_flops = 2 * 256 * 64 * 64  # The global batch's x^T x.
  for num_devices in (1, 4):
    dp = parallel.DataParallel(backend, devices=jax.devices()[:num_devices])
    state = dp.replicate(np.zeros((64, 64), np.float32))
    batch = dp.shard_batch({"x": np.ones((256, 64), np.float32)})
    compiled = complexity.compile_ahead(dp.train_step(_matmul_step), state,
                                        batch)
    assert complexity.flops_of(compiled.program) * num_devices == (
        pytest.approx(matmul_flops, rel=0.05))
    assert compiled.seconds > 0


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_step_calls_reuse_the_ahead_of_time_programs(backend, caplog):
  dp = parallel.DataParallel(backend)
  train_step = dp.train_step(_matmul_step)
  eval_step = dp.eval_step(_matmul_sums)
  state = dp.replicate(np.zeros((64, 64), np.float32))
  batch = dp.shard_batch({"x": np.ones((16, 64), np.float32)})
  complexity.compile_ahead(eval_step, state, batch)
  complexity.compile_ahead(train_step, state, batch)
  with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
    sums = eval_step(state, batch)
    for _ in range(2):
      state, _ = train_step(state, batch)
    jax.block_until_ready((state, sums))
  compiled = [r.getMessage() for r in caplog.records
              if "Compiling" in r.getMessage()]
  # pmap's metrics are unreplicated (a slice) outside the program.
  assert not [c for c in compiled if "squeeze" not in c], compiled


class _Program:
  """What ``flops_of`` reads of a ``jax.stages.Compiled``."""

  def __init__(self, analysis):
    self.analysis = analysis

  def cost_analysis(self):
    return self.analysis

  def memory_analysis(self):
    return None  # As a backend without one answers.


@pytest.mark.parametrize("analysis, flops", [
    ({"flops": 6.0, "bytes accessed": 8.0}, 6.0),  # Recent jax.
    ([{"flops": 6.0}], 6.0),                        # Older: one per module.
    ([{"flops": 2.0}, {"flops": 4.0}], 6.0),
    (None, None),                                   # Backend without one.
    ({"bytes accessed": 8.0}, None),
    ({"flops": 0.0}, None),
])
def test_flops_of_reads_every_form_of_cost_analysis(analysis, flops):
  assert complexity.flops_of(_Program(analysis)) == flops


def test_report_divides_by_the_examples_of_one_seed():
  train_step = complexity.CompiledStep(_Program({"flops": 600.0}), 2.0)
  eval_step = complexity.CompiledStep(_Program({"flops": 90.0}), 1.0)
  record = complexity.report(train_step, eval_step, train_examples=6,
                             eval_examples=3, devices=jax.devices("cpu"))
  assert record["train_flops_per_example"] == 100.0
  assert record["inference_flops_per_example"] == 30.0
  assert record["train_compile_seconds"] == 2.0
  assert record["eval_compile_seconds"] == 1.0
  assert record["train_step_peak_bytes"] is None  # No memory_analysis.
  assert record["peak_memory_bytes"] is None  # CPU keeps no statistics.


def _model_costs(data_dir, batch_size: int, **overrides):
  """``results.json``'s complexity of a small late-fusion mm_shapes model at
  ``batch_size`` (train and eval) on one device, without training."""
  config = e2e.small_config(data_dir, **{
      "input.batch_size": batch_size, "eval.batch_size": batch_size,
      "model.fusion": ml_collections.ConfigDict(dict(name="concat",
                                                     hidden=(32,))),
      **overrides})
  jax.config.update("jax_default_prng_impl", config.rng_impl)
  dp = parallel.DataParallel(config.parallel.backend,
                             devices=jax.devices()[:1])
  builder = train.prepare_dataset(config.dataset)
  preprocessing = pipeline.Preprocessing.parse(config.input)
  vocabularies = {key: pipeline.build_vocabulary(config.dataset, config.input,
                                                 key)
                  for key in preprocessing.text_keys}
  trainer = train.build_trainer(config, dp, vocabularies, builder,
                                preprocessing)
  state = dp.replicate(trainer.host_state)
  programs = train.compile_steps(trainer, dp, state, config)
  return train.complexity_of(programs, dp, config, len(trainer.seeds.values))


@pytest.mark.slow
def test_model_flops_scale_with_the_batch(data_dir):
  costs = {b: _model_costs(data_dir, b) for b in (8, 16, 32)}
  # A train step's FLOPs are affine in the batch: per example (forward and
  # backward) plus the optimizer's update, once per step (and per device:
  # every replica applies it).
  step_flops = {b: c["train_flops_per_example"] * b for b, c in costs.items()}
  per_example = (step_flops[32] - step_flops[16]) / 16
  assert per_example > 0
  assert step_flops[16] - step_flops[8] == pytest.approx(8 * per_example,
                                                         rel=0.02)
  update = step_flops[8] - 8 * per_example
  assert update > 0
  # Inference has no per-step part.
  inference = costs[8]["inference_flops_per_example"]
  assert inference > 0
  for c in costs.values():
    assert c["inference_flops_per_example"] == pytest.approx(inference,
                                                             rel=0.02)
  # Backward and forward: about 3x the forward pass.
  assert 2 < per_example / inference < 4
  assert (costs[32]["train_step_peak_bytes"] >
          costs[8]["train_step_peak_bytes"] > 0)
  # Two seeds in one program: one model's cost per example is the same.
  two_seeds = _model_costs(data_dir, 8, **{"train.num_seeds": 2})
  assert two_seeds["train_flops_per_example"] == pytest.approx(
      costs[8]["train_flops_per_example"], rel=0.02)
