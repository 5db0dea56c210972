"""Checks a config against the code before anything touches data or compiles.

``validate_config`` runs first in every entry point, so that a wrong name or
an impossible setting fails in the first second with a message that says what
to fix; the valid names come from their source (the registries, the modules
that use them), never from copies. ``config_changes`` tells what a resumed
run would change. Writing configs is ``mmjax.config_common``'s job.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any

import jax
import ml_collections

from mmjax import checkpoint
from mmjax import models
from mmjax import parallel
from mmjax import registry
from mmjax import steps


# Settings that may differ between a run and the run that resumes it: they
# change how long it trains, logs or saves, not what it trains.
RESUMABLE_CHANGES = ("train.steps", "train.log_every_steps",
                     "train.eval_every_steps", "train.seeds_program",
                     "checkpoint.", "eval.batch_size",
                     "input.num_threads", "input.prefetch_batches",
                     "parallel.", "dataset.data_dir",
                     "dataset.manual_dir", "allow_config_change", "init_from")


# Settings added after runs were saved without them, with the value that
# keeps those runs' behaviour: a saved config that lacks one has that value.
ADDED_SETTINGS = {"train.num_seeds": 1, "train.seeds_share_data": False,
                  "train.seeds_program": "auto", "model.dtype": "float32",
                  "model.modality_dropout": 0.0,
                  "model.loss_weighting": "fixed",
                  "parallel.cpu_devices": 0}


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """``"key: old -> new"`` for every setting that differs between two
  resolved configs (as ``config.json`` holds them), except
  ``RESUMABLE_CHANGES``."""
  old_flat, new_flat = _flatten(_as_json(saved)), _flatten(_as_json(new))
  old_flat, new_flat = ({**ADDED_SETTINGS, **old_flat},
                        {**ADDED_SETTINGS, **new_flat})
  changes = []
  for key in sorted(set(old_flat) | set(new_flat)):
    if key.startswith(RESUMABLE_CHANGES):
      continue
    old, value = old_flat.get(key, "<unset>"), new_flat.get(key, "<unset>")
    if old != value:
      changes.append(f"{key}: {old!r} -> {value!r}")
  return changes


def _as_json(tree: dict[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(tree))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the first problem found in ``config``."""
  registry.register_all()
  model = config.model
  modalities = tuple(model.modalities)
  if not modalities:
    raise ValueError("config.model.modalities is empty: name at least one "
                     f"of the configured encoders ({', '.join(model.encoders)}).")
  for modality in modalities:
    if modality not in model.encoders:
      raise ValueError(
          f"Modality {modality!r} in config.model.modalities has no encoder in "
          f"config.model.encoders (configured: {', '.join(model.encoders)}).")
    _check_part(registry.ENCODERS, model.encoders[modality],
                f"config.model.encoders.{modality}", models.PART_KEYS)
  if model.get("contrastive"):
    _check_contrastive(model)
  else:
    _check_part(registry.FUSIONS, model.fusion, "config.model.fusion",
                models.PART_KEYS)
    _check_heads(model)
  if model.get("dtype", "float32") not in models.DTYPES:
    raise ValueError(
        f"Unknown config.model.dtype {model.dtype!r}. Valid: "
        f"{', '.join(models.DTYPES)} (float16 is not offered: it would need "
        "loss scaling, which bfloat16's float32 range makes unnecessary).")
  modality_dropout = model.get("modality_dropout", 0.0)
  if not 0 <= modality_dropout < 1:
    raise ValueError(f"config.model.modality_dropout must be in [0, 1) (the "
                     "probability of dropping each modality in training); "
                     f"got {modality_dropout}.")
  from mmjax.data import preprocess  # pylint: disable=g-import-not-at-top
  for field in ("pp_train", "pp_eval"):
    preprocess.parse_pp(config.input[field])  # Raises on unknown ops, arguments.
  _check_batch_size(config.input.batch_size, "config.input.batch_size")
  _check_batch_size(config.eval.batch_size, "config.eval.batch_size")
  if config.parallel.backend not in parallel.BACKENDS:
    raise ValueError(f"Unknown config.parallel.backend "
                     f"{config.parallel.backend!r}. Valid: "
                     f"{', '.join(parallel.BACKENDS)}.")
  _check_rng_impl(config.get("rng_impl", "threefry2x32"))
  _check_name(registry.OPTIMIZERS, config.optim.name, "config.optim.name")
  _check_name(registry.SCHEDULES, config.optim.schedule,
              "config.optim.schedule")
  if config.train.steps <= 0:
    raise ValueError(f"config.train.steps must be positive; got "
                     f"{config.train.steps}.")
  if config.train.get("num_seeds", 1) < 1:
    raise ValueError(f"config.train.num_seeds must be at least 1; got "
                     f"{config.train.num_seeds}.")
  if config.train.get("seeds_program", "auto") not in steps.SEEDS_PROGRAMS:
    raise ValueError(f"Unknown config.train.seeds_program "
                     f"{config.train.seeds_program!r}. Valid: "
                     f"{', '.join(steps.SEEDS_PROGRAMS)}.")
  for part in config.get("init_from_parts", ()):
    parse_part(part)
  if config.get("init_from_parts") and not config.get("init_from"):
    raise ValueError("config.init_from_parts names parts to copy from "
                     "config.init_from, which is empty: set it to the run's "
                     "workdir.")
  _check_keep_best(config)


def parse_part(part: str) -> tuple[str, str]:
  """``config.init_from_parts``' ``"target=source"`` or ``"target"`` ->
  ``(target, source)``: top-level parameter groups, e.g.
  ``"encoders_image"``."""
  target, _, source = part.partition("=")
  target, source = target.strip(), (source or target).strip()
  if not target or not source or "=" in source:
    raise ValueError(f"config.init_from_parts entry {part!r}: write "
                     "'target=source' or 'target', e.g. 'encoders_image'.")
  return target, source


def _check_contrastive(model: ml_collections.ConfigDict) -> None:
  """A two-tower model: two modalities, a known loss and positives, and no
  fusion, heads or settings that only fusion models have."""
  from mmjax import contrastive  # pylint: disable=g-import-not-at-top
  settings = model.contrastive
  where = "config.model.contrastive"
  if settings.get("loss") not in contrastive.LOSS_NAMES:
    raise ValueError(f"{where}.loss={settings.get('loss')!r}; valid: "
                     f"{', '.join(contrastive.LOSS_NAMES)}.")
  positives = settings.get("positives", "same_text")
  if positives not in contrastive.POSITIVES:
    raise ValueError(f"{where}.positives={positives!r}; valid: "
                     f"{', '.join(contrastive.POSITIVES)}.")
  if settings.get("embed_dim", 0) <= 0:
    raise ValueError(f"{where}.embed_dim must be a positive width; got "
                     f"{settings.get('embed_dim')!r}.")
  unknown = set(settings) - {"loss", "positives", "embed_dim", "chunked"}
  if unknown:
    raise ValueError(f"{where} has unknown settings {sorted(unknown)}; valid: "
                     "loss, positives, embed_dim, chunked.")
  if len(model.modalities) != 2:
    raise ValueError("A two-tower (contrastive) model embeds exactly two "
                     "modalities, image side first; config.model.modalities "
                     f"is {tuple(model.modalities)}.")
  for key in ("fusion", "heads"):
    if model.get(key):
      raise ValueError(f"A two-tower (contrastive) model has no {key}: remove "
                       f"config.model.{key} (or config.model.contrastive).")
  if model.get("modality_dropout", 0.0) or model.get(
      "loss_weighting", "fixed") != "fixed":
    raise ValueError("config.model.modality_dropout and loss_weighting apply "
                     "to fusion models, not to a two-tower (contrastive) "
                     "model; leave them at 0 and 'fixed'.")


def _check_heads(model: ml_collections.ConfigDict) -> None:
  """Every head names a registered module, a target and a known loss; the
  first is a classification head (its accuracy is the run's); uncertainty
  weighting learns the weights, so none is set."""
  from mmjax import losses  # pylint: disable=g-import-not-at-top
  if not model.heads:
    raise ValueError("config.model.heads is empty: add at least one head.")
  weighting = model.get("loss_weighting", "fixed")
  if weighting not in losses.WEIGHTINGS:
    raise ValueError(f"Unknown config.model.loss_weighting {weighting!r}. "
                     f"Valid: {', '.join(losses.WEIGHTINGS)}.")
  for i, (head_name, head) in enumerate(model.heads.items()):
    where = f"config.model.heads.{head_name}"
    _check_part(registry.HEADS, head, where, models.HEAD_KEYS)
    if "target" not in head:
      raise ValueError(f"{where} needs a 'target': the batch key holding its "
                       "labels.")
    loss = head.get("loss", losses.DEFAULT_LOSS)
    if loss not in losses.LOSSES:
      raise ValueError(f"Unknown {where}.loss {loss!r}. Valid: "
                       f"{', '.join(losses.LOSSES)}.")
    if i == 0 and losses.LOSSES[loss].metric != "accuracy":
      raise ValueError(
          f"{where} is the first head, whose accuracy is the run's: it needs "
          "a classification loss (softmax_xent or sigmoid_xent), not "
          f"{loss!r}; put a classification head first.")
    if weighting == "uncertainty" and head.get("weight", 1.0) != 1.0:
      raise ValueError(
          f"{where}.weight={head.weight}: with config.model.loss_weighting="
          "'uncertainty' the loss weights are learned; leave the weights at 1.")


def _check_keep_best(config: ml_collections.ConfigDict) -> None:
  """``config.checkpoint.keep_best`` names a metric of the validation split,
  which the run evaluates, and ``best_mode`` a direction."""
  keep_best = config.checkpoint.get("keep_best", "")
  if not keep_best:
    return
  from mmjax import contrastive  # pylint: disable=g-import-not-at-top
  from mmjax import losses  # pylint: disable=g-import-not-at-top
  names = (contrastive.METRIC_NAMES if config.model.get("contrastive") else
           losses.metric_names(losses.head_targets(config.model.heads)))
  valid = [f"validation/{name}" for name in names]
  if keep_best not in valid:
    raise ValueError(f"config.checkpoint.keep_best={keep_best!r} is not a "
                     "metric this run evaluates during training. Valid: "
                     f"{', '.join(valid)} (or '' to keep no best checkpoint).")
  if "validation" not in config.dataset.eval_splits:
    raise ValueError("config.checkpoint.keep_best needs 'validation' in "
                     "config.dataset.eval_splits; got "
                     f"{tuple(config.dataset.eval_splits)}.")
  modes = ("auto",) + checkpoint.BEST_MODES
  if config.checkpoint.get("best_mode", "auto") not in modes:
    raise ValueError(f"Unknown config.checkpoint.best_mode "
                     f"{config.checkpoint.best_mode!r}. Valid: "
                     f"{', '.join(modes)}.")


def best_mode(config: ml_collections.ConfigDict) -> str:
  """``config.checkpoint.best_mode`` with "auto" resolved: "min" for a
  loss or an error (``losses.LOWER_IS_BETTER``), "max" for the other metrics
  (accuracies)."""
  from mmjax import losses  # pylint: disable=g-import-not-at-top
  mode = config.checkpoint.get("best_mode", "auto")
  if mode == "auto":
    metric = config.checkpoint.keep_best.split("/", 1)[1]
    return "min" if metric.startswith(losses.LOWER_IS_BETTER) else "max"
  return mode


def _check_rng_impl(name: str) -> None:
  """``config.rng_impl`` is one of jax's PRNG implementations (jax's error
  lists them)."""
  try:
    jax.random.key(0, impl=name)
  except ValueError as error:
    raise ValueError(f"config.rng_impl={name!r}: {error}") from None


def _check_name(reg: registry.Registry, name: str, where: str) -> None:
  """Raises the registry's "unknown name" error, prefixed with ``where``."""
  if name not in reg:
    raise ValueError(f"{where}: {reg.unknown_name_error(name)}")


def _check_part(reg: registry.Registry, part: ml_collections.ConfigDict,
                where: str, assembly_keys: tuple[str, ...]) -> None:
  """Checks that ``part.name`` is registered and its other keys are fields."""
  if "name" not in part:
    raise ValueError(f"{where} needs a 'name'. Valid {reg.kind} names: "
                     f"{', '.join(reg.names())}.")
  cls = reg.get(part.name)
  valid = _hyperparameter_names(cls)
  for key in part:
    if key not in assembly_keys and key not in valid:
      raise ValueError(
          f"{where}.{key} is not a hyper-parameter of {reg.kind} "
          f"{part.name!r}. Valid: {', '.join(sorted(valid))}.")


def _hyperparameter_names(cls: Any) -> set[str]:
  if dataclasses.is_dataclass(cls):
    return {f.name for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")}
  return set(inspect.signature(cls).parameters)


def _check_batch_size(batch_size: int, where: str) -> None:
  devices = jax.device_count()
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(
        f"{where}={batch_size} must be a positive multiple of the number of "
        f"devices ({devices}); try {max(devices, batch_size // devices * devices)}.")
