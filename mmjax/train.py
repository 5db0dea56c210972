"""The training loop: ``train_and_evaluate(config, workdir)``.

Explicit, top to bottom: validate the config, build data, model and optimizer,
restore the newest checkpoint of ``workdir`` (or warm-start from
``config.init_from``), then alternate train steps, logging, evaluation and
checkpoints. Running the same command again on the same workdir resumes.

What a run writes in ``workdir``: ``config.json``, ``metrics.jsonl``,
``results.json`` (at the end, with the run's cost in ``"complexity"``: FLOPs
per example, compile seconds and memory, see ``mmjax.complexity``),
``checkpoints/``, ``tb/`` and ``vocab/``; with
``config.checkpoint.keep_best`` also ``best_checkpoint/``, and ``results.json``
gains ``"best"``: the best step, its metric value and every eval split's
metrics at that step (the top-level splits stay the last step's).

With ``config.train.num_seeds = K > 1`` the run trains K independently
initialised copies of the model (seeds ``config.seed + k``) as one program
(``steps.over_seeds``, vmapped or unrolled: ``config.train.seeds_program``):
seed ``s`` writes ``seed<s>/metrics.jsonl``, ``seed<s>/tb/`` and
``seed<s>/results.json`` as a run with ``config.seed = s`` would, and
``results.json`` holds their mean, standard deviation and each seed's
results. The checkpoints hold all seeds' states, stacked.

A two-tower contrastive config (``config.model.contrastive``: CLIP or SigLIP,
``mmjax.contrastive``) trains with the same loop; its evaluation embeds each
eval split and reports retrieval recall@1/5 both ways, its loss and, with
``config.eval.zero_shot_prompts``, zero-shot accuracy (``embedding_metrics``).

Warm starts: ``config.init_from`` (a run's workdir) copies that run's newest
parameters and BatchNorm statistics into a new run; with
``config.init_from_parts`` only the named top-level parts, as ``"target"``
or ``"target=source"`` (e.g. ``("encoders_image",)``: a fusion model's image
encoder from a contrastive run's image tower), the rest keeping its fresh
initialisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from mmjax import checkpoint as checkpoint_lib
from mmjax import complexity
from mmjax import config_lib
from mmjax import contrastive
from mmjax import losses
from mmjax import metrics as metrics_lib
from mmjax import models
from mmjax import optim
from mmjax import parallel
from mmjax import preemption
from mmjax import steps
from mmjax.data import pipeline
from mmjax.data import preprocess
from mmjax.data.tokenizer import Vocabulary


class NonFiniteError(FloatingPointError):
  """The loss or gradients became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` and returns the contents of
  ``results.json``.

  On SIGTERM/SIGINT it finishes the step in progress (with its logging,
  evaluation and checkpoint), saves that step, waits until it is on disk and
  raises ``SystemExit(128 + signal)``. A step's checkpoint is written after
  its evaluation, so a run killed while evaluating resumes from an earlier
  step and evaluates that one again.
  """
  config_lib.validate_config(config)
  # "rbg" compiles several times faster than threefry on CPU (seconds per
  # random call) and is as deterministic on a given platform.
  jax.config.update("jax_default_prng_impl", config.rng_impl)
  is_chief = jax.process_index() == 0
  if is_chief:
    prepare_workdir(workdir, config)
  _check_workdir_is_shared(workdir)

  dp = parallel.DataParallel(config.parallel.backend)
  builder = prepare_dataset(config.dataset)
  preprocessing = pipeline.Preprocessing.parse(config.input)
  vocabularies = pipeline.load_or_build_vocabularies(
      config.dataset, config.input, preprocessing.text_keys, workdir)
  trainer = build_trainer(config, dp, vocabularies, builder, preprocessing)
  host_state, seeds = trainer.host_state, trainer.seeds
  num_params = models.count_params(host_state.params) // len(seeds.values)

  saved_config = config.to_dict()  # What every checkpoint stores.

  def evaluate(state, split: str) -> list[dict[str, float]]:
    """Each seed's mean metrics on ``split``."""
    if isinstance(trainer.objective, contrastive.Objective):
      return embedding_metrics(trainer.eval_step, state, config, split,
                               trainer.eval_pp, vocabularies,
                               trainer.objective, seeds.indices,
                               place=dp.shard_batch)
    total = eval_sums(trainer.eval_step, state, config, split,
                      trainer.eval_pp, place=dp.shard_batch)
    return [metrics_lib.sums_to_means(metrics_lib.seed_slice(total, i))
            for i in seeds.indices]

  # Every exit path (the end, a stop signal, NonFiniteError, any exception)
  # leaves through here: the signal handlers stay installed until the last
  # save is on disk, then the checkpointer, writer and progress bar close.
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(preemption.StopRequest())
    checkpointer = stack.enter_context(checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save))
    writers = [stack.enter_context(metrics_lib.MetricWriter(d, enabled=is_chief))
               for d in seeds.workdirs(workdir)]
    keep_best = config.checkpoint.get("keep_best", "")
    bests = [stack.enter_context(checkpoint_lib.BestCheckpoint(
        os.path.join(d, "best_checkpoint"), metric=keep_best,
        mode=config_lib.best_mode(config),
        async_save=config.checkpoint.async_save))
             for d in seeds.workdirs(workdir)] if keep_best else []
    restored = checkpointer.restore_latest(host_state)
    trained_seconds = 0.0  # Training time of the steps before start_step.
    if restored is not None:
      host_state, start_step = restored
      kept = [writer.truncate_after(start_step) for writer in writers]
      trained_seconds = _logged_train_seconds(kept[0])
      print(f"Resuming from checkpoint at step {start_step}.", flush=True)
    else:
      start_step = 0
      if config.get("init_from"):
        host_state = _warm_start(host_state, config.init_from,
                                 config.get("init_from_parts", ()), seeds)
    state = dp.replicate(host_state)
    del host_state
    programs = compile_steps(trainer, dp, state, config)
    copies = (f" x {len(seeds.values)} seeds ({seeds.describe()})"
              if seeds.stacked else "")
    print(f"Training {num_params:,} parameters{copies} on {dp.num_devices} "
          f"device(s) ({dp.backend}), global batch {config.input.batch_size}, "
          f"steps {start_step} -> {config.train.steps}.", flush=True)
    progress = stack.enter_context(tqdm.tqdm(
        total=config.train.steps, initial=start_step, disable=not is_chief,
        dynamic_ncols=True, desc="train"))

    def save(step: int) -> None:
      checkpointer.save(step, dp.host_copy(state), saved_config)

    def keep_best_states(step: int, validation: list[dict[str, float]]) -> None:
      """Saves the state of each seed whose ``keep_best`` metric improved."""
      if not bests:
        return
      metric = keep_best.split("/", 1)[1]
      host = []  # One host copy of the state, made only when needed.
      for best, means, index in zip(bests, validation, seeds.indices):
        def seed_state(index=index):
          if not host:
            host.append(dp.host_copy(state))
          return _seed_state(host[0], index)
        best.update(step, means[metric], seed_state, saved_config)

    meter = _Throughput(start_step, config.input.batch_size, trained_seconds)
    pending: list[dict[str, Any]] = []
    batches = pipeline.iterate_from(trainer.train_batches, start_step,
                                    config.input)
    step = start_step
    while step < config.train.steps:
      if stop.should_stop(step):
        break
      batch = dp.shard_batch(next(batches))
      state, step_metrics = trainer.train_step(state, batch)
      pending.append(step_metrics)
      step += 1
      progress.update(1)

      save_now = (step % config.checkpoint.every_steps == 0
                  or step == config.train.steps)
      if step % config.train.log_every_steps == 0 or save_now:
        _log_train(writers, seeds, progress, meter, step, pending)
        pending = []
      # Evaluate before saving: a run killed during the evaluation resumes
      # from the checkpoint before and evaluates this step again, instead of
      # from this step without its evaluation (nor its best checkpoint).
      if (step % config.train.eval_every_steps == 0
          and step < config.train.steps):
        validation = evaluate(state, "validation")
        for writer, means in zip(writers, validation):
          writer.write(step, "validation", means)
        keep_best_states(step, validation)
        meter.restart()  # Evaluation time is not training time.
      if save_now:
        save(step)

    if step < config.train.steps:  # Stopped by a signal.
      if pending:
        _log_train(writers, seeds, progress, meter, step, pending)
      if checkpointer.latest_step() != step:  # Not saved by the loop above.
        save(step)
      checkpointer.wait()  # Raises unless the step is on disk.
      on_disk = checkpointer.newest_step_on_disk()
      print(f"{stop.reason}: checkpoint {on_disk} is on disk (step "
            f"{on_disk} of {config.train.steps}); stopped. Run the same "
            "command again to resume.", flush=True)
      raise SystemExit(stop.exit_code)
    progress.close()

    finals = {split: evaluate(state, split)
              for split in config.dataset.eval_splits}
    if bests:
      keep_best_states(step, finals["validation"])
      at_best = _evaluate_best(bests, finals, step, trainer, dp, evaluate)
    costs = complexity_of(programs, dp, config, len(seeds.values))
    per_seed = []
    for i, writer in enumerate(writers):
      seed_results = {split: means[i] for split, means in finals.items()}
      for split, means in seed_results.items():
        writer.write(step, split, means)
      seed_results.update(steps=step, num_params=num_params,
                          complexity=costs, **meter.summary())
      if bests:
        seed_results["best"] = dict(bests[i].record, **{
            split: means[i] for split, means in at_best.items()})
      per_seed.append(seed_results)
  # The final checkpoint is on disk (the checkpointer closed).
  results = per_seed[0] if not seeds.stacked else combine_seeds(
      per_seed, seeds, config.dataset.eval_splits)
  if is_chief:
    if seeds.stacked:
      for seed_workdir, seed_results in zip(seeds.workdirs(workdir),
                                            results["per_seed"]):
        write_json(os.path.join(seed_workdir, "results.json"), seed_results)
    write_json(os.path.join(workdir, "results.json"), results)
  print(_summary(results), flush=True)
  return results


def eval_sums(eval_step: Callable[[Any, Any], dict[str, Any]], state: Any,
              config: ml_collections.ConfigDict, split: str,
              pp: preprocess.Op, *,
              place: Callable[[Any], Any] = lambda batch: batch
              ) -> dict[str, np.ndarray]:
  """``eval_step``'s metric sums over every batch of ``split`` after ``pp``
  (the evaluation preprocessing; ``metrics.sums_to_means`` gives the
  means); ``place`` puts each host batch where the step reads it (e.g.
  ``DataParallel.shard_batch``)."""
  total = None
  for batch in _eval_batches(config, split, pp):
    total = metrics_lib.add_sums(total, eval_step(state, place(batch)))
  return total


def _eval_batches(config: ml_collections.ConfigDict, split: str,
                  pp: preprocess.Op) -> Iterator[dict[str, np.ndarray]]:
  """``pipeline.eval_batches`` of ``split`` at ``config.eval.batch_size``."""
  return pipeline.eval_batches(config.dataset, config.input, pp, split,
                               batch_size=config.eval.batch_size)


def embedding_metrics(embed_step: Callable[[Any, Any], dict[str, Any]],
                      state: Any, config: ml_collections.ConfigDict,
                      split: str, pp: preprocess.Op,
                      vocabularies: dict[str, Vocabulary],
                      objective: contrastive.Objective,
                      seed_indices: list[int | None], *,
                      place: Callable[[Any], Any] = lambda batch: batch
                      ) -> list[dict[str, float]]:
  """Each seed's retrieval metrics on ``split`` (``contrastive.
  split_metrics``): ``embed_step`` (``contrastive.embed_step``, data
  parallel) embeds every batch of the split after ``pp`` (the evaluation
  preprocessing), and the prompts of ``config.eval.zero_shot_prompts`` (if
  any) as texts of one more batch."""
  outputs = [jax.device_get(embed_step(state, place(batch))) for batch in
             _eval_batches(config, split, pp)]
  prompts = tuple(config.eval.get("zero_shot_prompts", ()))
  prompt_batch = (_prompt_batch(config, split, pp, vocabularies, objective,
                                prompts) if prompts else None)
  prompt_outputs = (jax.device_get(embed_step(state, place(prompt_batch)))
                    if prompts else None)
  image_side, text_side = objective.modalities
  per_seed = []
  for index in seed_indices:
    seed_outputs = [metrics_lib.seed_slice(o, index) for o in outputs]
    real = lambda key: np.concatenate(
        [o[key][o[pipeline.MASK_KEY]] for o in seed_outputs])
    prompt_kwargs = {}
    if prompts:
      embedded = metrics_lib.seed_slice(prompt_outputs, index)
      prompt_kwargs = dict(
          prompts_CxD=embedded[text_side][:len(prompts)],
          prompt_keys_CxK=embedded[contrastive.TEXT_KEYS][:len(prompts)])
    per_seed.append(contrastive.split_metrics(
        real(image_side), real(text_side), real(contrastive.TEXT_KEYS),
        float(seed_outputs[0][contrastive.LOG_SCALE]),
        float(seed_outputs[0][contrastive.BIAS]), objective=objective,
        **prompt_kwargs))
  return per_seed


def _prompt_batch(config: ml_collections.ConfigDict, split: str,
                  pp: preprocess.Op, vocabularies: dict[str, Vocabulary],
                  objective: contrastive.Objective,
                  prompts: tuple[str, ...]) -> dict[str, np.ndarray]:
  """An eval batch of ``split`` (after ``pp``) whose first texts are the
  ``prompts``, tokenized as the pipeline tokenizes the text side."""
  text_side = objective.modalities[1]
  batch = {k: np.array(v) for k, v in _first_eval_batch(
      config, split, pp).items()}
  rows, max_len = batch[text_side].shape
  if len(prompts) > rows:
    raise ValueError(f"config.eval.zero_shot_prompts has {len(prompts)} "
                     f"prompts; at most config.eval.batch_size={rows}.")
  vocabulary = vocabularies[text_side]
  ids = vocabulary.encode_batch(np.array(prompts, object), max_len)
  batch[text_side][:len(prompts)] = ids
  if f"{text_side}_mask" in batch:
    batch[f"{text_side}_mask"][:len(prompts)] = ids != vocabulary.pad_id
  return batch


def _first_eval_batch(config: ml_collections.ConfigDict, split: str,
                      pp: preprocess.Op) -> dict[str, np.ndarray]:
  """``pipeline.first_eval_batch`` of ``split`` at
  ``config.eval.batch_size``."""
  return pipeline.first_eval_batch(config.dataset, config.input, pp, split,
                                   batch_size=config.eval.batch_size)


def compile_steps(trainer: "Trainer", dp: parallel.DataParallel, state: Any,
                  config: ml_collections.ConfigDict
                  ) -> tuple[complexity.CompiledStep, complexity.CompiledStep]:
  """Compiles the train and eval steps ahead of time for the run's batch
  shapes (the first batches'), so that their FLOPs and compile seconds are
  known; the loop's calls reuse the programs."""
  eval_batch = dp.shard_batch(_first_eval_batch(
      config, config.dataset.eval_splits[0], trainer.eval_pp))
  return (complexity.compile_ahead(trainer.train_step, state,
                                   dp.shard_batch(trainer.train_batches[0])),
          complexity.compile_ahead(trainer.eval_step, state, eval_batch))


def complexity_of(programs: tuple[complexity.CompiledStep,
                                 complexity.CompiledStep],
                  dp: parallel.DataParallel, config: ml_collections.ConfigDict,
                  num_seeds: int) -> dict[str, Any]:
  """``results.json``'s ``"complexity"``: each program's FLOPs per example of
  one seed (a device's share of the global batch, times the seeds the program
  trains), compile seconds and memory (``mmjax.complexity``)."""
  train_program, eval_program = programs
  per_device = lambda global_batch: global_batch // dp.num_devices * num_seeds
  return complexity.report(
      train_program, eval_program,
      train_examples=per_device(config.input.batch_size),
      eval_examples=per_device(config.eval.batch_size),
      devices=dp.local_devices)


def _seed_state(host_state: steps.TrainState,
                index: int | None) -> steps.TrainState:
  """Seed ``index``'s state of a stacked host state (``None``: unstacked)."""
  if index is None:
    return host_state
  return jax.tree.map(lambda x: x[index], host_state)


def _evaluate_best(bests: list[checkpoint_lib.BestCheckpoint],
                   finals: dict[str, list[dict[str, float]]], step: int,
                   trainer: "Trainer", dp: parallel.DataParallel,
                   evaluate: Callable[[Any, str], list[dict[str, float]]]
                   ) -> dict[str, list[dict[str, float]]]:
  """Each eval split's metrics (one entry per seed) of each seed's best
  state: the final ones when every seed's best is the last step, else
  computed from the best checkpoints (stacked, as the seeds train)."""
  if all(best.record["step"] == step for best in bests):
    return finals
  template = _seed_state(trainer.host_state, trainer.seeds.indices[0])
  states = []
  for best in bests:
    best.wait()
    states.append(best.restore(template))
  state = dp.replicate(steps.stack_trees(states) if trainer.seeds.stacked
                       else states[0])
  return {split: evaluate(state, split) for split in finals}


@dataclasses.dataclass(frozen=True)
class Seeds:
  """The seeds a run trains: ``config.train.num_seeds`` of them, from
  ``config.seed`` up.

  Attributes:
    values: the seeds; seed ``values[k]`` trains as a run with ``config.seed
      = values[k]`` would.
    share_data: every seed reads the batches of ``values[0]``
      (``config.train.seeds_share_data``) instead of its own data order.
  """
  values: tuple[int, ...]
  share_data: bool = False

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "Seeds":
    return cls(values=tuple(config.seed + k
                            for k in range(config.train.num_seeds)),
               share_data=config.train.seeds_share_data)

  @property
  def stacked(self) -> bool:
    """Whether train states carry a leading ``[seeds]`` axis (K > 1)."""
    return len(self.values) > 1

  @property
  def indices(self) -> list[int | None]:
    """Each seed's index on the seed axis; ``[None]`` for one seed."""
    return list(range(len(self.values))) if self.stacked else [None]

  def workdirs(self, workdir: str) -> list[str]:
    """Where each seed's metrics and results go."""
    if not self.stacked:
      return [workdir]
    return [os.path.join(workdir, f"seed{seed}") for seed in self.values]

  def describe(self) -> str:
    order = "one data order" if self.share_data else "a data order each"
    return f"seeds {self.values[0]}-{self.values[-1]}, {order}"


def combine_seeds(per_seed: list[dict[str, Any]], seeds: Seeds,
                  splits: tuple[str, ...]) -> dict[str, Any]:
  """``results.json`` of a run of several seeds: each split's mean metrics
  (``"test": {...}``, so that readers of one-seed results get the mean), their
  standard deviation over seeds (``"std": {"test": {...}}``), every seed's
  results (``"per_seed"``, each with its ``"seed"``), and the run's time and
  throughput: ``examples_per_sec`` counts every seed's examples,
  ``examples_per_sec_per_seed`` one seed's."""
  per_seed = [dict(r, seed=seed) for r, seed in zip(per_seed, seeds.values)]
  first = per_seed[0]
  results: dict[str, Any] = {"std": {}}
  _add_mean_and_std(results, results["std"], per_seed, splits)
  if "best" in first:
    bests = [r["best"] for r in per_seed]
    results["best"] = {"metric": first["best"]["metric"],
                       "steps": [b["step"] for b in bests]}
    results["std"]["best"] = {}
    _add_mean_and_std(results["best"], results["std"]["best"], bests, splits)
  results.update(
      num_seeds=len(seeds.values), seeds=list(seeds.values),
      seeds_share_data=seeds.share_data, per_seed=per_seed,
      steps=first["steps"], num_params=first["num_params"],
      complexity=first["complexity"],
      train_seconds=first["train_seconds"],
      examples_per_sec=first["examples_per_sec"] * len(seeds.values),
      examples_per_sec_per_seed=first["examples_per_sec"])
  return results


def _add_mean_and_std(means: dict[str, Any], stds: dict[str, Any],
                      per_seed: list[dict[str, Any]],
                      splits: tuple[str, ...]) -> None:
  """``means[split]`` and ``stds[split]``: each metric's mean and standard
  deviation over the seeds' ``per_seed[k][split]``."""
  for split in splits:
    values = {k: np.array([r[split][k] for r in per_seed])
              for k in per_seed[0][split]}
    means[split] = {k: float(v.mean()) for k, v in values.items()}
    stds[split] = {k: float(v.std(ddof=1)) for k, v in values.items()}


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What training an experiment needs, built by ``build_trainer``.

  Attributes:
    model: the assembled model.
    targets: head -> its ``losses.Task`` (label field, loss weight, loss);
      empty for a two-tower model.
    objective: the train step's loss (``losses.Supervised`` or
      ``contrastive.Objective``).
    seeds: the seeds trained; with several, every leaf of the state, metrics
      and eval sums has a leading ``[seeds]`` axis.
    train_batches: local train batches, indexed by step (``[local_batch,
      ...]`` numpy arrays per field; ``[local_batch, seeds, ...]`` when the
      seeds read their own data orders).
    eval_pp: the evaluation preprocessing (``input.pp_eval``, built on the
      run's vocabularies), for ``eval_sums`` and ``embedding_metrics``.
    host_state: the initial train state, one copy in host memory.
    train_step: ``(state, batch) -> (state, metrics)`` over all devices of
      ``dp``; ``train_step.lower(state, batch)`` compiles it ahead of time.
    eval_step: ``(state, batch) -> sums`` of eval metrics over all devices
      (a two-tower model: ``contrastive.embed_step``'s embeddings).
  """
  model: models.MultimodalModel | models.TwoTowerModel
  targets: dict[str, losses.Task]
  objective: Callable[..., dict[str, Any]]
  seeds: Seeds
  train_batches: grain.MapDataset
  eval_pp: preprocess.Op
  host_state: steps.TrainState
  train_step: Callable[[Any, Any], tuple[Any, dict[str, Any]]]
  eval_step: Callable[[Any, Any], dict[str, Any]]


def build_trainer(config: ml_collections.ConfigDict,
                  dp: parallel.DataParallel,
                  vocabularies: dict[str, Vocabulary],
                  builder: tfds.core.DatasetBuilder,
                  preprocessing: pipeline.Preprocessing) -> Trainer:
  """The model, optimizer, initial state, data-parallel steps and data of
  ``config``, on the dataset of ``builder`` (see ``prepare_dataset``),
  preprocessed by ``preprocessing`` (``config.input``'s, parsed) with
  ``vocabularies``.

  Draws only from ``config.seed`` (and the following seeds, with
  ``config.train.num_seeds``): the same config gives the same state.
  """
  objective = contrastive_objective(config)
  targets = {} if objective else losses.head_targets(config.model.heads)
  objective = objective or losses.Supervised(targets)
  model = model_of(config, vocabularies, builder, axis_name=parallel.AXIS)
  schedule = optim.make_schedule(config.optim, config.train.steps)
  tx = optim.make_optimizer(config.optim, schedule)

  seeds = Seeds.of(config)
  own_data = seeds.stacked and not seeds.share_data
  train_pp = preprocess.build_pp(preprocessing.train, vocabularies)
  if own_data:
    train_batches = pipeline.train_batches_over_seeds(
        config.dataset, config.input, train_pp, list(seeds.values))
  else:
    train_batches = pipeline.train_batches(config.dataset, config.input,
                                           train_pp, seeds.values[0])
  example = train_batches[0]
  _check_batch_has(example, list(config.model.modalities) +
                   [task.target for task in targets.values()], config)
  one_example = jax.tree.map(lambda x: x[:1, 0] if own_data else x[:1], example)
  rngs = [jax.random.PRNGKey(seed) for seed in seeds.values]
  if seeds.stacked:
    host_state = steps.create_seed_states(model, tx, one_example, rngs)
  else:
    host_state = steps.create_train_state(model, tx, one_example, rngs[0])

  train_step = functools.partial(
      steps.train_step, model=model, tx=tx, learning_rate_fn=schedule,
      objective=objective,
      skip_nonfinite_updates=config.train.skip_nonfinite_updates)
  if isinstance(objective, contrastive.Objective):
    eval_step = functools.partial(contrastive.embed_step, model=model,
                                  objective=objective,
                                  mask_key=pipeline.MASK_KEY)
  else:
    eval_step = functools.partial(steps.eval_step, model=model,
                                  targets=targets, mask_key=pipeline.MASK_KEY)
  if seeds.stacked:
    vectorize = _seeds_program(config) == "vmap"
    train_step = steps.over_seeds(train_step, vectorize=vectorize,
                                  batch_axis=1 if own_data else None)
    eval_step = steps.over_seeds(eval_step, batch_axis=None,
                                 vectorize=vectorize)
  return Trainer(model=model, targets=targets, objective=objective,
                 seeds=seeds,
                 train_batches=train_batches,
                 eval_pp=preprocess.build_pp(preprocessing.eval, vocabularies),
                 host_state=host_state,
                 train_step=dp.train_step(train_step),
                 eval_step=dp.eval_step(eval_step))


def contrastive_objective(config: ml_collections.ConfigDict
                          ) -> contrastive.Objective | None:
  """``config.model.contrastive`` as the train step's objective; None for a
  fusion model."""
  settings = config.model.get("contrastive")
  if not settings:
    return None
  return contrastive.Objective(
      loss=settings.loss, modalities=tuple(config.model.modalities),
      positives=settings.get("positives", "same_text"),
      chunked=settings.get("chunked", False))


def model_of(config: ml_collections.ConfigDict,
             vocabularies: dict[str, Vocabulary],
             builder: tfds.core.DatasetBuilder, *,
             axis_name: str | None) -> models.MultimodalModel:
  """``config.model``, sized by the data: vocabulary sizes and each head's
  number of classes (from the dataset's class-label features)."""
  features = builder.info.features
  targets = [task.target for task in
             losses.head_targets(config.model.get("heads", {})).values()]
  return models.build_model(
      config.model,
      vocab_sizes={k: v.size for k, v in vocabularies.items()},
      num_classes={t: features[t].num_classes for t in targets
                   if t in features and hasattr(features[t], "num_classes")},
      axis_name=axis_name)


def _seeds_program(config: ml_collections.ConfigDict) -> str:
  """``config.train.seeds_program``, with "auto" resolved: "vmap" on GPU/TPU;
  on CPU "unroll", since XLA:CPU runs a vmapped convolution as a grouped one,
  3-10x slower per example (``mmjax.bench``, README)."""
  program = config.train.seeds_program
  if program == "auto":
    return "unroll" if jax.default_backend() == "cpu" else "vmap"
  return program


class _Throughput:
  """Training time and examples/s.

  ``train_seconds``: the training loop's time without evaluation, from step 0
  (``trained_seconds``, the time of the steps before ``start_step``, comes
  from the resumed run's log). ``examples_per_sec``: this process's rate,
  without its first logging interval (which includes compiling)."""

  def __init__(self, start_step: int, global_batch: int,
               trained_seconds: float = 0.0):
    self.start_step = start_step
    self.global_batch = global_batch
    self.trained_seconds = trained_seconds
    self._process_seconds = 0.0
    self._timed_examples, self._timed_seconds = 0, 0.0
    self._interval_start, self._interval_step = time.perf_counter(), start_step

  @property
  def train_seconds(self) -> float:
    return self.trained_seconds + self._process_seconds

  def restart(self) -> None:
    self._interval_start = time.perf_counter()

  def interval(self, step: int) -> float:
    """Closes the interval ending at ``step``; returns its examples/s."""
    elapsed = time.perf_counter() - self._interval_start
    examples = (step - self._interval_step) * self.global_batch
    self._process_seconds += elapsed
    if self._interval_step > self.start_step:
      self._timed_examples += examples
      self._timed_seconds += elapsed
    self._interval_start, self._interval_step = time.perf_counter(), step
    return examples / max(elapsed, 1e-9)

  def summary(self) -> dict[str, float]:
    if self._timed_seconds:
      per_sec = self._timed_examples / self._timed_seconds
    else:
      per_sec = ((self._interval_step - self.start_step) * self.global_batch /
                 max(self._process_seconds, 1e-9))
    return {"train_seconds": self.train_seconds, "examples_per_sec": per_sec}


def _logged_train_seconds(records: list[dict[str, Any]]) -> float:
  """``train_seconds`` of the last train line of ``records`` (a resumed run's
  log up to its checkpoint); 0 if none has it (logs from before it was
  logged, or a process that writes no log)."""
  train = [r for r in records if r["split"] == "train" and "train_seconds" in r]
  return train[-1]["train_seconds"] if train else 0.0


def _log_train(writers: list[metrics_lib.MetricWriter], seeds: Seeds,
               progress: tqdm.tqdm, meter: _Throughput, step: int,
               pending: list[dict[str, Any]]) -> None:
  """Writes each seed's mean of the steps' metrics since the last log;
  raises ``NonFiniteError`` (before writing) on a NaN/Inf loss or gradient."""
  fetched = jax.device_get(pending)
  examples_per_sec = meter.interval(step)
  logged = []
  for index, seed in zip(seeds.indices, seeds.values):
    seed_logged = metrics_lib.mean_over_steps(
        [metrics_lib.seed_slice(m, index) for m in fetched])
    seed_logged["examples_per_sec"] = examples_per_sec
    seed_logged["train_seconds"] = meter.train_seconds
    _check_finite(seed_logged, step, f"seed {seed}: " if seeds.stacked else "")
    logged.append(seed_logged)
  for writer, seed_logged in zip(writers, logged):
    writer.write(step, "train", seed_logged)
  mean = lambda key: np.mean([seed_logged[key] for seed_logged in logged])
  progress.set_postfix(loss=f"{mean('loss'):.3f}", acc=f"{mean('accuracy'):.3f}")


def prepare_dataset(dataset: ml_collections.ConfigDict
                    ) -> tfds.core.DatasetBuilder:
  """The builder of ``dataset`` (``config.dataset``); process 0 generates the
  dataset if needed while the others wait, so that no two processes write
  it."""
  if jax.process_index() == 0:
    builder = pipeline.ensure_prepared(dataset)
  parallel.sync_processes("mmjax: dataset prepared")
  if jax.process_index() != 0:
    builder = pipeline.ensure_prepared(dataset)
  return builder


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates ``workdir`` and writes ``config.json``, refusing to resume a
  run whose saved config differs in what it trains."""
  config_path = os.path.join(workdir, "config.json")
  try:
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(config_path):
      with open(config_path) as f:
        changes = config_lib.config_changes(json.load(f), config.to_dict())
      if changes and not config.get("allow_config_change", False):
        raise ValueError(
            f"{workdir} holds a run with a different config; resuming it would "
            "mix two experiments:\n  " + "\n  ".join(changes) + "\nUse a new "
            "--workdir, or pass --config.allow_config_change=True to resume "
            "with the new settings.")
    write_json(config_path, config.to_dict())
  except OSError as e:
    raise OSError(f"Cannot write to workdir {workdir} ({e}); choose a writable "
                  "--workdir.") from e


def _check_workdir_is_shared(workdir: str) -> None:
  """With several processes, checks that all see process 0's ``workdir``
  (checkpoints are written once and read by all): process 0 writes a random
  token there, the others must read the same."""
  if jax.process_count() == 1:
    return
  path = os.path.join(workdir, ".process_0_token")
  token = int(np.random.default_rng().integers(2**31))
  if jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(str(token))
  token = int(parallel.gather_from_processes(np.int32(token))[0])
  try:
    with open(path) as f:
      sees = int(f.read()) == token
  except (OSError, ValueError):
    sees = False
  blind = np.flatnonzero(parallel.gather_from_processes(np.int32(not sees)))
  if jax.process_index() == 0:  # Every process has read it.
    os.remove(path)
  if blind.size:
    raise OSError(
        f"Process(es) {', '.join(map(str, blind))} do not see workdir "
        f"{workdir} as process 0 wrote it. A multi-host run writes its "
        "checkpoints once and every process reads them: put --workdir on "
        "storage that every host mounts at the same path.")


def _check_batch_has(batch: dict[str, np.ndarray], keys: list[str],
                     config: ml_collections.ConfigDict) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(
        f"The model needs {', '.join(missing)} (config.model.modalities and "
        f"head targets), but batches of "
        f"{pipeline.dataset_name(config.dataset)} after config.input.pp_train "
        f"hold only: {', '.join(sorted(batch))}.")


def _warm_start(state: steps.TrainState, init_from: str,
                parts: tuple[str, ...], seeds: Seeds) -> steps.TrainState:
  """``state`` with the parameters (and BatchNorm statistics) of the newest
  checkpoint of ``init_from``: all of them, or only the top-level ``parts``
  (``"target"`` or ``"target=source"``). A one-seed checkpoint starts every
  seed."""
  try:
    params, batch_stats, step = checkpoint_lib.load_params(init_from)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.init_from: {e}") from None
  if not parts:
    print(f"Warm start: parameters from {init_from} (step {step}).",
          flush=True)
    return state.replace(
        params=_adopt(params, state.params, seeds, "init_from"),
        batch_stats=(_adopt(batch_stats, state.batch_stats, seeds,
                            "init_from") if state.batch_stats
                     else state.batch_stats))
  new_params, new_stats = dict(state.params), dict(state.batch_stats)
  for target, source in map(config_lib.parse_part, parts):
    where = f"config.init_from_parts {target}={source}"
    if source not in params:
      raise ValueError(f"{where}: {init_from} has no part {source!r}; it has "
                       f"{', '.join(sorted(params))}.")
    if target not in state.params:
      raise ValueError(f"{where}: this model has no part {target!r}; it has "
                       f"{', '.join(sorted(state.params))}.")
    new_params[target] = _adopt(params[source], state.params[target], seeds,
                                where)
    if target in state.batch_stats:
      new_stats[target] = _adopt(batch_stats.get(source, {}),
                                 state.batch_stats[target], seeds, where)
    print(f"Warm start: {target} from {init_from}:{source} (step {step}).",
          flush=True)
  return state.replace(params=new_params, batch_stats=new_stats)


def _adopt(loaded: Any, current: Any, seeds: Seeds, what: str) -> Any:
  """``loaded`` in place of ``current`` (same structure and shapes, checked;
  cast to ``current``'s dtypes), broadcast over the seeds where ``current``
  is stacked and ``loaded`` is not."""
  if seeds.stacked and _lacks_seed_axis(loaded, current):
    loaded = jax.tree.map(
        lambda x: np.broadcast_to(x, (len(seeds.values),) + x.shape), loaded)
  checkpoint_lib.check_same_structure(loaded, current, what)
  return jax.tree.map(lambda new, old: np.asarray(new, old.dtype), loaded,
                      current)


def _lacks_seed_axis(loaded: Any, stacked: Any) -> bool:
  first = lambda tree: jax.tree.leaves(tree)[0]
  return np.ndim(first(loaded)) == np.ndim(first(stacked)) - 1


def _check_finite(logged: dict[str, float], step: int,
                  where_prefix: str = "") -> None:
  """Raises on a NaN/Inf loss or gradient, naming the parts whose gradients
  are not finite (after ``where_prefix``, e.g. the seed)."""
  bad = metrics_lib.first_nonfinite(
      {k: logged[k] for k in ("loss", "grad_norm") if k in logged})
  if bad:
    groups = [k.split("/", 1)[1] for k, v in logged.items()
              if k.startswith("grad_norm/") and not math.isfinite(v)]
    where = (f" Non-finite gradients in: {', '.join(groups)}." if groups
             else "")
    raise NonFiniteError(
        f"{where_prefix}Non-finite {bad}={logged[bad]} in the steps up to "
        f"{step}.{where} No "
        "checkpoint was written from this state. Lower config.optim."
        "learning_rate, set config.optim.grad_clip_norm, or set "
        "config.train.skip_nonfinite_updates=True to skip such updates.")


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _summary(results: dict[str, Any]) -> str:
  seeds = (f" ({results['num_seeds']} seeds)" if "num_seeds" in results
           else "")
  lines = [f"Done: {results['steps']} steps, {results['train_seconds']:.1f} s "
           f"training, {results['examples_per_sec']:.0f} examples/s{seeds}, "
           f"{results['num_params']:,} parameters."]
  for split in ("validation", "test"):
    if split not in results:
      continue
    names = [k for k in ("accuracy", "recall@1/image_to_text",
                         "recall@1/text_to_image", "accuracy/zero_shot",
                         "loss") if k in results[split]]
    if "std" in results:
      std = results["std"][split]
      lines.append(f"  {split}: " + ", ".join(
          f"{k} {results[split][k]:.4f} ± {std[k]:.4f}" for k in names) +
                   " (mean ± std over seeds)")
    else:
      lines.append(f"  {split}: " + ", ".join(
          f"{k} {results[split][k]:.4f}" for k in names))
  if "best" in results:
    best = results["best"]
    at = (f"step {best['step']}" if "step" in best else
          "steps " + ", ".join(map(str, best["steps"])))
    test = (f": test accuracy {best['test']['accuracy']:.4f}"
            if "accuracy" in best.get("test", {}) else "")
    lines.append(f"  best {best['metric']} at {at}{test}")
  return "\n".join(lines)
