"""Several hosts, simulated by 2 processes on this machine (2 CPU devices
each, JAX's distributed runtime over localhost): the same run as one process
with 4 devices, checkpoints written once and resumable on either layout, and
a signal to one process stopping all of them at the same step."""

import json
import os
import re
import signal

import jax
import numpy as np
import pytest

from mmjax import checkpoint as checkpoint_lib
from mmjax import parallel

import e2e

# runlocal's 6 steps (checkpoints at 3 and 6), with SGD and momentum at a
# constant learning rate: the all-reduce summed in another order moves the
# parameters by float32 noise, at most 1.5e-8 after 6 steps (measured on a
# Zen 4 CPU with AVX-512). AdamW would amplify that noise where a gradient is
# near zero (its step is about lr whatever the gradient's size): there the
# two layouts were bit-equal after 1 step, 3e-8 apart after 2 and 2.4e-4
# after 6. A schedule that does not depend on train.steps lets a run stop
# early and continue with more steps.
STEPS = 6
SGD_CONSTANT_LR = ["--config.optim.name=sgd",
                   "--config.optim.learning_rate=0.05",
                   "--config.optim.schedule=constant"]


def _command(workdir, data_dir, *overrides):
  return e2e.command(workdir, data_dir, *SGD_CONSTANT_LR, *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """The run on one process with 4 devices (conftest's XLA_FLAGS)."""
  workdir = tmp_path_factory.mktemp("one_process") / "run"
  e2e.run(_command(workdir, data_dir))
  return workdir


def _assert_same_run(workdir, reference_dir):
  """Same final parameters, BatchNorm statistics and test metrics, to float32
  reduction-order noise (the all-reduce sums in another order)."""
  params, stats, step = checkpoint_lib.load_params(str(workdir))
  ref_params, ref_stats, ref_step = checkpoint_lib.load_params(
      str(reference_dir))
  assert step == ref_step == STEPS
  for a, b in zip(e2e.leaves(params) + e2e.leaves(stats),
                  e2e.leaves(ref_params) + e2e.leaves(ref_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  test = json.loads((workdir / "results.json").read_text())["test"]
  ref_test = json.loads((reference_dir / "results.json").read_text())["test"]
  assert test["accuracy"] == ref_test["accuracy"]
  assert test["loss"] == pytest.approx(ref_test["loss"], rel=1e-5)


def _written_once(workdir):
  """Every checkpoint's state was written by process 0 alone."""
  for step in os.listdir(workdir / "checkpoints"):
    state = workdir / "checkpoints" / step / "state"
    assert sorted(p for p in os.listdir(state) if p.startswith("ocdbt")) == [
        "ocdbt.process_0"]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices(
    tmp_path, data_dir, reference):
  workdir = tmp_path / "run"
  command = _command(workdir, data_dir, "--config.parallel.backend=shard_map")
  job = e2e.Job([command] * 2, tmp_path / "logs", devices_per_process=2)
  for code, output in job.finish():
    assert code == 0, output[-3000:]
    assert "on 4 device(s) (shard_map)" in output
  _assert_same_run(workdir, reference)
  _written_once(workdir)
  # One metrics history (process 0 writes it), with the reference's entries.
  assert ([(r["step"], r["split"]) for r in e2e.history(workdir)] ==
          [(r["step"], r["split"]) for r in e2e.history(reference)])


def _stopped_at(outputs):
  steps = {int(m) for _, out in outputs for m in
           re.findall(r"checkpoint (\d+) is on disk", out)}
  assert len(steps) == 1, [out[-2000:] for _, out in outputs]
  return steps.pop()


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(tmp_path, data_dir,
                                                         reference):
  workdir = tmp_path / "run"
  job = e2e.Job([_command(workdir, data_dir, "--config.train.steps=3")] * 2,
                tmp_path / "logs", devices_per_process=2)
  for code, output in job.finish():  # pmap
    assert code == 0, output[-3000:]
  _written_once(workdir)
  result = e2e.run(_command(workdir, data_dir))
  assert "Resuming from checkpoint at step 3." in result.stdout
  _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path,
                                                            data_dir):
  workdir = tmp_path / "run"
  # Long enough that a signal sent as training starts is acted on (about a
  # second later, at JAX's preemption sync point) well before the end.
  command = _command(workdir, data_dir, "--config.train.steps=100000",
                     "--config.checkpoint.every_steps=100000")

  # SIGTERM to process 1 only: both save the same step and stop.
  job = e2e.Job([command] * 2, tmp_path / "first", devices_per_process=2)
  job.wait_for(1, "Training")
  job.processes[1].send_signal(signal.SIGTERM)
  outputs = job.finish()
  assert [code for code, _ in outputs] == [128 + signal.SIGTERM] * 2, outputs
  first_stop = _stopped_at(outputs)
  assert os.listdir(workdir / "checkpoints") == [str(first_stop)]
  _written_once(workdir)

  # Ctrl-C (SIGINT) to process 0 of the resumed job: passed on, the same.
  job = e2e.Job([command] * 2, tmp_path / "second", devices_per_process=2)
  job.wait_for(0, "Training")
  job.processes[0].send_signal(signal.SIGINT)
  outputs = job.finish()
  assert [code for code, _ in outputs] == [128 + signal.SIGINT,
                                           128 + signal.SIGTERM], outputs
  assert all(f"Resuming from checkpoint at step {first_stop}." in out
             for _, out in outputs)
  assert _stopped_at(outputs) > first_stop


@pytest.mark.slow
def test_a_workdir_that_another_process_cannot_see_is_refused(tmp_path,
                                                              data_dir):
  """Per-host workdirs, as if each host had its own local disk."""
  job = e2e.Job([_command(tmp_path / f"host_{i}", data_dir) for i in (0, 1)],
                tmp_path / "logs", devices_per_process=2)
  for code, output in job.finish():
    assert code != 0
    assert re.search(r"Process\(es\) 1 do not see workdir .*host_\d .*storage "
                     "that every host mounts", output), output[-3000:]
  assert not os.path.exists(tmp_path / "host_0" / "checkpoints")


@pytest.mark.parametrize("env, error", [
    ({"JAX_NUM_PROCESSES": "2"},
     "Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     "JAX_COORDINATOR_ADDRESS is not"),
])
def test_an_incomplete_multi_host_environment_says_what_is_missing(
    monkeypatch, env, error):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=error):
    parallel.initialize_distributed()


def test_a_single_host_does_not_start_the_distributed_runtime(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: pytest.fail("initialize was called"))
  parallel.initialize_distributed()
