"""Multi-task learning: each head's loss and metric, fixed and uncertainty
weighting (Kendall, Gal & Cipolla 2018), and a multi-task run end to end."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import config_lib, evaluate, losses, models, optim, steps, sweep
from mmjax import metrics as metrics_lib
from mmjax import train
from mmjax.data import mm_shapes

import e2e

B = 4
LOGITS_BxC = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -0.3],
                       [-1.5, 3.0, 0.0], [0.0, 0.0, 1.0]], np.float32)


def _log_softmax(x):
  x = x.astype(np.float64) - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_each_loss_matches_numpy():
  labels_B = np.array([0, 2, 1, 1])
  np.testing.assert_allclose(
      losses.softmax_xent(LOGITS_BxC, labels_B),
      -_log_softmax(LOGITS_BxC)[np.arange(B), labels_B], rtol=1e-5)
  multi_hot_BxC = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]],
                           np.float32)
  p = 1 / (1 + np.exp(-LOGITS_BxC.astype(np.float64)))
  np.testing.assert_allclose(
      losses.sigmoid_xent(LOGITS_BxC, multi_hot_BxC),
      -(multi_hot_BxC * np.log(p) + (1 - multi_hot_BxC) * np.log(1 - p)
        ).sum(-1), rtol=1e-5)
  values_B, targets_B = np.array([0.5, 2.0, -1.0, 3.0]), np.array([1., 2, 0, 5])
  np.testing.assert_allclose(losses.squared_error(values_B, targets_B),
                             [0.25, 0.0, 1.0, 4.0])
  np.testing.assert_allclose(losses.absolute_error(values_B, targets_B),
                             [0.5, 0.0, 1.0, 2.0])


def test_a_single_head_loss_is_optax_softmax_cross_entropy_exactly():
  labels_B = np.array([0, 2, 1, 1])
  tasks = {"answer": losses.Task("answer")}
  terms = losses.head_terms({"answer": jnp.asarray(LOGITS_BxC)},
                            {"answer": labels_B}, tasks)
  assert list(terms) == ["accuracy", "loss"] == losses.metric_names(tasks)
  np.testing.assert_array_equal(
      terms["loss"], optax.softmax_cross_entropy_with_integer_labels(
          jnp.asarray(LOGITS_BxC), labels_B))
  np.testing.assert_array_equal(terms["accuracy"], [1.0, 0.0, 1.0, 0.0])


def _three_tasks(weighting_weights=(1.0, 0.5, 2.0)):
  """A classifier, a multi-label head and a regression head, by hand."""
  outputs = {"answer": LOGITS_BxC,
             "tags": np.array([[1.0, -1.0], [-2.0, -0.5], [0.5, 0.5],
                               [-1.0, 2.0]], np.float32),
             "count": np.array([[3.5], [2.0], [4.0], [6.0]], np.float32)}
  batch = {"answer": np.array([0, 0, 1, 2]),
           "tags": np.array([[1, 0], [0, 1], [1, 1], [1, 1]]),
           "count": np.array([3, 2, 5, 4], np.int32)}
  w_answer, w_tags, w_count = weighting_weights
  tasks = {"answer": losses.Task("answer", w_answer),
           "tags": losses.Task("tags", w_tags, "sigmoid_xent"),
           "count": losses.Task("count", w_count, "l1")}
  return outputs, batch, tasks


def test_per_task_metrics_on_a_hand_made_batch():
  outputs, batch, tasks = _three_tasks()
  terms = {k: np.asarray(v)
           for k, v in losses.head_terms(outputs, batch, tasks).items()}
  assert list(terms) == [
      "accuracy", "loss/answer", "accuracy/answer", "loss/tags",
      "accuracy/tags", "loss/count", "mae/count", "loss"]
  assert sorted(terms) == sorted(losses.metric_names(tasks))
  np.testing.assert_array_equal(terms["accuracy"], [1, 0, 1, 1])
  np.testing.assert_array_equal(terms["accuracy/answer"], terms["accuracy"])
  # Thresholded at logit 0: right on 2/2, 1/2, 2/2 and 1/2 labels.
  np.testing.assert_array_equal(terms["accuracy/tags"], [1, 0.5, 1, 0.5])
  np.testing.assert_array_equal(terms["mae/count"], [0.5, 0, 1, 2])
  np.testing.assert_array_equal(terms["loss/count"], terms["mae/count"])
  np.testing.assert_allclose(
      terms["loss"], 1.0 * terms["loss/answer"] + 0.5 * terms["loss/tags"] +
      2.0 * terms["loss/count"], rtol=1e-6)
  # A regression head may also give [batch] values.
  flat = dict(outputs, count=outputs["count"][:, 0])
  np.testing.assert_array_equal(
      losses.head_terms(flat, batch, tasks)["mae/count"], terms["mae/count"])
  with pytest.raises(ValueError, match="'count' .*\\[batch, 1\\].*\\(4, 2\\)"):
    losses.head_terms(dict(outputs, count=np.zeros((4, 2))), batch, tasks)
  # Eval sums over the real examples, then means: per-task means.
  state = steps.TrainState(step=0, params={}, batch_stats={}, opt_state=None,
                           rng=None, skipped_updates=0)
  means = metrics_lib.sums_to_means(steps.eval_step(
      state, dict(batch, _mask=np.array([1, 1, 1, 0])),
      model=_Given(outputs), targets=tasks, axis_name=None))
  assert means["mae/count"] == pytest.approx(0.5)
  assert means["accuracy/tags"] == pytest.approx(2.5 / 3)


class _Given:
  """A stand-in model whose outputs are given, for ``steps.eval_step``."""

  def __init__(self, outputs):
    self.outputs = outputs

  def apply(self, variables, batch, train):
    del variables, batch, train
    return self.outputs


def test_uncertainty_gradient_is_the_hand_formula():
  outputs, batch, tasks = _three_tasks(weighting_weights=(1.0, 1.0, 1.0))
  s = {"answer": jnp.float32(0.3), "tags": jnp.float32(-0.5),
       "count": jnp.float32(0.0)}
  per_head = {k: np.asarray(v) for k, v in losses.head_terms(
      outputs, batch, tasks).items() if k.startswith("loss/")}

  def mean_loss(s):
    return jnp.mean(losses.head_terms(outputs, batch, tasks, s)["loss"])

  grads = jax.grad(mean_loss)(s)
  for name, s_i in s.items():
    mean_l = per_head[f"loss/{name}"].mean()
    # d/ds_i mean_x [exp(-s_i) L_i(x) + s_i] = 1 - exp(-s_i) mean L_i.
    np.testing.assert_allclose(grads[name], 1 - np.exp(-s_i) * mean_l,
                               rtol=1e-5)
  expected = sum(np.exp(-s[k]) * per_head[f"loss/{k}"].mean() + s[k] for k in s)
  np.testing.assert_allclose(mean_loss(s), expected, rtol=1e-6)


def _tiny_model_config(loss_weighting):
  """An image-only model with the answer head and a regression head on a
  target near 0 (its squared error starts under 1)."""
  return ml_collections.ConfigDict(dict(
      modalities=("image",),
      encoders=dict(image=dict(name="cnn", features=(4, 8), dim=8)),
      fusion=dict(name="concat", hidden=(8,)),
      heads=dict(answer=dict(name="classifier", target="answer", hidden=(8,)),
                 small=dict(name="classifier", target="small", hidden=(8,),
                            loss="mse")),
      loss_weighting=loss_weighting))


def _tiny_batch():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
          "answer": rng.integers(0, 5, 8).astype(np.int32),
          "small": (0.1 * rng.normal(size=8)).astype(np.float32)}


def test_uncertainty_weights_are_trained_params_moving_towards_log_loss():
  model_config = _tiny_model_config("uncertainty")
  model = models.build_model(model_config, vocab_sizes={},
                             num_classes={"answer": 5}, axis_name=None)
  optim_config = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=0.1, schedule="constant", warmup_steps=0,
      weight_decay=1e-4, b1=0.9, b2=0.999, grad_clip_norm=1.0))
  schedule = optim.make_schedule(optim_config, 10)
  tx = optim.make_optimizer(optim_config, schedule)
  batch = _tiny_batch()
  state = steps.create_train_state(model, tx, batch, jax.random.PRNGKey(0))
  s_before = state.params[losses.LOG_VARIANCES]
  assert {k: np.shape(v) for k, v in s_before.items()} == {
      "answer": (), "small": ()}
  assert all(float(v) == 0.0 for v in s_before.values())  # Unit weights.
  step = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, learning_rate_fn=schedule,
      objective=losses.Supervised(losses.head_targets(model_config.heads)),
      axis_name=None))
  state, metrics = step(state, batch)
  assert metrics["loss_weight/answer"] == metrics["loss_weight/small"] == 1.0
  assert float(metrics["grad_norm/loss_weighting"]) > 0
  s_after = state.params[losses.LOG_VARIANCES]
  # Gradient descent moves s_i towards log L_i: up for the answer's
  # cross-entropy (above 1), down for the small target's squared error.
  assert float(metrics["loss/answer"]) > 1 > float(metrics["loss/small"])
  assert float(s_after["answer"]) > 0 > float(s_after["small"])
  _, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss_weight/small"],
                             np.exp(-s_after["small"]), rtol=1e-6)


def test_heads_are_sized_by_their_loss_and_fixed_weighting_adds_no_params():
  model_config = _tiny_model_config("fixed")
  model = models.build_model(model_config, vocab_sizes={},
                             num_classes={"answer": 5}, axis_name=None)
  outputs, variables = jax.eval_shape(
      functools.partial(model.init_with_output, train=False),
      jax.random.PRNGKey(0), _tiny_batch())
  assert {k: v.shape for k, v in outputs.items()} == {"answer": (8, 5),
                                                      "small": (8, 1)}
  assert losses.LOG_VARIANCES not in variables["params"]
  model_config.heads.small.loss = "softmax_xent"
  with pytest.raises(ValueError, match="heads.small.num_classes"):
    models.build_model(model_config, vocab_sizes={},
                       num_classes={"answer": 5}, axis_name=None)


def _multitask_config(data_dir, arg="runlocal", **overrides):
  """``experiments/mm_shapes_multitask.py:arg`` on the small
  ``mm_shapes/simple`` with ``e2e.SMALL_MODEL``."""
  return e2e.small_config(data_dir, experiment="mm_shapes_multitask", arg=arg,
                          **{"dataset.config": "simple", **overrides})


def test_config_errors_name_the_head_and_the_valid_choices(data_dir):
  config = _multitask_config(data_dir)
  config_lib.validate_config(config)
  config.model.heads.num_objects.loss = "huber"
  with pytest.raises(ValueError, match="num_objects.loss 'huber'.*softmax_"
                     "xent, sigmoid_xent, mse, l1"):
    config_lib.validate_config(config)
  config = _multitask_config(data_dir)
  config.model.heads.answer.loss = "mse"
  with pytest.raises(ValueError, match="heads.answer is the first head"):
    config_lib.validate_config(config)
  config = _multitask_config(data_dir, "runlocal,loss_weighting=uncertainty")
  config.model.heads.question_type.weight = 0.5
  with pytest.raises(ValueError, match="question_type.weight=0.5.*learned"):
    config_lib.validate_config(config)
  config.model.loss_weighting = "gradnorm"
  with pytest.raises(ValueError, match="'gradnorm'. Valid: fixed, uncertainty"):
    config_lib.validate_config(config)


def test_the_single_task_variant_is_the_fusion_ablations_film_run():
  film = e2e.load_experiment().get_config(
      "fusion=film,dataset=relational").to_dict()
  multitask = e2e.load_experiment("mm_shapes_multitask")
  assert config_lib.config_changes(
      film, multitask.get_config("tasks=answer").to_dict()) == []
  # The multi-task variants change the heads, the fields kept and the
  # weighting only.
  config = multitask.get_config("loss_weighting=uncertainty")
  assert list(config.model.heads) == ["answer", "num_objects", "question_type"]
  assert config.model.heads.num_objects.loss == "mse"
  changes = config_lib.config_changes(film, config.to_dict())
  assert changes and all(c.startswith(("input.pp_eval:", "input.pp_train:",
                                       "model.heads.num_objects.",
                                       "model.heads.question_type.",
                                       "model.loss_weighting:"))
                         for c in changes), changes


@pytest.fixture(scope="module")
def multitask_run(tmp_path_factory, data_dir):
  """``(workdir, results)`` of a runlocal multi-task run with uncertainty
  weighting, keeping its best validation count error."""
  before = jax.config.jax_default_prng_impl
  workdir = str(tmp_path_factory.mktemp("multitask") / "run")
  results = train.train_and_evaluate(_multitask_config(
      data_dir, "runlocal,loss_weighting=uncertainty",
      **{"checkpoint.keep_best": "validation/mae/num_objects"}), workdir)
  jax.config.update("jax_default_prng_impl", before)
  return workdir, results


def test_a_multitask_run_reports_every_task(multitask_run):
  workdir, results = multitask_run
  per_task = {"loss/answer", "accuracy/answer", "loss/num_objects",
              "mae/num_objects", "loss/question_type",
              "accuracy/question_type"}
  records = metrics_lib.read_metrics(workdir)
  train_records = [r for r in records if r["split"] == "train"]
  assert train_records and all(
      per_task | {"accuracy", "loss", "grad_norm/loss_weighting",
                  "loss_weight/answer", "loss_weight/num_objects",
                  "loss_weight/question_type"} <= set(r)
      for r in train_records)
  # The learned weights moved from 1 (each s_i from 0).
  assert train_records[-1]["loss_weight/num_objects"] != 1.0
  for split in ("validation", "test"):
    assert set(results[split]) == per_task | {"accuracy", "loss"}
    assert results[split]["accuracy"] == results[split]["accuracy/answer"]
    logged = [r for r in records if r["split"] == split and r["step"] == 6]
    assert {k: v for k, v in logged[0].items()
            if k not in ("step", "split")} == results[split]
  assert results["best"]["metric"] == "validation/mae/num_objects"
  assert results["best"]["mode"] == "min"


def test_load_predicts_each_head_as_its_loss_says(multitask_run):
  workdir, _ = multitask_run
  config, predict = evaluate.load(workdir, checkpoint="latest")
  rng = np.random.default_rng(0)
  raw = {"image": rng.integers(0, 255, (3, 32, 32, 3), np.uint8),
         "question": np.array([b"is there a red circle?"] * 3, object)}
  predicted = predict(raw)
  assert {k: v.shape for k, v in predicted.items()} == {
      "answer": (3, len(mm_shapes.ANSWERS)), "num_objects": (3, 1),
      "question_type": (3, len(mm_shapes.QUESTION_TYPES))}
  np.testing.assert_allclose(predicted["answer"].sum(-1), 1.0, rtol=1e-5)
  assert config.model.loss_weighting == "uncertainty"


def test_the_sweep_report_adds_a_column_per_task(tmp_path):
  variants = [sweep.Variant("single", group="single"),
              sweep.Variant("multi_s0", group="multi"),
              sweep.Variant("multi_s1", group="multi")]
  tests = {"single": {"accuracy": 0.5, "loss": 1.0},
           "multi_s0": {"accuracy": 0.6, "accuracy/answer": 0.6,
                        "mae/count": 0.25, "loss/count": 0.1},
           "multi_s1": {"accuracy": 0.8, "accuracy/answer": 0.8,
                        "mae/count": 0.75, "loss/count": 0.2}}
  for name, test in tests.items():
    os.makedirs(tmp_path / name)
    (tmp_path / name / "results.json").write_text(json.dumps(dict(
        test=test, examples_per_sec=100.0, train_seconds=60.0,
        num_params=10)))
  table = sweep.report(variants, str(tmp_path)).splitlines()
  assert table[0].endswith("| train time | test accuracy/answer | "
                           "test mae/count |")
  assert table[1].count("---") == 13
  assert table[2] == ("| single | 0.500 | 0.500 | 1/1 | 10 | – | – | – | – "
                      "| 100 | 1.0 min | | |")
  assert table[3].startswith("| multi | 0.700 ± 0.141 | 0.600, 0.800 | 2/2 |")
  assert table[3].endswith("| 0.700 ± 0.141 | 0.500 ± 0.354 |")
