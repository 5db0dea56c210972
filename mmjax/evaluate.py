"""Evaluating a finished run, without retraining or its command line.

    python -m mmjax.evaluate --workdir=/tmp/mmjax/film [--checkpoint=best]
        [--splits=test,validation] [--robustness
        [--robustness_reference=/tmp/mmjax/concat]]

restores a checkpoint of the run (``latest``, ``best``: the one
``config.checkpoint.keep_best`` kept, or a step number), evaluates it on the
splits (default: the run's ``config.dataset.eval_splits``) and writes
``evaluation.json`` into the workdir. The config, the vocabularies and the
dataset location come from the run's ``config.json`` and ``vocab/``.
``--robustness`` adds the accuracy with missing and noisy modalities and
MultiBench's robustness metrics (effective robustness against the
``--robustness_reference`` run's curves), on the test split or the first of
``--splits``, and draws them in the workdir (``mmjax.robustness``).

For inference in Python, ``mmjax.load``::

    config, predict = mmjax.load("/tmp/mmjax/film", checkpoint="best")
    probabilities = predict({"image": images, "question": questions})

``predict`` takes raw batches of the run's modalities (as the dataset stores
them: ``[batch, ...]`` numpy arrays, strings for text), applies the run's
evaluation preprocessing and returns ``{head: [batch, classes]}``
probabilities (``[batch, 1]`` values for a regression head;
``mmjax.losses.predictions``).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Union

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from mmjax import checkpoint as checkpoint_lib
from mmjax import config_lib
from mmjax import losses
from mmjax import metrics as metrics_lib
from mmjax import models
from mmjax import robustness as robustness_lib
from mmjax import steps
from mmjax import train
from mmjax.data import pipeline
from mmjax.data import preprocess
from mmjax.data.tokenizer import Vocabulary

Checkpoint = Union[str, int]  # "best", "latest" or a step.


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run trained with (its ``config.json``), as the experiment
  file built it: tuples where JSON holds lists, and settings added since the
  run was saved at the values that keep its behaviour."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds no run: {path} is missing. Pass "
                            "the --workdir of a run of python -m mmjax.main.")
  with open(path) as f:
    saved = json.load(f)
  for key, value in config_lib.ADDED_SETTINGS.items():
    *parents, leaf = key.split(".")
    node = saved
    for parent in parents:
      node = node.setdefault(parent, {})
    node.setdefault(leaf, value)
  return ml_collections.ConfigDict(_lists_to_tuples(saved))


def _lists_to_tuples(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _lists_to_tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_lists_to_tuples(v) for v in tree)
  return tree


def checkpoint_dir(workdir: str, config: ml_collections.ConfigDict,
                   checkpoint: Checkpoint, seed: int | None) -> str:
  """Where checkpoint ``checkpoint`` of seed ``seed`` lies (seed ``None``:
  a one-seed run)."""
  if checkpoint != "best":
    return os.path.join(workdir, "checkpoints")
  if not config.checkpoint.get("keep_best"):
    raise ValueError(f"The run in {workdir} kept no best checkpoint "
                     "(config.checkpoint.keep_best was unset); use "
                     "--checkpoint=latest or a step.")
  seed_workdir = workdir if seed is None else os.path.join(workdir,
                                                           f"seed{seed}")
  return os.path.join(seed_workdir, "best_checkpoint")


def restore_variables(workdir: str, config: ml_collections.ConfigDict,
                      checkpoint: Checkpoint = "best",
                      seed: int | None = None) -> tuple[dict[str, Any], int]:
  """``({"params", "batch_stats"}, step)`` of one seed's checkpoint.

  ``seed``: for a run of several seeds (``config.train.num_seeds``), which
  one (default: the first); ignored otherwise.
  """
  seeds = train.Seeds.of(config)
  if not seeds.stacked:
    seed = None
  elif seed is None:
    seed = seeds.values[0]
  elif seed not in seeds.values:
    raise ValueError(f"The run trained seeds {list(seeds.values)}; got "
                     f"seed={seed}.")
  step = None if checkpoint in ("best", "latest") else int(checkpoint)
  params, batch_stats, step = checkpoint_lib.load_params(
      checkpoint_dir(workdir, config, checkpoint, seed), step)
  variables = {"params": params, "batch_stats": batch_stats}
  if seed is not None and checkpoint != "best":  # Stacked over the seeds.
    index = seeds.values.index(seed)
    variables = jax.tree.map(lambda x: np.asarray(x)[index], variables)
  return variables, step


class Predictor:
  """``predict(batch) -> {head: [batch, classes] probabilities}`` (a
  regression head: ``[batch, 1]`` values) for raw batches of the run's
  modalities (see the module docstring).

  Attributes:
    step: the training step of the restored checkpoint.
    variables: ``{"params", "batch_stats"}`` of the model.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               model: models.MultimodalModel,
               preprocessing: pipeline.Preprocessing,
               vocabularies: dict[str, Vocabulary],
               variables: dict[str, Any], step: int):
    self.step, self.variables = step, variables
    self._modalities = tuple(config.model.modalities)
    # The evaluation preprocessing but its final ``keep``, which also keeps
    # the labels that a raw batch for inference does not have.
    self._pp = preprocess.build_pp(preprocessing.eval, vocabularies,
                                   skip=("keep",))
    self._predict = jax.jit(functools.partial(
        _predictions, model, losses.head_targets(config.model.heads)))

  def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    missing = [m for m in self._modalities if m not in batch]
    if missing:
      raise KeyError(f"predict: the batch lacks modalities {missing}; the "
                     f"model reads {', '.join(self._modalities)}.")
    inputs = self._pp({k: np.asarray(v) for k, v in batch.items()},
                      np.random.default_rng(0))
    inputs = {k: v for k, v in inputs.items()
              if k in self._modalities or k.removesuffix("_mask") in
              self._modalities}
    return jax.tree.map(np.asarray, self._predict(self.variables, inputs))


def _predictions(model: models.MultimodalModel, tasks: dict[str, losses.Task],
                 variables: dict[str, Any],
                 inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return losses.predictions(model.apply(variables, inputs, train=False), tasks)


def load(workdir: str, checkpoint: Checkpoint = "best",
         seed: int | None = None
         ) -> tuple[ml_collections.ConfigDict, Predictor]:
  """``(config, predict)`` of a finished run (see the module docstring).

  Args:
    workdir: the run's ``--workdir``.
    checkpoint: "best" (what ``config.checkpoint.keep_best`` kept), "latest"
      or a step.
    seed: for a run of several seeds, which one (default: the first).
  """
  config, preprocessing, vocabularies, model = _run_model(workdir)
  variables, step = restore_variables(workdir, config, checkpoint, seed)
  return config, Predictor(config, model, preprocessing, vocabularies,
                           variables, step)


def _run_model(workdir: str) -> tuple[ml_collections.ConfigDict,
                                      pipeline.Preprocessing,
                                      dict[str, Vocabulary],
                                      models.MultimodalModel]:
  """The run's config, its preprocessing (parsed), its saved vocabularies
  and its (unbound) model."""
  config = run_config(workdir)
  if config.model.get("contrastive"):
    raise ValueError(
        f"{workdir} holds a two-tower contrastive run: it has no heads to "
        "predict with or to evaluate for robustness. Its results.json holds "
        "its retrieval and zero-shot metrics; to use its towers, warm-start "
        "a fusion model with --config.init_from and "
        "--config.init_from_parts.")
  preprocessing = pipeline.Preprocessing.parse(config.input)
  vocabularies = _vocabularies(workdir, preprocessing.text_keys)
  model = train.model_of(config, vocabularies,
                         pipeline.ensure_prepared(config.dataset),
                         axis_name=None)
  return config, preprocessing, vocabularies, model


def _vocabularies(workdir: str, keys: list[str]) -> dict[str, Vocabulary]:
  """The run's saved vocabularies of fields ``keys`` (never rebuilt: ids
  must match training)."""
  vocabularies = {}
  for key in keys:
    path = pipeline.vocabulary_path(workdir, key)
    if not os.path.exists(path):
      raise FileNotFoundError(f"The run's vocabulary {path} is missing; it is "
                              "written when training starts.")
    vocabularies[key] = Vocabulary.load(path)
  return vocabularies


def evaluate_run(workdir: str, checkpoint: Checkpoint = "best",
                 splits: tuple[str, ...] | None = None, *,
                 robustness: bool = False,
                 robustness_reference: str | None = None) -> dict[str, Any]:
  """Evaluates every seed of a run on ``splits`` (default: the run's eval
  splits) and writes ``workdir/evaluation.json``; returns its contents:
  ``{"checkpoint", "splits": {split: metrics}, "per_seed": [{"seed",
  "step", split: metrics}, ...]}`` (metrics are the seeds' mean).

  ``robustness``: also ``"robustness"`` (``mmjax.robustness``; each seed's
  in ``per_seed``) on the first of ``splits`` (default "test"), with
  effective robustness against the curves in ``robustness_reference``'s
  ``evaluation.json``, and its plots in the workdir.
  """
  config, preprocessing, vocabularies, model = _run_model(workdir)
  pp = preprocess.build_pp(preprocessing.eval, vocabularies)
  robustness_split = splits[0] if splits else "test"
  reference = (robustness_lib.read_reference(robustness_reference)
               if robustness and robustness_reference else None)
  splits = tuple(splits or config.dataset.eval_splits)
  eval_step = jax.jit(functools.partial(
      steps.eval_step, model=model,
      targets=losses.head_targets(config.model.heads), axis_name=None,
      mask_key=pipeline.MASK_KEY))
  seeds = train.Seeds.of(config)
  per_seed, states = [], []
  for seed in seeds.values:
    variables, step = restore_variables(workdir, config, checkpoint, seed)
    state = steps.TrainState(step=step, params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             opt_state=None, rng=None, skipped_updates=None)
    states.append(state)
    results = {"seed": seed, "step": step}
    for split in splits:
      results[split] = metrics_lib.sums_to_means(train.eval_sums(
          eval_step, state, config, split, pp))
    per_seed.append(results)
  evaluation = {
      "checkpoint": checkpoint,
      "splits": {split: {k: float(np.mean([r[split][k] for r in per_seed]))
                         for k in per_seed[0][split]} for split in splits},
      "per_seed": per_seed}
  if robustness:
    keys, accuracy = robustness_lib.evaluate(config, model, pp, vocabularies,
                                             states, robustness_split)
    for results, seed_accuracy in zip(per_seed, accuracy):
      results["robustness"] = robustness_lib.summarize(
          keys, seed_accuracy.tolist(), reference=reference)
    evaluation["robustness"] = {"split": robustness_split,
                                **robustness_lib.summarize(
                                    keys, accuracy.mean(0).tolist(),
                                    reference=reference)}
  if jax.process_index() == 0:
    train.write_json(os.path.join(workdir, "evaluation.json"), evaluation)
    if robustness:
      robustness_lib.plot(evaluation["robustness"], workdir)
  return evaluation


def main(argv):
  del argv
  checkpoint = flags.FLAGS.checkpoint
  if checkpoint not in ("best", "latest"):
    if not checkpoint.isdigit():
      raise app.UsageError(f"--checkpoint={checkpoint!r}: use best, latest "
                           "or a step number.")
    checkpoint = int(checkpoint)
  workdir = flags.FLAGS.workdir
  evaluation = evaluate_run(
      workdir, checkpoint, flags.FLAGS.splits,
      robustness=flags.FLAGS.robustness,
      robustness_reference=flags.FLAGS.robustness_reference)
  for split, means in evaluation["splits"].items():
    print(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
  if "robustness" in evaluation:
    for target, curve in evaluation["robustness"]["noise"].items():
      effective = curve["effective_robustness"]
      print(f"noise on {target}: relative robustness "
            f"{curve['relative_robustness']:.4f}" +
            ("" if effective is None else
             f", effective robustness {effective:.4f}"))
  print(f"Wrote {os.path.join(workdir, 'evaluation.json')}.")


if __name__ == "__main__":
  # Defined here, not on import, so that ``mmjax.load`` can be imported next
  # to other programs' flags.
  flags.DEFINE_string("workdir", None, "The run's --workdir.", required=True)
  flags.DEFINE_string("checkpoint", "best", "best (config.checkpoint."
                      "keep_best's), latest, or a step.")
  flags.DEFINE_list("splits", None, "Splits to evaluate (default: the run's "
                    "config.dataset.eval_splits).")
  flags.DEFINE_bool("robustness", False, "Also the accuracy with missing and "
                    "noisy modalities, on the test split (or the first of "
                    "--splits); see mmjax/robustness.py.")
  flags.DEFINE_string("robustness_reference", None, "The --workdir of a run "
                      "(e.g. late fusion) evaluated with --robustness, for "
                      "effective robustness.")
  app.run(main)
