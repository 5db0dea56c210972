"""SIGTERM/SIGINT wherever they land: the run saves the step it stopped at,
that step is on disk, and the message says so.

Each signal is sent by the run itself at a chosen point (inside a train step's
input, a log write, an evaluation, a save, the final evaluation), so what is
tested does not depend on timing.
"""

import os
import signal

import pytest

from mmjax import checkpoint as checkpoint_lib
from mmjax import metrics as metrics_lib
from mmjax import train
from mmjax.data import pipeline

import e2e
from e2e import load_experiment

# Checkpoints every 5 steps, validation every 4, logs every 2: a signal at a
# step that is none of these must still leave that step on disk.
STEPS = 12


def _config(data_dir):
  config = load_experiment().get_config("runlocal")
  config.dataset.data_dir = data_dir
  for key, value in e2e.SMALL_MODEL.items():
    section, _, name = key.rpartition(".")
    config[section][name] = value
  config.train.update(steps=STEPS, log_every_steps=2, eval_every_steps=4)
  config.checkpoint.every_steps = 5
  return config


def _send(*signums):
  for signum in signums:
    os.kill(os.getpid(), signum)


def _signal_at_batch(monkeypatch, index, *signums):
  """Sends ``signums`` when the train loop reads batch ``index`` (0-based
  within this run), i.e. during step ``index + 1``."""
  iterate_from = pipeline.iterate_from

  def iterate_and_signal(*args, **kwargs):
    for i, batch in enumerate(iterate_from(*args, **kwargs)):
      if i == index:
        _send(*signums)
      yield batch

  monkeypatch.setattr(pipeline, "iterate_from", iterate_and_signal)


def _signal_during_eval(monkeypatch, split, occurrence, *signums):
  """Sends ``signums`` after the first batch of the ``occurrence``-th
  evaluation of ``split``."""
  eval_batches, seen = pipeline.eval_batches, []

  def eval_batches_and_signal(dataset, input, pp, eval_split, **kwargs):
    if eval_split == split:
      seen.append(eval_split)
    for i, batch in enumerate(eval_batches(dataset, input, pp, eval_split,
                                           **kwargs)):
      yield batch
      if eval_split == split and len(seen) == occurrence and i == 0:
        _send(*signums)

  monkeypatch.setattr(pipeline, "eval_batches", eval_batches_and_signal)


def _signal_during_save(monkeypatch, step, *signums):
  """Sends ``signums`` right after the async save of ``step`` started."""
  save = checkpoint_lib.Checkpointer.save

  def save_and_signal(self, save_step, *args):
    save(self, save_step, *args)
    if save_step == step:
      _send(*signums)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save_and_signal)


def _signal_while_logging(monkeypatch, step, *signums):
  write = metrics_lib.MetricWriter.write

  def write_and_signal(self, write_step, split, metrics):
    if write_step == step and split == "train":
      _send(*signums)
    write(self, write_step, split, metrics)

  monkeypatch.setattr(metrics_lib.MetricWriter, "write", write_and_signal)


def _signal_after_restoring(monkeypatch, *signums):
  """Sends ``signums`` once the handlers are in place, before any step."""
  restore = checkpoint_lib.Checkpointer.restore_latest

  def restore_and_signal(self, *args):
    restored = restore(self, *args)
    _send(*signums)
    return restored

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore_latest",
                      restore_and_signal)


def _stop(config, workdir, capsys):
  """Runs until the signal stops the run: ``(exit code, output)``."""
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    with pytest.raises(SystemExit) as stopped:
      train.train_and_evaluate(config, str(workdir))
    # The process is exiting: later signals must not kill it on the way out.
    assert all(signal.getsignal(s) == signal.SIG_IGN for s in handlers)
  finally:
    for sig, handler in handlers.items():  # Pytest's own, for what follows.
      signal.signal(sig, handler)
  return stopped.value.code, capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("where, stopped_at, on_disk", [
    ("train_step", 7, [5, 7]),    # Between checkpoints, evaluations, logs.
    ("logging", 2, [2]),
    ("evaluation", 4, [4]),       # The lost checkpoint of issue 11.
    ("async_save", 5, [5]),
    ("before_the_first_step", 0, [0]),
])
def test_sigterm_leaves_the_step_it_reports_on_disk(
    tmp_path, data_dir, monkeypatch, capsys, where, stopped_at, on_disk):
  term = signal.SIGTERM
  {"train_step": lambda: _signal_at_batch(monkeypatch, 6, term),
   "logging": lambda: _signal_while_logging(monkeypatch, 2, term),
   "evaluation": lambda: _signal_during_eval(monkeypatch, "validation", 1,
                                             term),
   "async_save": lambda: _signal_during_save(monkeypatch, 5, term),
   "before_the_first_step": lambda: _signal_after_restoring(monkeypatch, term),
  }[where]()
  code, output = _stop(_config(data_dir), tmp_path, capsys)
  assert code == 128 + signal.SIGTERM
  assert (f"Received SIGTERM: checkpoint {stopped_at} is on disk (step "
          f"{stopped_at} of {STEPS}); stopped.") in output
  assert e2e.checkpoint_steps(tmp_path) == on_disk
  last = metrics_lib.read_metrics(str(tmp_path))[-1] if stopped_at else None
  assert stopped_at == 0 or last["step"] == stopped_at  # Logged up to there.


@pytest.mark.slow
def test_sigint_and_a_second_signal_behave_like_one_sigterm(
    tmp_path, data_dir, monkeypatch, capsys):
  _signal_during_eval(monkeypatch, "validation", 2, signal.SIGINT,
                      signal.SIGTERM, signal.SIGINT)
  code, output = _stop(_config(data_dir), tmp_path / "run", capsys)
  assert code == 128 + signal.SIGINT
  assert "Received SIGINT: checkpoint 8 is on disk (step 8 of 12)" in output
  assert e2e.checkpoint_steps(tmp_path / "run") == [5, 8]

  monkeypatch.undo()
  results = train.train_and_evaluate(_config(data_dir), str(tmp_path / "run"))
  assert "Resuming from checkpoint at step 8." in capsys.readouterr().out
  assert results["steps"] == STEPS


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation_lets_the_run_finish(
    tmp_path, data_dir, monkeypatch, capsys):
  _signal_during_eval(monkeypatch, "test", 1, signal.SIGTERM)
  handler = signal.getsignal(signal.SIGTERM)
  try:
    results = train.train_and_evaluate(_config(data_dir), str(tmp_path))
  finally:
    signal.signal(signal.SIGTERM, handler)
  assert results["steps"] == STEPS and "test" in results
  assert (tmp_path / "results.json").exists()
  assert e2e.checkpoint_steps(tmp_path)[-1] == STEPS
  assert "Done: 12 steps" in capsys.readouterr().out
