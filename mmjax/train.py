"""The training loop: ``train_and_evaluate(config, workdir)``.

Explicit, top to bottom: validate the config, build data, model and optimizer,
restore the newest checkpoint of ``workdir`` (or warm-start from
``config.init_from``), then alternate train steps, logging, evaluation and
checkpoints. Running the same command again on the same workdir resumes.

What a run writes in ``workdir``: ``config.json``, ``metrics.jsonl``,
``results.json`` (at the end), ``checkpoints/``, ``tb/`` and ``vocab/``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from mmjax import checkpoint as checkpoint_lib
from mmjax import config_lib
from mmjax import losses
from mmjax import metrics as metrics_lib
from mmjax import models
from mmjax import optim
from mmjax import parallel
from mmjax import steps
from mmjax.data import pipeline


class NonFiniteError(FloatingPointError):
  """The loss or gradients became NaN or infinite."""


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag checked between steps (preemption)."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` and returns the contents of
  ``results.json``."""
  config_lib.validate_config(config)
  # "rbg" compiles several times faster than threefry on CPU (seconds per
  # random call) and is as deterministic on a given platform.
  jax.config.update("jax_default_prng_impl", config.rng_impl)
  is_chief = jax.process_index() == 0
  if is_chief:
    _prepare_workdir(workdir, config)

  dp = parallel.DataParallel(config.parallel.backend)
  builder = pipeline.ensure_prepared(config)
  vocabularies = pipeline.load_or_build_vocabularies(config, workdir)
  targets = losses.head_targets(config.model.heads)
  model = models.build_model(
      config.model,
      vocab_sizes={k: v.size for k, v in vocabularies.items()},
      num_classes={t: builder.info.features[t].num_classes
                   for t, _ in targets.values() if t in builder.info.features},
      axis_name=parallel.AXIS)
  schedule = optim.make_schedule(config.optim, config.train.steps)
  tx = optim.make_optimizer(config.optim, schedule)

  train_iter = pipeline.make_train_iterator(config, vocabularies)
  example = _peek(train_iter)
  _check_batch_has(example, list(config.model.modalities) +
                   [t for t, _ in targets.values()], config)
  host_state = steps.create_train_state(
      model, tx, jax.tree.map(lambda x: x[:1], example),
      jax.random.PRNGKey(config.seed))
  num_params = models.count_params(host_state.params)

  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.checkpoint.max_to_keep,
      async_save=config.checkpoint.async_save)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_chief)
  restored = checkpointer.restore_latest(host_state, train_iter)
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

  train_step = dp.train_step(functools.partial(
      steps.train_step, model=model, tx=tx, learning_rate_fn=schedule,
      targets=targets,
      skip_nonfinite_updates=config.train.skip_nonfinite_updates))
  eval_step = dp.eval_step(functools.partial(
      steps.eval_step, model=model, targets=targets,
      mask_key=pipeline.MASK_KEY))

  def evaluate(split: str) -> dict[str, float]:
    total = None
    for batch in pipeline.eval_batches(config, split, vocabularies):
      total = metrics_lib.add_sums(total, eval_step(state, dp.shard_batch(batch)))
    return metrics_lib.sums_to_means(total)

  def save(step: int) -> None:
    checkpointer.save(step, dp.unreplicate(state), train_iter, config.to_dict())

  total_steps = config.train.steps
  global_batch = config.input.batch_size
  print(f"Training {num_params:,} parameters on {dp.num_devices} device(s) "
        f"({dp.backend}), global batch {global_batch}, steps {start_step} -> "
        f"{total_steps}.", flush=True)

  pending: list[dict[str, Any]] = []
  train_seconds = 0.0
  timed_examples, timed_seconds = 0, 0.0
  interval_start, interval_step = time.perf_counter(), start_step
  progress = tqdm.tqdm(total=total_steps, initial=start_step, disable=not is_chief,
                       dynamic_ncols=True, desc="train")
  step = start_step
  with _StopRequest() as stop:
    while step < total_steps:
      batch = dp.shard_batch(next(train_iter))
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      step += 1
      progress.update(1)

      log_now = step % config.train.log_every_steps == 0 or step == total_steps
      save_now = (step % config.checkpoint.every_steps == 0
                  or step == total_steps or stop.signal_name)
      if log_now or save_now:
        logged = metrics_lib.mean_over_steps(jax.device_get(pending))
        pending = []
        elapsed = time.perf_counter() - interval_start
        train_seconds += elapsed
        examples = (step - interval_step) * global_batch
        if interval_step > start_step:  # The first interval includes compiling.
          timed_examples, timed_seconds = (timed_examples + examples,
                                           timed_seconds + elapsed)
        logged["examples_per_sec"] = examples / max(elapsed, 1e-9)
        _check_finite(logged, step)
        writer.write(step, "train", logged)
        progress.set_postfix(loss=f"{logged['loss']:.3f}",
                             acc=f"{logged['accuracy']:.3f}")
        interval_start, interval_step = time.perf_counter(), step
      if save_now:
        save(step)
      if (step % config.train.eval_every_steps == 0 and step < total_steps):
        writer.write(step, "validation", evaluate("validation"))
        interval_start = time.perf_counter()  # Eval time is not train time.
      if stop.signal_name and step < total_steps:
        checkpointer.close()
        writer.close()
        progress.close()
        print(f"Received {stop.signal_name}: saved a checkpoint at step {step} "
              "and stopped. Run the same command again to resume.", flush=True)
        raise SystemExit(128 + getattr(signal, stop.signal_name))
  progress.close()

  results = {split: evaluate(split) for split in config.dataset.eval_splits}
  for split, split_metrics in results.items():
    writer.write(step, split, split_metrics)
  results.update(
      steps=step, train_seconds=train_seconds, num_params=num_params,
      examples_per_sec=(timed_examples / timed_seconds if timed_seconds
                        else (step - start_step) * global_batch /
                        max(train_seconds, 1e-9)))
  checkpointer.close()
  writer.close()
  if is_chief:
    _write_json(os.path.join(workdir, "results.json"), results)
  print(_summary(results), flush=True)
  return results


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


def _check_batch_has(batch: dict[str, np.ndarray], keys: list[str],
                     config: ml_collections.ConfigDict) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(
        f"The model needs {', '.join(missing)} (config.model.modalities and "
        f"head targets), but batches of {pipeline.dataset_name(config)} after "
        f"config.input.pp_train hold only: {', '.join(sorted(batch))}.")


def _peek(iterator) -> dict[str, np.ndarray]:
  """The next element of a grain iterator, leaving the iterator unmoved."""
  position = iterator.get_state()
  element = next(iterator)
  iterator.set_state(position)
  return element


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
