"""Evaluating runs: the best validation step's checkpoint
(``config.checkpoint.keep_best``), its bookkeeping across restarts and the
metrics reported there; ``python -m mmjax.evaluate`` and ``mmjax.load``."""

import json
import os
import sys

import jax
import numpy as np
import pytest

import mmjax
from mmjax import checkpoint as checkpoint_lib
from mmjax import config_lib
from mmjax import losses
from mmjax import metrics as metrics_lib
from mmjax import evaluate
from mmjax import train
from mmjax.data import pipeline
from mmjax.data import preprocess

import e2e
from helpers import keep_best_config


def _best(tmp_path, mode="max", metric="validation/accuracy"):
  return checkpoint_lib.BestCheckpoint(str(tmp_path / "best"), metric=metric,
                                       mode=mode)


def _state(value):
  return {"w": np.full((2, 3), value, np.float32)}


@pytest.mark.parametrize("mode, values, kept", [
    ("max", [0.5, 0.7, 0.7, 0.6, float("nan")], (1, 0.7)),
    ("min", [0.5, 0.7, 0.4, 0.4, float("inf")], (2, 0.4)),
])
def test_only_a_strictly_better_finite_value_replaces_the_kept_state(
    tmp_path, mode, values, kept):
  saved = []
  with _best(tmp_path, mode) as best:
    for step, value in enumerate(values):
      if best.update(step, value, lambda v=value: _state(v), {"c": 1}):
        saved.append(step)
    best.wait()
    restored = best.restore(_state(0.0))
  assert saved == [0, 1] if mode == "max" else saved == [0, 2]
  step, value = kept
  assert (best.record["step"], best.record["value"]) == (step, value)
  np.testing.assert_array_equal(restored["w"], _state(value)["w"])
  # max_to_keep=1: only the kept step is on disk.
  assert os.listdir(tmp_path / "best") == [str(step)]


def test_the_state_is_copied_only_when_it_is_saved(tmp_path):
  calls = []
  with _best(tmp_path) as best:
    best.update(1, 0.5, lambda: calls.append(1) or _state(0.5), {})
    best.update(2, 0.4, lambda: calls.append(2) or _state(0.4), {})
  assert calls == [1]


def test_the_record_survives_a_restart_unless_the_metric_changed(tmp_path):
  with _best(tmp_path) as best:
    best.update(4, 0.8, lambda: _state(0.8), {})
  with _best(tmp_path) as resumed:  # As a resumed run opens it.
    assert resumed.record == {"step": 4, "metric": "validation/accuracy",
                              "value": 0.8, "mode": "max"}
    assert not resumed.is_better(0.75) and resumed.is_better(0.85)
  with _best(tmp_path, "min", "validation/loss") as other:
    assert other.record is None and other.is_better(3.0)


def test_metric_names_are_what_evaluation_returns():
  batch = {"a": np.array([0, 1]), "b": np.array([1, 1])}
  for heads in (["x"], ["x", "y"]):
    logits = {h: np.zeros((2, 3), np.float32) for h in heads}
    targets = {h: losses.Task("a" if i == 0 else "b")
               for i, h in enumerate(heads)}
    terms = losses.head_terms(logits, batch, targets)
    assert sorted(losses.metric_names(targets)) == sorted(terms)


def test_keep_best_names_a_metric_the_run_evaluates(data_dir):
  config = keep_best_config(data_dir)
  config.checkpoint.keep_best = "test/accuracy"
  with pytest.raises(ValueError, match="Valid: validation/accuracy, "
                     "validation/loss"):
    config_lib.validate_config(config)
  config.checkpoint.keep_best, config.checkpoint.best_mode = (
      "validation/loss", "lowest")
  with pytest.raises(ValueError, match="best_mode 'lowest'.*auto, max, min"):
    config_lib.validate_config(config)
  config.checkpoint.best_mode = "auto"
  assert config_lib.best_mode(config) == "min"
  config.checkpoint.keep_best = "validation/accuracy"
  assert config_lib.best_mode(config) == "max"


@pytest.fixture(autouse=True)
def _restore_prng_impl():
  before = jax.config.jax_default_prng_impl
  yield
  jax.config.update("jax_default_prng_impl", before)


def _validation_history(workdir):
  return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir)
          if r["split"] == "validation"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, data_dir):
  """``(workdir, results, uninterrupted results)`` of a run keeping its best
  validation loss, stopped at step 4 and resumed to 8, and of the same run
  without the stop."""
  before = jax.config.jax_default_prng_impl
  overrides = {"checkpoint.keep_best": "validation/loss"}
  root = tmp_path_factory.mktemp("evaluate")
  uninterrupted = train.train_and_evaluate(
      keep_best_config(data_dir, **overrides), str(root / "uninterrupted"))
  workdir = str(root / "run")
  train.train_and_evaluate(
      keep_best_config(data_dir, **overrides, **{"train.steps": 4}), workdir)
  results = train.train_and_evaluate(keep_best_config(data_dir, **overrides),
                                     workdir)
  jax.config.update("jax_default_prng_impl", before)
  return workdir, results, uninterrupted


@pytest.mark.slow
def test_a_resumed_run_reports_the_best_step_of_its_whole_history(
    resumed_run):
  workdir, results, uninterrupted = resumed_run
  history = _validation_history(workdir)
  assert [s for s, _ in history] == [2, 4, 6, 8]
  best_step, best_loss = min(history, key=lambda h: h[1])  # First of ties.
  best = results["best"]
  assert (best["step"], best["metric"]) == (best_step, "validation/loss")
  assert best["value"] == pytest.approx(best_loss, abs=1e-6)
  # Evaluated again from the best state: the same validation loss.
  assert best["validation"]["loss"] == pytest.approx(best_loss, abs=1e-6)
  assert set(best["test"]) == {"accuracy", "loss"}
  assert os.listdir(os.path.join(workdir, "best_checkpoint")) == [
      str(best_step)]
  saved = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert saved["best"] == best
  # The stop changed nothing: the record written before it was kept, or
  # beaten, exactly as without the stop.
  assert best == uninterrupted["best"]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["best", "latest", 6])
def test_evaluate_restores_the_checkpoint_the_run_reported(resumed_run,
                                                           checkpoint):
  workdir, results, _ = resumed_run
  evaluation = evaluate.evaluate_run(workdir, checkpoint)
  expected = {"best": results["best"], "latest": results}.get(checkpoint)
  if checkpoint == 6:  # Validated during training, logged in metrics.jsonl.
    expected = {"validation": next(
        r for r in metrics_lib.read_metrics(workdir)
        if r["split"] == "validation" and r["step"] == 6)}
  for split, means in evaluation["splits"].items():
    if split in expected:
      for key in ("accuracy", "loss"):
        assert means[key] == pytest.approx(expected[split][key], abs=1e-5)
  assert set(evaluation["splits"]) == {"validation", "test"}
  on_disk = json.loads(open(os.path.join(workdir, "evaluation.json")).read())
  assert on_disk == json.loads(json.dumps(evaluation))


@pytest.mark.slow
def test_load_predicts_raw_examples_as_the_model_scores_them(resumed_run):
  workdir, results, _ = resumed_run
  config, predict = mmjax.load(workdir, checkpoint="best")
  assert predict.step == results["best"]["step"]
  source = pipeline.data_source(config.dataset, config.input, "test")
  raw = pipeline.read_batch(source, np.arange(len(source)))
  probabilities = predict({k: raw[k] for k in ("image", "question")})["answer"]
  # The model's own evaluation batches (preprocessed, with the question's
  # padding mask), scored by the restored model.
  preprocessing = pipeline.Preprocessing.parse(config.input)
  vocabularies = evaluate._vocabularies(workdir, preprocessing.text_keys)
  model = train.model_of(config, vocabularies,
                         pipeline.ensure_prepared(config.dataset),
                         axis_name=None)
  batches = list(pipeline.eval_batches(
      config.dataset, config.input,
      preprocess.build_pp(preprocessing.eval, vocabularies), "test",
      batch_size=config.eval.batch_size))
  logits = np.concatenate([
      model.apply(predict.variables, b, train=False)["answer"][b["_mask"]]
      for b in batches])
  np.testing.assert_allclose(probabilities, jax.nn.softmax(logits), rtol=1e-5,
                             atol=1e-6)
  accuracy = float(np.mean(probabilities.argmax(-1) == raw["answer"]))
  assert accuracy == pytest.approx(results["best"]["test"]["accuracy"],
                                   abs=1e-6)
  with pytest.raises(KeyError, match="lacks modalities \\['question'\\]"):
    predict({"image": raw["image"]})


def test_evaluate_names_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no run"):
    evaluate.run_config(str(tmp_path))


@pytest.mark.slow
def test_the_command_line_evaluates_the_splits_asked_for(resumed_run):
  workdir, results, _ = resumed_run
  out = e2e.run([sys.executable, "-m", "mmjax.evaluate",
                 f"--workdir={workdir}", "--checkpoint=latest",
                 "--splits=test"]).stdout
  evaluation = json.loads(open(os.path.join(workdir, "evaluation.json")).read())
  assert set(evaluation["splits"]) == {"test"}
  assert evaluation["splits"]["test"]["accuracy"] == pytest.approx(
      results["test"]["accuracy"], abs=1e-6)
  assert "test: accuracy" in out


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_a_run_killed_while_evaluating_evaluates_that_step_again(tmp_path,
                                                                 data_dir):
  """The checkpoint of an evaluation step is written after its evaluation,
  so resuming never skips one (nor the best checkpoint it might keep)."""
  config = keep_best_config(data_dir, **{"checkpoint.every_steps": 2})
  workdir = str(tmp_path / "run")
  eval_sums, evaluations = train.eval_sums, []

  def killed_at_the_second(*args, **kwargs):
    evaluations.append(1)
    if len(evaluations) == 2:  # The validation of step 4.
      raise _Killed()
    return eval_sums(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, "eval_sums", killed_at_the_second)
    with pytest.raises(_Killed):
      train.train_and_evaluate(config, workdir)
  assert e2e.checkpoint_steps(workdir) == [2]
  train.train_and_evaluate(config, workdir)
  assert [s for s, _ in _validation_history(workdir)] == [2, 4, 6, 8]
