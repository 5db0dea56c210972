"""Several seeds as one vectorised program (``config.train.num_seeds``)."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

from mmjax import checkpoint as checkpoint_lib
from mmjax import config_lib
from mmjax import losses
from mmjax import metrics as metrics_lib
from mmjax import models
from mmjax import optim
from mmjax import parallel
from mmjax import steps
from mmjax import train
from mmjax.data import pipeline
from mmjax.data import preprocess

import e2e
from helpers import small_film_batches, small_film_config

SEEDS = 2


def _config(data_dir, **overrides):
  """The small runlocal mm_shapes model, with dropout so that the seeds'
  random streams matter, and threefry, whose draws under ``vmap`` equal the
  unbatched ones; each seed keeps its own best checkpoint
  (test_results_... below)."""
  return e2e.small_config(data_dir, **{
      "rng_impl": "threefry2x32", "model.heads.answer.dropout": 0.1,
      "checkpoint.keep_best": "validation/loss", **overrides})


def _vocabularies(config):
  """The question's vocabulary, as a new run builds it (not saved)."""
  return {"question": pipeline.build_vocabulary(config.dataset, config.input,
                                                "question")}


@pytest.fixture(autouse=True)
def _restore_prng_impl():
  """Training sets the process-wide PRNG implementation; restore it for the
  other tests of this worker."""
  before = jax.config.jax_default_prng_impl
  yield
  jax.config.update("jax_default_prng_impl", before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """Workdirs of a run of ``SEEDS`` vmapped seeds (``vmap``; the other
program, ``unroll``, is tested step by step below) and of the separate runs
of the same seeds (``seed<k>``: one-seed runs with ``config.seed = k``)."""
  before = jax.config.jax_default_prng_impl
  root = tmp_path_factory.mktemp("seeds")
  train.train_and_evaluate(
      _config(data_dir, **{"train.num_seeds": SEEDS,
                           "train.seeds_program": "vmap"}), str(root / "vmap"))
  for seed in range(SEEDS):
    train.train_and_evaluate(_config(data_dir, seed=seed),
                             str(root / f"seed{seed}"))
  jax.config.update("jax_default_prng_impl", before)
  return root


def _seed_params(workdir, index=None):
  params, batch_stats, step = checkpoint_lib.load_params(str(workdir))
  pick = (lambda x: np.asarray(x)) if index is None else (
      lambda x: np.asarray(x)[index])
  return jax.tree.map(pick, (params, batch_stats)), step


@pytest.mark.slow
def test_vmapped_seeds_end_as_separate_runs(runs):
  program = "vmap"
  for seed in range(SEEDS):
    one_program, step = _seed_params(runs / program, seed)
    separate, separate_step = _seed_params(runs / f"seed{seed}")
    assert step == separate_step == 6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 one_program, separate)
    # Every logged value, seed by seed, as the separate run logged it.
    logged = e2e.history(runs / program / f"seed{seed}")
    expected = e2e.history(runs / f"seed{seed}")
    assert [(r["step"], r["split"]) for r in logged] == [
        (r["step"], r["split"]) for r in expected]
    for got, want in zip(logged, expected):
      assert got.keys() == want.keys()
      values = sorted(set(want) - {"step", "split"})
      np.testing.assert_allclose([got[k] for k in values],
                                 [want[k] for k in values],
                                 rtol=1e-4, atol=1e-5)
  # The seeds were independent: different initialisations, different ends.
  first, _ = _seed_params(runs / program, 0)
  second, _ = _seed_params(runs / program, 1)
  assert not np.allclose(jax.tree.leaves(first)[0], jax.tree.leaves(second)[0])


@pytest.mark.slow
def test_results_have_each_seed_and_their_mean(runs):
  results = json.loads((runs / "vmap" / "results.json").read_text())
  assert results["num_seeds"] == SEEDS and results["seeds"] == [0, 1]
  assert [r["seed"] for r in results["per_seed"]] == [0, 1]
  for split in ("validation", "test"):
    accuracies = [r[split]["accuracy"] for r in results["per_seed"]]
    assert results[split]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert results["std"][split]["accuracy"] == pytest.approx(
        np.std(accuracies, ddof=1))
  for seed, seed_results in enumerate(results["per_seed"]):
    on_disk = json.loads(
        (runs / "vmap" / f"seed{seed}" / "results.json").read_text())
    assert on_disk == seed_results
    separate = json.loads((runs / f"seed{seed}" / "results.json").read_text())
    assert seed_results["test"]["accuracy"] == pytest.approx(
        separate["test"]["accuracy"], abs=1e-6)
    assert seed_results["num_params"] == separate["num_params"]
  assert results["examples_per_sec"] == pytest.approx(
      SEEDS * results["examples_per_sec_per_seed"])
  # Each seed's best validation step, and the metrics there, as its own run
  # kept them (config.checkpoint.keep_best), and their mean over seeds.
  bests = [r["best"] for r in results["per_seed"]]
  for seed, best in enumerate(bests):
    separate = json.loads((runs / f"seed{seed}" / "results.json").read_text())
    assert best["step"] == separate["best"]["step"]
    assert best["test"]["loss"] == pytest.approx(
        separate["best"]["test"]["loss"], abs=1e-5)
    assert os.listdir(runs / "vmap" / f"seed{seed}" / "best_checkpoint") == [
        str(best["step"])]
  assert results["best"]["steps"] == [b["step"] for b in bests]
  assert results["best"]["test"]["loss"] == pytest.approx(
      np.mean([b["test"]["loss"] for b in bests]))
  assert os.listdir(runs / "vmap" / "seed1" / "tb")


@pytest.mark.slow
def test_resumed_seeds_end_where_uninterrupted_ones_do(runs, tmp_path,
                                                       data_dir):
  """The run of several seeds resumed from its step-3 checkpoint ends with
  the same stacked state and logs as without the interruption."""
  workdir = tmp_path / "resumed"
  shutil.copytree(runs / "vmap", workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  os.remove(workdir / "results.json")
  train.train_and_evaluate(
      _config(data_dir, **{"train.num_seeds": SEEDS,
                           "train.seeds_program": "vmap"}), str(workdir))
  resumed, _ = _seed_params(workdir)
  uninterrupted, _ = _seed_params(runs / "vmap")
  assert jax.tree.leaves(resumed)[0].shape[0] == SEEDS
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
  for seed in range(SEEDS):
    assert (e2e.history(workdir / f"seed{seed}") ==
            e2e.history(runs / "vmap" / f"seed{seed}"))


def test_seed_steps_equal_separate_steps():
  """Two steps of ``over_seeds``, unrolled with a batch per seed and vmapped
  with one shared batch, against each seed's own ``train_step`` (a small
  image model without dropout, so any PRNG implementation draws alike)."""
  config = small_film_config()
  config.model.modalities = ("image",)
  config.model.fusion = {"name": "concat"}
  model = models.build_model(config.model, vocab_sizes={},
                             num_classes={"answer": 5}, axis_name=None)
  schedule = optim.make_schedule(config.optim, 10)
  tx = optim.make_optimizer(config.optim, schedule)
  batches = list(small_film_batches())
  one_step = functools.partial(
      steps.train_step, model=model, tx=tx, learning_rate_fn=schedule,
      objective=losses.Supervised(losses.head_targets(config.model.heads)))
  separate_step = jax.jit(functools.partial(one_step, axis_name=None))
  rngs = [jax.random.PRNGKey(seed) for seed in range(SEEDS)]
  per_seed = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *batches)
  for vectorize, batch_axis in ((False, 1), (True, None)):
    states = steps.create_seed_states(model, tx, batches[0], rngs)
    seed_step = jax.jit(functools.partial(
        steps.over_seeds(one_step, batch_axis=batch_axis, vectorize=vectorize),
        axis_name=None))
    separate = [jax.tree.map(lambda x, k=k: x[k], states)
                for k in range(SEEDS)]
    for _ in range(2):
      states, metrics = seed_step(states, per_seed if batch_axis else batches[0])
      for k in range(SEEDS):
        separate[k], separate_metrics = separate_step(
            separate[k], batches[k] if batch_axis else batches[0])
        np.testing.assert_allclose(metrics["loss"][k],
                                   separate_metrics["loss"], rtol=1e-5)
    for k in range(SEEDS):
      jax.tree.map(lambda a, b, k=k: np.testing.assert_allclose(
          a[k], b, atol=1e-5), states.params, separate[k].params)


def test_each_seed_reads_its_own_data_order_or_a_shared_one(data_dir):
  config = _config(data_dir, **{"train.num_seeds": 3})
  builder = pipeline.ensure_prepared(config.dataset)
  dp = parallel.DataParallel()
  preprocessing = pipeline.Preprocessing.parse(config.input)
  vocabularies = _vocabularies(config)
  trainer = train.build_trainer(config, dp, vocabularies, builder,
                                preprocessing)
  batch = trainer.train_batches[5]
  assert batch["image"].shape[:2] == (config.input.batch_size, 3)
  pp = preprocess.build_pp(preprocessing.train, vocabularies)
  for k in range(3):
    own = pipeline.train_batches(config.dataset, config.input, pp, seed=k)[5]
    for key, value in own.items():
      np.testing.assert_array_equal(batch[key][:, k], value)

  config.train.seeds_share_data = True
  shared = train.build_trainer(config, dp, vocabularies, builder,
                               preprocessing)
  for key, value in pipeline.train_batches(config.dataset, config.input, pp,
                                           seed=config.seed)[5].items():
    np.testing.assert_array_equal(shared.train_batches[5][key], value)
  # Each seed starts from its own initialisation either way.
  for trainer in (trainer, shared):
    params = [np.asarray(x) for x in jax.tree.leaves(trainer.host_state.params)]
    assert all(x.shape[0] == 3 for x in params)
    assert any(not np.allclose(x[0], x[1]) for x in params)


def test_num_seeds_and_seeds_program_are_validated(data_dir):
  config = _config(data_dir, **{"train.num_seeds": 0})
  with pytest.raises(ValueError, match="num_seeds must be at least 1"):
    config_lib.validate_config(config)
  config = _config(data_dir, **{"train.seeds_program": "pmap"})
  with pytest.raises(ValueError, match="Valid: auto, vmap, unroll"):
    config_lib.validate_config(config)


def test_a_saved_config_without_num_seeds_resumes_as_one_seed():
  config = e2e.load_experiment("mm_shapes").get_config("runlocal").to_dict()
  saved = json.loads(json.dumps(config))
  for added in ("num_seeds", "seeds_share_data", "seeds_program"):
    del saved["train"][added]
  assert config_lib.config_changes(saved, config) == []
  config["train"]["num_seeds"] = 3
  assert config_lib.config_changes(saved, config) == [
      "train.num_seeds: 1 -> 3"]


def test_seed_slice_reads_one_seed_or_passes_one_run_through():
  metrics = {"loss": np.array([1.0, 2.0, 3.0])}
  assert metrics_lib.seed_slice(metrics, 1) == {"loss": 2.0}
  assert metrics_lib.seed_slice({"loss": 4.0}, None) == {"loss": 4.0}


@pytest.mark.slow
def test_init_from_a_one_seed_run_starts_every_seed(runs, data_dir):
  config = _config(data_dir, **{"train.num_seeds": SEEDS})
  trainer = train.build_trainer(config, parallel.DataParallel(),
                                _vocabularies(config),
                                pipeline.ensure_prepared(config.dataset),
                                pipeline.Preprocessing.parse(config.input))
  started = train._warm_start(trainer.host_state, str(runs / "seed0"), (),
                              trainer.seeds)
  (params, batch_stats), _ = _seed_params(runs / "seed0")
  for seed in range(SEEDS):
    pick = lambda tree: jax.tree.map(lambda x: np.asarray(x)[seed], tree)
    jax.tree.map(np.testing.assert_array_equal, pick(started.params), params)
    jax.tree.map(np.testing.assert_array_equal, pick(started.batch_stats),
                 batch_stats)
