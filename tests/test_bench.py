"""``python -m mmjax.bench``: its JSON record (the FLOP count and ahead-of-time
compilation it relies on are tested in ``test_complexity.py``)."""

import json
import sys

import pytest

import e2e

RECORD_KEYS = {"experiment", "backend", "devices", "device_kind", "batch_size",
               "num_seeds", "examples_per_sec", "examples_per_sec_per_seed",
               "ms_per_step", "compile_seconds",
               "flops_per_step", "achieved_gflops", "matmul_gflops",
               "fraction_of_matmul", "pipeline_examples_per_sec",
               "train_step_peak_bytes", "peak_memory_bytes"}


@pytest.mark.slow
def test_bench_prints_one_json_record(data_dir):
  result = e2e.run([sys.executable, "-m", "mmjax.bench",
                    "--config=experiments/mm_shapes.py:runlocal",
                    f"--config.dataset.data_dir={data_dir}",
                    *e2e.flags(e2e.SMALL_MODEL), "--batch_size=8",
                    "--steps=2", "--warmup=1", "--repeats=2",
                    "--pipeline_batches=3", "--config.train.num_seeds=2",
                    # Two devices where the tests' environment makes four.
                    "--config.parallel.cpu_devices=2"])
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout  # Progress goes to stderr.
  record = json.loads(lines[0])
  assert set(record) == RECORD_KEYS
  assert record["experiment"] == "experiments/mm_shapes.py:runlocal"
  assert record["batch_size"] == 8  # --batch_size, not runlocal's 16.
  assert record["backend"] == "cpu" and record["devices"] == 2
  assert record["peak_memory_bytes"] is None  # CPU keeps no statistics.
  for key in ("examples_per_sec", "ms_per_step", "compile_seconds",
              "flops_per_step", "matmul_gflops", "pipeline_examples_per_sec",
              "train_step_peak_bytes"):
    assert record[key] > 0, key
  assert record["num_seeds"] == 2
  assert record["examples_per_sec_per_seed"] == pytest.approx(
      8 / (record["ms_per_step"] / 1e3))
  assert record["examples_per_sec"] == pytest.approx(
      2 * record["examples_per_sec_per_seed"])
  assert record["achieved_gflops"] == pytest.approx(
      record["flops_per_step"] / (record["ms_per_step"] / 1e3) / 1e9)
  assert record["fraction_of_matmul"] == pytest.approx(
      record["achieved_gflops"] / 2 / record["matmul_gflops"])
