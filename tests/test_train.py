"""End to end through ``python -m mmjax.main``: the workdir contract and exact
resumption after ``kill -9``."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from mmjax import checkpoint as checkpoint_lib
from mmjax import metrics as metrics_lib

import e2e


@pytest.fixture(scope="module")
def runlocal(tmp_path_factory, data_dir):
  """``(workdir, stdout)`` of one runlocal run, shared by the tests below."""
  workdir = tmp_path_factory.mktemp("runlocal") / "run"
  return workdir, e2e.run(e2e.command(workdir, data_dir)).stdout


@pytest.mark.slow
def test_two_runs_with_the_same_seed_log_identical_metrics(tmp_path, data_dir,
                                                           runlocal):
  first, _ = runlocal
  e2e.run(e2e.command(tmp_path / "again", data_dir))
  assert e2e.history(first) == e2e.history(tmp_path / "again")
  other_seed = tmp_path / "other_seed"
  e2e.run(e2e.command(other_seed, data_dir, "--config.seed=1"))
  assert e2e.history(first) != e2e.history(other_seed)  # The seed matters.


@pytest.mark.slow
def test_runlocal_writes_the_workdir_contract(runlocal, data_dir):
  workdir, stdout = runlocal
  assert "Done: 6 steps" in stdout

  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["fusion"]["name"] == "film"
  assert config["model"]["encoders"]["image"]["features"] == [8, 16]

  records = metrics_lib.read_metrics(str(workdir))
  train = [r for r in records if r["split"] == "train"]
  assert train and all({"step", "loss", "accuracy", "learning_rate",
                        "grad_norm", "examples_per_sec"} <= set(r) for r in train)
  for split in ("validation", "test"):
    final = [r for r in records if r["split"] == split and r["step"] == 6]
    assert len(final) == 1 and {"loss", "accuracy"} <= set(final[0])

  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == 6 and results["num_params"] > 0
  assert results["train_seconds"] > 0 and results["examples_per_sec"] > 0
  costs = results["complexity"]
  assert (costs["train_flops_per_example"] >
          costs["inference_flops_per_example"] > 0)
  assert costs["train_compile_seconds"] > 0 and costs["eval_compile_seconds"] > 0
  assert costs["train_step_peak_bytes"] > 0
  assert costs["peak_memory_bytes"] is None  # CPU keeps no statistics.
  for split in ("validation", "test"):
    assert 0.0 <= results[split]["accuracy"] <= 1.0
    assert np.isfinite(results[split]["loss"])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert os.listdir(workdir / "tb")
  assert (workdir / "vocab" / "question.json").exists()

  # The same command again finds the finished run and does not train more.
  again = e2e.run(e2e.command(workdir, data_dir))
  assert "Resuming from checkpoint at step 6" in again.stdout


def _wait_for_checkpoint_then_kill(process, workdir, min_step):
  deadline = time.time() + 300
  while process.poll() is None and time.time() < deadline:
    steps = e2e.checkpoint_steps(workdir)
    if steps and max(steps) >= min_step:
      process.send_signal(signal.SIGKILL)
      process.wait()
      return max(steps)
    time.sleep(0.005)
  raise AssertionError("the run ended before it could be killed; "
                       f"stdout: {process.communicate()[0][-2000:]}")


@pytest.mark.slow
def test_cpu_devices_splits_the_host_and_the_run_resumes_on_others(tmp_path,
                                                                  data_dir):
  workdir = tmp_path / "run"
  first = e2e.run(e2e.command(workdir, data_dir, "--config.train.steps=10",
                              "--config.checkpoint.every_steps=10",
                              "--config.train.log_every_steps=10",
                              "--config.parallel.cpu_devices=2"))
  assert "on 2 device(s)" in first.stdout  # Not the environment's four.
  first_results = (workdir / "results.json").read_text()
  resumed = e2e.run(e2e.command(workdir, data_dir, "--config.train.steps=20",
                                "--config.checkpoint.every_steps=10",
                                "--config.train.log_every_steps=10"))
  assert "Resuming from checkpoint at step 10." in resumed.stdout
  assert "on 4 device(s)" in resumed.stdout
  # train_seconds counts from step 0: the first run's time, then the rest.
  first_seconds = json.loads(first_results)["train_seconds"]
  train = [r for r in metrics_lib.read_metrics(str(workdir))
           if r["split"] == "train"]
  assert [r["step"] for r in train] == [10, 20]
  assert train[0]["train_seconds"] == first_seconds
  results = json.loads((workdir / "results.json").read_text())
  assert results["train_seconds"] == train[1]["train_seconds"] > first_seconds


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, data_dir,
                                                        backend):
  overrides = ["--config.train.steps=150", "--config.checkpoint.every_steps=10",
               "--config.train.log_every_steps=5",
               "--config.train.eval_every_steps=1000",
               f"--config.parallel.backend={backend}"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  e2e.run(e2e.command(straight, data_dir, *overrides))

  process = subprocess.Popen(e2e.command(resumed, data_dir, *overrides),
                             cwd=e2e.ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  killed_after = _wait_for_checkpoint_then_kill(
      process, resumed, min_step=30)
  assert process.returncode == -signal.SIGKILL
  assert not (resumed / "results.json").exists()
  result = e2e.run(e2e.command(resumed, data_dir, *overrides))
  assert "Resuming from checkpoint at step" in result.stdout
  resumed_from = int(result.stdout.split("Resuming from checkpoint at step ")[1]
                     .split(".")[0])
  # A checkpoint may have completed between the last look and the kill.
  assert killed_after <= resumed_from < 150

  params_a, stats_a, step_a = checkpoint_lib.load_params(str(straight))
  params_b, stats_b, step_b = checkpoint_lib.load_params(str(resumed))
  assert step_a == step_b == 150
  for a, b in zip(*map(e2e.leaves, (params_a, params_b)), strict=True):
    np.testing.assert_array_equal(a, b)  # Bit for bit.
  for a, b in zip(*map(e2e.leaves, (stats_a, stats_b)), strict=True):
    np.testing.assert_array_equal(a, b)

  assert e2e.history(straight) == e2e.history(resumed)
  assert json.loads((straight / "results.json").read_text())["test"] == \
      json.loads((resumed / "results.json").read_text())["test"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path,
                                                                 data_dir):
  workdir = tmp_path / "run"
  command = e2e.command(workdir, data_dir, "--config.train.steps=100000",
                        "--config.checkpoint.every_steps=100000",
                        "--config.train.eval_every_steps=100000",
                        "--config.train.log_every_steps=10")
  process = subprocess.Popen(command, cwd=e2e.ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
  assert "Received SIGTERM: checkpoint " in output
  saved = int(output.split("Received SIGTERM: checkpoint ")[1].split()[0])
  listing = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  assert os.listdir(workdir / "checkpoints") == [str(saved)], (
      f"workdir after SIGTERM: {listing}\noutput:\n{output[-3000:]}")

  result = e2e.run(e2e.command(workdir, data_dir,
                               f"--config.train.steps={saved + 2}"))
  assert f"Resuming from checkpoint at step {saved}." in result.stdout
  assert f"Done: {saved + 2} steps" in result.stdout


@pytest.mark.slow
def test_nan_loss_stops_the_run_before_any_checkpoint(tmp_path, data_dir):
  workdir = tmp_path / "run"
  pp = ("normalize(key='image', std=0.0)|tokenize(key='question', max_len=16)"
        "|keep(keys=('image', 'question', 'question_mask', 'answer'))")
  result = subprocess.run(
      e2e.command(workdir, data_dir, f"--config.input.pp_train={pp}"),
      cwd=e2e.ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  assert "NonFiniteError: Non-finite loss=nan in the steps up to 2." in result.stderr
  assert (workdir / "checkpoints").is_dir()
  assert not e2e.checkpoint_steps(workdir)
  assert not (workdir / "results.json").exists()
