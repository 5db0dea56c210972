"""Two-tower training end to end (``experiments/mm_shapes_contrastive.py``
on a small ``mm_shapes/simple``), config errors, and warm-starting a fusion
model's encoder from a tower (``config.init_from_parts``)."""

import jax
import numpy as np
import pytest

from mmjax import checkpoint as checkpoint_lib
from mmjax import config_lib
from mmjax import contrastive
from mmjax import evaluate
from mmjax import metrics as metrics_lib
from mmjax import parallel
from mmjax import train
from mmjax.data import pipeline

import e2e

# Small towers; the late-fusion model of _fusion_trainer has the same
# image encoder.
SMALL_TOWERS = {"model.encoders.image.features": (8, 16),
                "model.encoders.caption.hidden": 32}


def _configured(experiment, arg, data_dir, overrides):
  """``experiments/<experiment>.py:arg`` on ``data_dir`` with ``{"a.b":
  value}`` overrides."""
  config = e2e.load_experiment(experiment).get_config(arg)
  config.dataset.data_dir = data_dir
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _contrastive_config(data_dir, arg="runlocal", **overrides):
  return _configured("mm_shapes_contrastive", arg, data_dir,
                     {**SMALL_TOWERS, **overrides})


def test_config_errors_name_the_problem(data_dir):
  config_lib.validate_config(_contrastive_config(data_dir))
  config = _contrastive_config(data_dir)
  config.model.contrastive.loss = "triplet"
  with pytest.raises(ValueError, match="'triplet'; valid: clip, siglip"):
    config_lib.validate_config(config)
  config = _contrastive_config(data_dir)
  config.model.modalities = ("image",)
  with pytest.raises(ValueError, match="exactly two modalities"):
    config_lib.validate_config(config)
  config = _contrastive_config(data_dir)
  config.model.heads = {"answer": {"name": "classifier", "target": "answer"}}
  with pytest.raises(ValueError, match="no heads: remove config.model.heads"):
    config_lib.validate_config(config)
  config = _contrastive_config(data_dir, **{
      "checkpoint.keep_best": "validation/accuracy"})
  with pytest.raises(ValueError, match="recall@1/image_to_text"):
    config_lib.validate_config(config)
  config = _contrastive_config(data_dir, init_from_parts=("a=b=c",))
  with pytest.raises(ValueError, match="'target=source' or 'target'"):
    config_lib.validate_config(config)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, data_dir):
  """``(workdir, results)`` of a runlocal CLIP run that keeps its best
  validation recall."""
  before = jax.config.jax_default_prng_impl
  workdir = str(tmp_path_factory.mktemp("contrastive") / "clip")
  results = train.train_and_evaluate(_contrastive_config(data_dir, **{
      "checkpoint.keep_best": "validation/recall@1/image_to_text"}), workdir)
  jax.config.update("jax_default_prng_impl", before)
  return workdir, results


@pytest.mark.slow
def test_a_contrastive_run_reports_retrieval_and_zero_shot(clip_run):
  workdir, results = clip_run
  for split in ("validation", "test"):
    assert set(results[split]) == set(contrastive.METRIC_NAMES)
    for name, value in results[split].items():
      assert np.isfinite(value) and (name == "loss" or 0 <= value <= 1), name
  train_records = [r for r in metrics_lib.read_metrics(workdir)
                   if r["split"] == "train"]
  assert train_records and all(
      {"loss", "accuracy", "logit_scale", "grad_norm/logit_scale",
       "grad_norm/encoders_image", "grad_norm/projection_caption"} <= set(r)
      for r in train_records)
  # The scale is learned: it moved from CLIP's 1 / 0.07.
  assert train_records[-1]["logit_scale"] != pytest.approx(1 / 0.07, rel=1e-6)
  assert results["best"]["metric"] == "validation/recall@1/image_to_text"
  assert results["best"]["mode"] == "max"
  with pytest.raises(ValueError, match="two-tower contrastive run: it has no "
                     "heads"):
    evaluate.load(workdir)


def _fusion_trainer(data_dir, workdir, **overrides):
  """The small late-fusion model's trainer (``e2e.SMALL_MODEL``)."""
  config = _configured("mm_shapes", "runlocal,fusion=concat", data_dir, {
      "model.encoders.image.features": (8, 16),
      "model.encoders.question.hidden": 32, **overrides})
  preprocessing = pipeline.Preprocessing.parse(config.input)
  vocabularies = pipeline.load_or_build_vocabularies(
      config.dataset, config.input, preprocessing.text_keys, workdir)
  return train.build_trainer(config, parallel.DataParallel(), vocabularies,
                             pipeline.ensure_prepared(config.dataset),
                             preprocessing)


@pytest.mark.slow
def test_init_from_parts_copies_only_the_named_encoder(clip_run, data_dir,
                                                       tmp_path):
  tower_workdir, _ = clip_run
  trainer = _fusion_trainer(data_dir, str(tmp_path))
  fresh = trainer.host_state
  state = train._warm_start(fresh, tower_workdir, ("encoders_image",),
                            trainer.seeds)
  params, batch_stats, _ = checkpoint_lib.load_params(tower_workdir)
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert same(state.params["encoders_image"], params["encoders_image"])
  assert same(state.batch_stats["encoders_image"],
              batch_stats["encoders_image"])
  assert not same(fresh.params["encoders_image"], params["encoders_image"])
  for part in ("encoders_question", "fusion", "heads_answer"):
    assert same(state.params[part], fresh.params[part])
  # The caption tower's embedding table has the captions' vocabulary.
  with pytest.raises(ValueError, match="encoders_question=encoders_caption: "
                     "parameter .*embedding.* has shape"):
    train._warm_start(fresh, tower_workdir,
                      ("encoders_question=encoders_caption",), trainer.seeds)
  with pytest.raises(ValueError, match="has no part 'heads'; it has "
                     "encoders_caption, encoders_image, logit_scale"):
    train._warm_start(fresh, tower_workdir, ("heads_answer=heads",),
                      trainer.seeds)


@pytest.mark.slow
def test_siglip_over_four_devices_with_shard_map(data_dir, tmp_path):
  """SigLIP, chunked over the ring of 4 simulated devices, trains and
  evaluates with the shard_map backend; its bias is learned."""
  assert jax.device_count() >= 4
  before = jax.config.jax_default_prng_impl
  results = train.train_and_evaluate(_contrastive_config(
      data_dir, "runlocal,loss=siglip", **{
          "parallel.backend": "shard_map", "model.contrastive.chunked": True}),
                                     str(tmp_path / "siglip"))
  jax.config.update("jax_default_prng_impl", before)
  assert set(results["test"]) == set(contrastive.METRIC_NAMES)
  records = [r for r in metrics_lib.read_metrics(str(tmp_path / "siglip"))
             if r["split"] == "train"]
  assert records[-1]["logit_bias"] != contrastive.SIGLIP_BIAS_INIT
