"""What every experiment file shares, as big_vision's ``configs/common.py``.

An experiment file's ``get_config(arg)`` receives the string after the colon
in ``--config=experiments/x.py:fusion=concat,runlocal``. ``parse_arg`` turns
it into a ``ConfigDict`` with typed defaults; ``base_config()`` holds the
sections and settings every experiment shares, so that the file states only
what differs; ``apply_runlocal`` shrinks a config to a few steps for tests
and CI.

This module imports ``ml_collections`` and the standard library only: loading
an experiment file never imports jax or a model. Checking a config against
the code (names in the registries, batch sizes against devices) is
``mmjax.config_lib``'s job, when a run starts.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any

import ml_collections

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict typed like ``defaults``.

  A bare name (``runlocal``) means ``True``. Tuples are written with ``+``
  (``modalities=image+question``). Keys that are not in ``defaults`` are
  rejected, listing the valid ones.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}. Valid arguments: "
          f"{', '.join(sorted(defaults))}.")
    parsed[key] = _parse_value(key, value if "=" in item else "True",
                               defaults[key])
  return parsed


def _parse_value(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() not in _TRUE + _FALSE:
      raise ValueError(f"Config argument {key!r} takes true/false; got {value!r}.")
    return value.lower() in _TRUE
  if isinstance(default, tuple):
    return tuple(v for v in value.split("+") if v)
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise ValueError(f"Config argument {key!r} takes a {type(default).__name__};"
                       f" got {value!r}.") from None
  return value


def base_config() -> ml_collections.ConfigDict:
  """The settings every experiment shares, at their defaults.

  An experiment sets ``dataset.name``, ``input``'s preprocessing,
  ``model``'s modalities, encoders, fusion and heads, and updates whatever
  else differs (``config.optim.update(name="sgd", ...)``).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.rng_impl = "rbg"  # jax_default_prng_impl: "rbg" or "threefry2x32".
  config.init_from = ""  # A run's workdir to warm-start from,
  config.init_from_parts = ()  # all of it, or these parts ("encoders_image").
  config.allow_config_change = False  # Resume a workdir with other settings.

  # config: the TFDS builder config; manual_dir: where a builder that reads
  # downloaded files finds them.
  config.dataset = dict(name="", config="", data_dir="", manual_dir="",
                        train_split="train",
                        eval_splits=("validation", "test"))
  # pp_train, pp_eval: preprocessing ops, "op(key=...)|op(...)"
  # (mmjax/data/preprocess.py). cache: decode each split once, into memory.
  config.input = dict(batch_size=128, pp_train="", pp_eval="", num_threads=2,
                      prefetch_batches=8, cache=False)
  config.model = dict(
      modalities=(), encoders={}, fusion={}, heads={},
      # In training, drop each modality of an example with this probability
      # (never all; mmjax/models.py).
      modality_dropout=0.0,
      # Compute dtype: "bfloat16" on GPU/TPU; parameters stay float32.
      dtype="float32")
  # schedule: constant, warmup_cosine or step (mmjax/optim.py); momentum is
  # SGD's, b1 and b2 AdamW's; grad_clip_norm 0 clips nothing.
  config.optim = dict(name="adamw", learning_rate=1e-3, schedule="constant",
                      warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999,
                      momentum=0.9, grad_clip_norm=0.0, decay_steps=(),
                      decay_factor=0.1)
  config.train = dict(steps=1000, log_every_steps=50, eval_every_steps=500,
                      skip_nonfinite_updates=False,
                      # K > 1: seeds seed..seed+K-1 as one program,
                      # vmapped on GPU/TPU, unrolled on CPU ("auto").
                      num_seeds=1, seeds_share_data=False,
                      seeds_program="auto")
  config.eval = dict(batch_size=500)
  # keep_best="validation/accuracy" also keeps the best validation step's
  # state and reports the test metrics there ("" keeps none).
  config.checkpoint = dict(every_steps=500, max_to_keep=2, async_save=True,
                           keep_best="", best_mode="auto")
  # backend: or "shard_map"; cpu_devices=N splits a CPU-only host into N
  # devices (0: one), faster for small models (mmjax/parallel.py).
  config.parallel = dict(backend="pmap", cpu_devices=0)
  return config


def svm_baseline() -> dict[str, Any]:
  """``config.svm`` of the classical baseline (mmjax/svm.py): one RBF SVM on
  the modalities' standardised inputs concatenated, C x gamma (factors of
  scikit-learn's "scale") chosen on validation, fit on 10,000 train
  examples: the kernel matrix grows with the square of the examples (10,000:
  0.8 GB)."""
  return dict(features="concat", max_train_examples=10_000,
              C=(1.0, 10.0, 100.0, 1000.0), gamma_factors=(0.01, 0.1, 1.0))


def apply_runlocal(config: ml_collections.ConfigDict, *, batch_size: int,
                   eval_batch_size: int) -> ml_collections.ConfigDict:
  """Shrinks ``config`` in place to 6 steps on small batches, evaluating at
  step 4 and saving every 3 steps, for tests and CI. Returns it."""
  config.input.batch_size = batch_size
  config.train.update(steps=6, log_every_steps=2, eval_every_steps=4)
  config.checkpoint.every_steps = 3
  config.eval.batch_size = eval_batch_size
  if "svm" in config:
    config.svm.update(max_train_examples=1000, C=(10.0, 100.0),
                      gamma_factors=(0.1, 1.0))
  return config


def sibling_experiment(this_file: str, name: str,
                       arg: str) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of experiment file ``name`` in the directory of
  ``this_file``: for an experiment that extends another, e.g.
  ``sibling_experiment(__file__, "mm_shapes.py", "fusion=film")``."""
  return sibling_file(this_file, name).get_config(arg)


def sibling_file(this_file: str, name: str) -> types.ModuleType:
  """The Python file ``name`` (a path relative to the directory of
  ``this_file``, e.g. ``"../avmnist.py"``), imported (experiment and ablation
  files are files, not packages)."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
  stem = os.path.basename(name).removesuffix(".py")
  return import_file(path, f"mmjax_file_{stem}")


def import_file(path: str, module_name: str) -> types.ModuleType:
  """Imports the Python file at ``path`` as a module named ``module_name``."""
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
