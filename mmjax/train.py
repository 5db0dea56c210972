"""The training loop: ``train_and_evaluate(config, workdir)``.

Explicit, top to bottom: validate the config, build data, model and optimizer,
restore the newest checkpoint of ``workdir`` (or warm-start from
``config.init_from``), then alternate train steps, logging, evaluation and
checkpoints. Running the same command again on the same workdir resumes.

What a run writes in ``workdir``: ``config.json``, ``metrics.jsonl``,
``results.json`` (at the end), ``checkpoints/``, ``tb/`` and ``vocab/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from mmjax import checkpoint as checkpoint_lib
from mmjax import config_lib
from mmjax import losses
from mmjax import metrics as metrics_lib
from mmjax import models
from mmjax import optim
from mmjax import parallel
from mmjax import preemption
from mmjax import steps
from mmjax.data import pipeline
from mmjax.data.tokenizer import Vocabulary


class NonFiniteError(FloatingPointError):
  """The loss or gradients became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` and returns the contents of
  ``results.json``.

  On SIGTERM/SIGINT it finishes the step in progress (with its logging,
  checkpoint and evaluation), saves that step, waits until it is on disk and
  raises ``SystemExit(128 + signal)``.
  """
  config_lib.validate_config(config)
  # "rbg" compiles several times faster than threefry on CPU (seconds per
  # random call) and is as deterministic on a given platform.
  jax.config.update("jax_default_prng_impl", config.rng_impl)
  is_chief = jax.process_index() == 0
  if is_chief:
    _prepare_workdir(workdir, config)
  _check_workdir_is_shared(workdir)

  dp = parallel.DataParallel(config.parallel.backend)
  builder = prepare_dataset(config)
  vocabularies = pipeline.load_or_build_vocabularies(config, workdir)
  trainer = build_trainer(config, dp, vocabularies, builder)
  host_state = trainer.host_state
  num_params = models.count_params(host_state.params)
  eval_step = dp.eval_step(functools.partial(
      steps.eval_step, model=trainer.model, targets=trainer.targets,
      mask_key=pipeline.MASK_KEY))

  def evaluate(state, split: str) -> dict[str, float]:
    total = None
    for batch in pipeline.eval_batches(config, split, vocabularies):
      sums = eval_step(state, dp.shard_batch(batch))
      total = metrics_lib.add_sums(total, sums)
    return metrics_lib.sums_to_means(total)

  # Every exit path (the end, a stop signal, NonFiniteError, any exception)
  # leaves through here: the signal handlers stay installed until the last
  # save is on disk, then the checkpointer, writer and progress bar close.
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(preemption.StopRequest())
    checkpointer = stack.enter_context(checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save))
    writer = stack.enter_context(
        metrics_lib.MetricWriter(workdir, enabled=is_chief))
    restored = checkpointer.restore_latest(host_state)
    if restored is not None:
      host_state, start_step = restored
      writer.truncate_after(start_step)
      print(f"Resuming from checkpoint at step {start_step}.", flush=True)
    else:
      start_step = 0
      if config.get("init_from"):
        host_state = _warm_start(host_state, config.init_from)
    state = dp.replicate(host_state)
    del host_state
    print(f"Training {num_params:,} parameters on {dp.num_devices} device(s) "
          f"({dp.backend}), global batch {config.input.batch_size}, steps "
          f"{start_step} -> {config.train.steps}.", flush=True)
    progress = stack.enter_context(tqdm.tqdm(
        total=config.train.steps, initial=start_step, disable=not is_chief,
        dynamic_ncols=True, desc="train"))

    def save(step: int) -> None:
      checkpointer.save(step, dp.host_copy(state), config.to_dict())

    meter = _Throughput(start_step, config.input.batch_size)
    pending: list[dict[str, Any]] = []
    batches = pipeline.iterate_from(trainer.train_batches, start_step, config)
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
        _log_train(writer, progress, meter, step, pending)
        pending = []
      if save_now:
        save(step)
      if (step % config.train.eval_every_steps == 0
          and step < config.train.steps):
        writer.write(step, "validation", evaluate(state, "validation"))
        meter.restart()  # Evaluation time is not training time.

    if step < config.train.steps:  # Stopped by a signal.
      if pending:
        _log_train(writer, progress, meter, step, pending)
      if checkpointer.latest_step() != step:  # Not saved by the loop above.
        save(step)
      checkpointer.wait()  # Raises unless the step is on disk.
      on_disk = checkpointer.newest_step_on_disk()
      print(f"{stop.reason}: checkpoint {on_disk} is on disk (step "
            f"{on_disk} of {config.train.steps}); stopped. Run the same "
            "command again to resume.", flush=True)
      raise SystemExit(stop.exit_code)
    progress.close()

    results = {split: evaluate(state, split)
               for split in config.dataset.eval_splits}
    for split, split_metrics in results.items():
      writer.write(step, split, split_metrics)
    results.update(steps=step, num_params=num_params, **meter.summary())
  # The final checkpoint is on disk (the checkpointer closed).
  if is_chief:
    _write_json(os.path.join(workdir, "results.json"), results)
  print(_summary(results), flush=True)
  return results


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What training an experiment needs, built by ``build_trainer``.

  Attributes:
    model: the assembled model.
    targets: head -> ``(label field, loss weight)``.
    train_batches: local train batches, indexed by step (``[local_batch,
      ...]`` numpy arrays per field).
    host_state: the initial train state, one copy in host memory.
    train_step: ``(state, batch) -> (state, metrics)`` over all devices of
      ``dp``; ``train_step.lower(state, batch)`` compiles it ahead of time.
  """
  model: models.MultimodalModel
  targets: dict[str, tuple[str, float]]
  train_batches: grain.MapDataset
  host_state: steps.TrainState
  train_step: Callable[[Any, Any], tuple[Any, dict[str, Any]]]


def build_trainer(config: ml_collections.ConfigDict,
                  dp: parallel.DataParallel,
                  vocabularies: dict[str, Vocabulary],
                  builder: tfds.core.DatasetBuilder) -> Trainer:
  """The model, optimizer, initial state and data-parallel train step of
  ``config``, on the dataset of ``builder`` (see ``prepare_dataset``).

  Draws only from ``config.seed``: the same config gives the same state.
  """
  targets = losses.head_targets(config.model.heads)
  model = models.build_model(
      config.model,
      vocab_sizes={k: v.size for k, v in vocabularies.items()},
      num_classes={t: builder.info.features[t].num_classes
                   for t, _ in targets.values() if t in builder.info.features},
      axis_name=parallel.AXIS)
  schedule = optim.make_schedule(config.optim, config.train.steps)
  tx = optim.make_optimizer(config.optim, schedule)

  train_batches = pipeline.train_batches(config, vocabularies)
  example = train_batches[0]
  _check_batch_has(example, list(config.model.modalities) +
                   [t for t, _ in targets.values()], config)
  host_state = steps.create_train_state(
      model, tx, jax.tree.map(lambda x: x[:1], example),
      jax.random.PRNGKey(config.seed))

  train_step = dp.train_step(functools.partial(
      steps.train_step, model=model, tx=tx, learning_rate_fn=schedule,
      targets=targets,
      skip_nonfinite_updates=config.train.skip_nonfinite_updates))
  return Trainer(model=model, targets=targets, train_batches=train_batches,
                 host_state=host_state, train_step=train_step)


class _Throughput:
  """Training time and examples/s, without evaluation or the first logging
  interval (which includes compiling)."""

  def __init__(self, start_step: int, global_batch: int):
    self.start_step = start_step
    self.global_batch = global_batch
    self.train_seconds = 0.0
    self._timed_examples, self._timed_seconds = 0, 0.0
    self._interval_start, self._interval_step = time.perf_counter(), start_step

  def restart(self) -> None:
    self._interval_start = time.perf_counter()

  def interval(self, step: int) -> float:
    """Closes the interval ending at ``step``; returns its examples/s."""
    elapsed = time.perf_counter() - self._interval_start
    examples = (step - self._interval_step) * self.global_batch
    self.train_seconds += elapsed
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
                 max(self.train_seconds, 1e-9))
    return {"train_seconds": self.train_seconds, "examples_per_sec": per_sec}


def _log_train(writer: metrics_lib.MetricWriter, progress: tqdm.tqdm,
               meter: _Throughput, step: int,
               pending: list[dict[str, Any]]) -> None:
  """Writes the mean of the steps' metrics since the last log; raises
  ``NonFiniteError`` on a NaN/Inf loss or gradient."""
  logged = metrics_lib.mean_over_steps(jax.device_get(pending))
  logged["examples_per_sec"] = meter.interval(step)
  _check_finite(logged, step)
  writer.write(step, "train", logged)
  progress.set_postfix(loss=f"{logged['loss']:.3f}",
                       acc=f"{logged['accuracy']:.3f}")


def prepare_dataset(config: ml_collections.ConfigDict
                    ) -> tfds.core.DatasetBuilder:
  """The dataset's builder; process 0 generates the dataset if needed while
  the others wait, so that no two processes write it."""
  if jax.process_index() == 0:
    builder = pipeline.ensure_prepared(config)
  parallel.sync_processes("mmjax: dataset prepared")
  if jax.process_index() != 0:
    builder = pipeline.ensure_prepared(config)
  return builder


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
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
    _write_json(config_path, config.to_dict())
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
        f"head targets), but batches of {pipeline.dataset_name(config)} after "
        f"config.input.pp_train hold only: {', '.join(sorted(batch))}.")


def _warm_start(state: steps.TrainState, init_from: str) -> steps.TrainState:
  params, batch_stats, step = checkpoint_lib.load_params(init_from)
  checkpoint_lib.check_same_structure(params, state.params, "init_from")
  print(f"Warm start: parameters from {init_from} (step {step}).", flush=True)
  cast = lambda new, old: np.asarray(new, old.dtype)
  return state.replace(
      params=jax.tree.map(cast, params, state.params),
      batch_stats=(jax.tree.map(cast, batch_stats, state.batch_stats)
                   if state.batch_stats else state.batch_stats))


def _check_finite(logged: dict[str, float], step: int) -> None:
  """Raises on a NaN/Inf loss or gradient, naming the parts whose gradients
  are not finite."""
  bad = metrics_lib.first_nonfinite(
      {k: logged[k] for k in ("loss", "grad_norm") if k in logged})
  if bad:
    groups = [k.split("/", 1)[1] for k, v in logged.items()
              if k.startswith("grad_norm/") and not math.isfinite(v)]
    where = (f" Non-finite gradients in: {', '.join(groups)}." if groups
             else "")
    raise NonFiniteError(
        f"Non-finite {bad}={logged[bad]} in the steps up to {step}.{where} No "
        "checkpoint was written from this state. Lower config.optim."
        "learning_rate, set config.optim.grad_clip_norm, or set "
        "config.train.skip_nonfinite_updates=True to skip such updates.")


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _summary(results: dict[str, Any]) -> str:
  lines = [f"Done: {results['steps']} steps, {results['train_seconds']:.1f} s "
           f"training, {results['examples_per_sec']:.0f} examples/s, "
           f"{results['num_params']:,} parameters."]
  for split in ("validation", "test"):
    if split in results:
      lines.append(f"  {split}: accuracy {results[split]['accuracy']:.4f}, "
                   f"loss {results[split]['loss']:.4f}")
  return "\n".join(lines)
