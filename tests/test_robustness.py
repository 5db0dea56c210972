"""Robustness to missing and noisy modalities (``mmjax.robustness``,
``python -m mmjax.evaluate --robustness``) and modality dropout
(``config.model.modality_dropout``)."""

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config_lib
from mmjax import evaluate
from mmjax import losses
from mmjax import models
from mmjax import robustness
from mmjax import train

from helpers import keep_best_config

LEVELS = list(robustness.LEVELS)


# MultiBench's metrics on fake curves, by hand.

def test_relative_robustness_is_the_area_under_the_curve():
  linear = [1.0 - 0.05 * i for i in range(11)]  # 1.0 down to 0.5.
  assert robustness.relative_robustness(LEVELS, linear) == pytest.approx(0.75)
  step = [0.8] * 6 + [0.3] * 5
  # 5 flat intervals at 0.8, one from 0.8 to 0.3, 4 flat at 0.3.
  by_hand = 5 * 0.1 * 0.8 + 0.1 * (0.8 + 0.3) / 2 + 4 * 0.1 * 0.3
  assert robustness.relative_robustness(LEVELS, step) == pytest.approx(by_hand)
  # MultiBench's relative_robustness_helper, as written there.
  multibench = sum((step[i] + step[i + 1]) * 0.1 / 2 for i in range(10))
  assert by_hand == pytest.approx(multibench)
  with pytest.raises(ValueError, match="increase within"):
    robustness.relative_robustness([0.0, 0.5, 2.0], [1.0, 0.5, 0.1])


def test_effective_robustness_is_the_accuracy_above_the_shifted_reference():
  curve = [1.0 - 0.05 * i for i in range(11)]
  reference = [0.8 - 0.06 * i for i in range(11)]
  # a_i - (r_i + a_0 - r_0) = (1 - 0.05 i) - (1 - 0.06 i) = 0.01 i, summed
  # over i = 0..10 (MultiBench sums, it does not integrate).
  assert robustness.effective_robustness(curve, reference) == pytest.approx(
      0.55)
  assert robustness.effective_robustness(curve, curve) == 0.0
  assert robustness.minmax_normalize({"a": 0.5, "b": 0.7, "c": 0.6}) == (
      pytest.approx({"a": 0.0, "b": 1.0, "c": 0.5}))


# Corrupting a batch.

VOCAB = 1000


def _inputs():
  mean = np.full((4, 4, 1), 0.25, np.float32)
  return (robustness.ModalityInput("image", False, mean=mean, std=2.0),
          robustness.ModalityInput("question", True, vocab_size=VOCAB))


def _batch(n=256, time=12):
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, time + 1, n)
  mask = np.arange(time) < lengths[:, None]
  ids = np.where(mask, rng.integers(2, VOCAB, (n, time)), 0).astype(np.int32)
  return {"image": rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
          "question": ids, "question_mask": mask}


@functools.partial(jax.jit, static_argnames="inputs")
def _jit_corrupt(batch, cond, *, inputs):
  return robustness.corrupt(batch, cond, jax.random.key(cond.seed),
                            inputs=inputs)


INPUTS = _inputs()


def _corrupt(batch, **kwargs):
  return jax.tree.map(np.asarray, _jit_corrupt(
      batch, robustness.condition(2, **kwargs), inputs=INPUTS))


def test_missing_modalities_are_replaced_as_named():
  batch = _batch()
  zeros = _corrupt(batch, keep=[False, False], fill="zeros")
  assert not zeros["image"].any() and not zeros["question"].any()
  np.testing.assert_array_equal(zeros["question_mask"], batch["question_mask"])
  mean = _corrupt(batch, keep=[False, True], fill="mean")
  np.testing.assert_array_equal(mean["image"],
                                np.broadcast_to(0.25, batch["image"].shape))
  np.testing.assert_array_equal(mean["question"], batch["question"])
  masked = _corrupt(batch, keep=[True, False], fill="masked")
  assert not masked["question_mask"].any()
  np.testing.assert_array_equal(masked["question"], batch["question"])
  np.testing.assert_array_equal(masked["image"], batch["image"])
  assert robustness.ModalityInput("question", True, 9).fills == ("zeros",
                                                                 "masked")
  assert INPUTS[0].fills == ("zeros", "mean")


def test_noise_at_level_zero_changes_nothing_and_grows_with_the_level():
  batch = _batch()
  clean = _corrupt(batch, noise=[0.0, 0.0], seed=3)
  for key in batch:
    np.testing.assert_array_equal(clean[key], batch[key])
  noisy = _corrupt(batch, noise=[0.5, 0.0], seed=3)
  # Gaussian noise of std level * train std (2.0 here).
  assert np.std(noisy["image"] - batch["image"]) == pytest.approx(1.0,
                                                                  rel=0.05)
  np.testing.assert_array_equal(noisy["question"], batch["question"])
  again = _corrupt(batch, noise=[0.5, 0.0], seed=3)  # Deterministic.
  np.testing.assert_array_equal(again["image"], noisy["image"])


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_token_replacement_replaces_real_tokens_at_the_rate(rate):
  batch = _batch(n=2000)
  mask = batch["question_mask"]
  out = _corrupt(batch, noise=[0.0, rate], seed=1)["question"]
  np.testing.assert_array_equal(out[~mask], 0)  # Padding stays padding.
  assert out[mask].min() >= robustness.FIRST_WORD_ID and out.max() < VOCAB
  changed = (out != batch["question"])[mask].mean()
  # A replacement draws the same word with probability 1 / (VOCAB - 2).
  expected = rate * (1 - 1 / (VOCAB - 2))
  sigma = np.sqrt(expected * (1 - expected) / mask.sum())
  assert abs(changed - expected) < 5 * sigma + 1e-9


def test_the_plan_covers_every_subset_and_curve():
  keys = [key for key, _ in robustness.plan(INPUTS)]
  subsets = {(k[1], k[2]) for k in keys if k[0] == "subsets"}
  assert subsets == {("image+question", f) for f in robustness.FILLS} | {
      ("image", "zeros"), ("image", "masked"),  # The question is missing.
      ("question", "zeros"), ("question", "mean")}  # The image is missing.
  for target in ("image", "question", "all"):
    assert [k[2] for k in keys if k[:2] == ("noise", target)] == list(
        range(len(LEVELS)))


# Modality dropout.

@pytest.mark.parametrize("num_modalities, p", [(2, 0.3), (3, 0.6)])
def test_modality_dropout_drops_at_about_the_rate_and_never_all(
    num_modalities, p):
  keep = np.asarray(jax.jit(models.sample_modality_keep, static_argnums=(
      1, 2, 3))(jax.random.key(0), 20000, num_modalities, p))
  assert keep.any(axis=1).all()
  # Dropped with p, unless all were: then one of the M is kept again.
  expected = p - p**num_modalities / num_modalities
  sigma = np.sqrt(expected * (1 - expected) / keep.shape[0])
  np.testing.assert_allclose(1 - keep.mean(0), expected, atol=5 * sigma)


def test_dropped_modalities_are_zeroed_with_their_mask():
  batch = _batch(n=4)
  keep = np.array([[True, False], [False, True], [True, True], [True, False]])
  out = jax.tree.map(np.asarray, models.drop_modalities(
      batch, keep, ("image", "question")))
  for key, m in (("image", 0), ("question", 1), ("question_mask", 1)):
    np.testing.assert_array_equal(out[key][keep[:, m]],
                                  batch[key][keep[:, m]])
    assert not out[key][~keep[:, m]].any()


# A model that compiles in a few seconds: late fusion of a small CNN and a
# deep averaging network (the robustness code is the same for every block).
TINY_MODEL = {"model.fusion": dict(name="concat", hidden=(16,)),
              "model.encoders.image.dim": 16,
              "model.encoders.question": dict(name="dan", embed_dim=16,
                                              hidden=(), dim=16),
              "model.heads.answer.hidden": ()}


def _small_model(p):
  config = keep_best_config("", **TINY_MODEL)
  if p is None:
    del config.model["modality_dropout"]  # As configs saved before it.
  else:
    config.model.modality_dropout = p
  config_lib.validate_config(config)
  model = models.build_model(config.model, vocab_sizes={"question": 20},
                             num_classes={"answer": 5}, axis_name=None)
  return config, model


def test_modality_dropout_zero_draws_nothing_and_keeps_the_loss():
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
           "question": rng.integers(2, 20, (8, 16)).astype(np.int32),
           "question_mask": np.arange(16) < rng.integers(1, 17, (8, 1)),
           "answer": rng.integers(0, 5, 8)}
  config, model = _small_model(None)
  variables = jax.jit(lambda b: model.init(jax.random.key(0), b, train=False)
                      )(batch)
  targets = losses.head_targets(config.model.heads)

  def loss(model, rngs):
    logits, _ = model.apply(variables, batch, train=True, rngs=rngs,
                            mutable=["batch_stats"])
    return jnp.mean(losses.head_terms(logits, batch, targets)["loss"])

  rngs = {"dropout": jax.random.key(1)}
  before = jax.jit(lambda: loss(model, rngs))()
  _, zero = _small_model(0.0)
  # p = 0: no rng needed at all (nothing drawn), the same loss bit for bit.
  assert jax.jit(lambda: loss(zero, {}))() == before
  _, dropping = _small_model(0.5)
  assert jax.jit(lambda: loss(dropping, rngs))() != before
  # Evaluation drops nothing (and needs no rng).
  np.testing.assert_array_equal(
      *[jax.jit(lambda m=m: m.apply(variables, batch, train=False))()[
          "answer"] for m in (dropping, zero)])
  with pytest.raises(ValueError, match="modality_dropout must be in"):
    _small_model(1.0)


def test_configs_saved_without_modality_dropout_resume_unchanged():
  config, _ = _small_model(0.0)
  saved = json.loads(config.to_json())
  del saved["model"]["modality_dropout"]
  assert config_lib.config_changes(saved, json.loads(config.to_json())) == []


# End to end, on one tiny run.

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, data_dir):
  """``(workdir, evaluation, traces)``: a tiny run trained with modality
  dropout and evaluated with ``robustness=True`` against a fake reference,
  ``corrupted_eval_step`` allowed one trace."""
  before = jax.config.jax_default_prng_impl
  root = tmp_path_factory.mktemp("robustness")
  workdir = str(root / "run")
  train.train_and_evaluate(keep_best_config(data_dir, **TINY_MODEL, **{
      "train.steps": 2, "train.eval_every_steps": 2, "eval.batch_size": 32,
      "model.modality_dropout": 0.3}), workdir)
  reference = root / "reference"
  reference.mkdir()
  (reference / "evaluation.json").write_text(json.dumps({"robustness": {
      "noise": {"all": {"levels": LEVELS, "accuracy": REFERENCE}}}}))
  traces = []
  step = robustness.corrupted_eval_step

  def counted(*args, **kwargs):
    traces.append(1)
    return step(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(robustness, "corrupted_eval_step",
                  chex.assert_max_traces(counted, n=1))
    evaluation = evaluate.evaluate_run(
        workdir, "latest", robustness=True,
        robustness_reference=str(reference))
  jax.config.update("jax_default_prng_impl", before)
  return workdir, evaluation, traces


REFERENCE = [0.5 - 0.03 * i for i in range(11)]


def test_the_whole_report_comes_from_one_compiled_function(evaluated):
  _, evaluation, traces = evaluated
  # 3 batches of the 96 test examples, 7 subset and 33 noise conditions.
  assert len(traces) == 1
  assert sum(map(len, evaluation["robustness"]["subsets"].values())) == 7


def test_noise_level_zero_and_the_full_subset_are_the_clean_accuracy(
    evaluated):
  _, evaluation, _ = evaluated
  clean = evaluation["splits"]["test"]["accuracy"]
  result = evaluation["robustness"]
  assert result["split"] == "test"
  for curve in result["noise"].values():
    assert curve["accuracy"][0] == clean
  assert set(result["subsets"]["image+question"].values()) == {clean}


def test_evaluation_json_and_plots(evaluated):
  workdir, evaluation, _ = evaluated
  on_disk = json.loads(open(os.path.join(workdir, "evaluation.json")).read())
  assert on_disk == json.loads(json.dumps(evaluation))
  result = on_disk["robustness"]
  assert set(result["subsets"]) == {"image+question", "image", "question"}
  assert set(result["noise"]) == {"image", "question", "all"}
  for target, curve in result["noise"].items():
    assert curve["levels"] == LEVELS
    assert curve["relative_robustness"] == pytest.approx(
        robustness.relative_robustness(LEVELS, curve["accuracy"]))
    if target == "all":  # The only curve the reference has.
      assert curve["effective_robustness"] == pytest.approx(
          robustness.effective_robustness(curve["accuracy"], REFERENCE))
    else:
      assert curve["effective_robustness"] is None
  assert on_disk["per_seed"][0]["robustness"]["noise"]["all"]["accuracy"] == (
      result["noise"]["all"]["accuracy"])  # One seed: its own values.
  for name in ("noise", "subsets"):
    with open(os.path.join(workdir, f"robustness_{name}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# mmjax.sweep --robustness.

def _fake_robustness(relative, effective, without_image, modalities):
  curve = {"levels": LEVELS, "accuracy": [0.5] * 11,
           "relative_robustness": relative, "effective_robustness": effective}
  subsets = {"+".join(modalities): {"zeros": 0.9}}
  if len(modalities) > 1:
    subsets["question"] = {"zeros": without_image, "mean": 0.0}
    subsets["image"] = {"zeros": 0.2, "masked": 0.0}
  return {"subsets": subsets,
          "noise": {**{m: curve for m in modalities}, "all": curve}}


def test_the_sweep_tabulates_and_evaluates_robustness(tmp_path, monkeypatch):
  from mmjax import sweep  # pylint: disable=g-import-not-at-top
  both = ("image", "question")
  runs = {"late_s0": [_fake_robustness(0.4, None, 0.3, both)],
          "late_s1": [_fake_robustness(0.6, None, 0.5, both)],
          "film": [_fake_robustness(0.8, 0.1, 0.1, both)],
          "image_only": [_fake_robustness(0.7, -0.2, None, ("image",))]}
  variants = [sweep.Variant("late_s0", group="late"),
              sweep.Variant("late_s1", group="late"), sweep.Variant("film"),
              sweep.Variant("image_only"), sweep.Variant("not_run"),
              sweep.Variant("svm")]
  for name, per_seed in runs.items():
    os.makedirs(tmp_path / name)
    (tmp_path / name / "evaluation.json").write_text(json.dumps(
        {"robustness": per_seed[0],
         "per_seed": [{"robustness": r} for r in per_seed]}))
  table = sweep.robustness_report(variants, str(tmp_path)).splitlines()
  assert table[0] == ("| variant | rel. rob. image | rel. rob. question | "
                      "rel. rob. all | rel. rob. all (min-max) | "
                      "eff. rob. all | without image | without question |")
  # Means over a group's runs; min-max over the groups (0.5, 0.8, 0.7).
  assert table[2] == ("| late | 0.500 | 0.500 | 0.500 | 0.000 | | 0.400 "
                      "| 0.200 |")
  assert table[3] == ("| film | 0.800 | 0.800 | 0.800 | 1.000 | 0.100 | 0.100 "
                      "| 0.200 |")
  assert table[4] == "| image_only | 0.700 | | 0.700 | 0.667 | -0.200 | | |"
  assert len(table) == 5
  # The curves: a group's mean per level, per noised target.
  runs["late_s1"][0]["noise"] = {  # "all" first: the curves put it last.
      target: {"levels": LEVELS, "accuracy": [accuracy] * 11}
      for target, accuracy in (("all", 0.3), ("image", 0.7), ("question", 0.1))}
  (tmp_path / "late_s1" / "evaluation.json").write_text(json.dumps(
      {"per_seed": [{"robustness": r} for r in runs["late_s1"]]}))
  curves = sweep.robustness_curves(variants, str(tmp_path))
  assert list(curves) == ["image", "question", "all"]
  assert list(curves["all"]) == ["late", "film", "image_only"]
  assert curves["image"]["late"] == pytest.approx([0.6] * 11)
  assert curves["question"]["late"] == pytest.approx([0.3] * 11)
  assert curves["all"]["film"] == [0.5] * 11
  assert "image_only" not in curves["question"]
  sweep.robustness_plot(variants, str(tmp_path), str(tmp_path / "r.png"))
  assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Evaluation: finished networks only (not late_s1, not_run, svm), the
  # reference first; skipped where done (late_s0), again where done without
  # the reference (film).
  os.makedirs(tmp_path / "svm")
  (tmp_path / "svm" / "results.json").write_text(json.dumps(
      {"svm": {"features": "concat"}}))
  for name in ("late_s0", "film", "image_only"):
    (tmp_path / name / "results.json").write_text("{}")
    (tmp_path / name / "config.json").write_text(json.dumps(
        {"checkpoint": {"keep_best": "validation/accuracy"
                        if name == "film" else ""}}))
  (tmp_path / "image_only" / "evaluation.json").write_text("{}")
  (tmp_path / "film" / "evaluation.json").write_text(json.dumps(
      {"robustness": runs["late_s0"][0]}))
  commands = []
  monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **_: (
      commands.append(cmd[3:]) or sweep.subprocess.CompletedProcess(cmd, 0)))
  assert sweep.evaluate_robustness(variants, str(tmp_path), "late_s0") == []
  assert commands == [
      [f"--workdir={tmp_path}/film", "--checkpoint=best", "--robustness",
       f"--robustness_reference={tmp_path}/late_s0"],
      [f"--workdir={tmp_path}/image_only", "--checkpoint=latest",
       "--robustness", f"--robustness_reference={tmp_path}/late_s0"]]
