"""``python -m mmjax.bench``: its JSON record, and the FLOP count and ahead-of-
time compilation it relies on."""

import json
import logging
import sys

import jax
import numpy as np
import pytest

from mmjax import bench
from mmjax import parallel

import e2e

RECORD_KEYS = {"experiment", "backend", "devices", "device_kind", "batch_size",
               "num_seeds", "examples_per_sec", "examples_per_sec_per_seed",
               "ms_per_step", "compile_seconds",
               "flops_per_step", "achieved_gflops", "matmul_gflops",
               "fraction_of_matmul", "pipeline_examples_per_sec",
               "peak_memory_bytes"}


@pytest.mark.slow
def test_bench_prints_one_json_record(data_dir):
  result = e2e.run([sys.executable, "-m", "mmjax.bench",
                    "--config=experiments/mm_shapes.py:runlocal",
                    f"--config.dataset.data_dir={data_dir}",
                    *e2e.flags(e2e.SMALL_MODEL), "--batch_size=8",
                    "--steps=2", "--warmup=1", "--repeats=2",
                    "--pipeline_batches=3", "--config.train.num_seeds=2"])
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout  # Progress goes to stderr.
  record = json.loads(lines[0])
  assert set(record) == RECORD_KEYS
  assert record["experiment"] == "experiments/mm_shapes.py:runlocal"
  assert record["batch_size"] == 8  # --batch_size, not runlocal's 16.
  assert record["backend"] == "cpu" and record["devices"] == 4
  assert record["peak_memory_bytes"] is None  # CPU keeps no statistics.
  for key in ("examples_per_sec", "ms_per_step", "compile_seconds",
              "flops_per_step", "matmul_gflops", "pipeline_examples_per_sec"):
    assert record[key] > 0, key
  assert record["num_seeds"] == 2
  assert record["examples_per_sec_per_seed"] == pytest.approx(
      8 / (record["ms_per_step"] / 1e3))
  assert record["examples_per_sec"] == pytest.approx(
      2 * record["examples_per_sec_per_seed"])
  assert record["achieved_gflops"] == pytest.approx(
      record["flops_per_step"] / (record["ms_per_step"] / 1e3) / 1e9)
  assert record["fraction_of_matmul"] == pytest.approx(
      record["achieved_gflops"] / 4 / record["matmul_gflops"])


def _matmul_step(state, batch, axis_name):
  """``state [64, 64] += mean over devices of x^T x`` for ``x [batch, 64]``."""
  x_BxD = batch["x"]
  return state + jax.lax.pmean(x_BxD.T @ x_BxD, axis_name), {}


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_flops_per_step_counts_every_device(backend):
  matmul_flops = 2 * 256 * 64 * 64  # The global batch's x^T x.
  flops = {}
  for num_devices in (1, 4):
    dp = parallel.DataParallel(backend, devices=jax.devices()[:num_devices])
    state = dp.replicate(np.zeros((64, 64), np.float32))
    batch = dp.shard_batch({"x": np.ones((256, 64), np.float32)})
    compiled = dp.train_step(_matmul_step).lower(state, batch).compile()
    flops[num_devices] = bench.flops_of(compiled) * num_devices
  assert flops[1] == pytest.approx(flops[4], rel=0.05)
  assert flops[1] == pytest.approx(matmul_flops, rel=0.05)


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_timed_steps_reuse_the_ahead_of_time_compilation(backend, caplog):
  dp = parallel.DataParallel(backend)
  step = dp.train_step(_matmul_step)
  state = dp.replicate(np.zeros((64, 64), np.float32))
  batch = dp.shard_batch({"x": np.ones((16, 64), np.float32)})
  step.lower(state, batch).compile()
  with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
    seconds = bench.seconds_per_step(step, state, batch, steps=2, warmup=1,
                                     repeats=2)
  assert seconds > 0
  compiles = [r.getMessage() for r in caplog.records
              if "Compiling" in r.getMessage()]
  assert not compiles


class _Compiled:
  def __init__(self, analysis):
    self.analysis = analysis

  def cost_analysis(self):
    return self.analysis


@pytest.mark.parametrize("analysis, flops", [
    ({"flops": 6.0, "bytes accessed": 8.0}, 6.0),  # Recent jax.
    ([{"flops": 6.0}], 6.0),                        # Older: one per module.
    ([{"flops": 2.0}, {"flops": 4.0}], 6.0),
    (None, None),                                   # Backend without one.
    ({"bytes accessed": 8.0}, None),
    ({"flops": 0.0}, None),
])
def test_flops_of_reads_every_form_of_cost_analysis(analysis, flops):
  assert bench.flops_of(_Compiled(analysis)) == flops
