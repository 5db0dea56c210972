r"""Benchmarks an experiment's train step, input pipeline and device.

    python -m mmjax.bench --config=<experiment file>[:args] [--config.x=y ...] \
        [--steps=N] [--warmup=W] [--repeats=R] [--batch_size=B] \
        [--pipeline_batches=P]

The model, optimizer, state and data-parallel step are built by
``train.build_trainer``, as training builds them. The step runs on one real
train batch (the experiment's shapes and dtypes), put on the devices once and
reused, so that only the step is timed: ``W`` warm-up steps, then the median
over ``R`` runs of ``N`` steps. The input pipeline is timed alone, on ``P``
batches. Progress goes to stderr; stdout gets one JSON line::

    {"experiment", "backend", "devices", "device_kind", "batch_size",
     "num_seeds", "examples_per_sec", "examples_per_sec_per_seed",
     "ms_per_step", "compile_seconds", "flops_per_step", "achieved_gflops",
     "matmul_gflops", "fraction_of_matmul", "pipeline_examples_per_sec",
     "train_step_peak_bytes", "peak_memory_bytes"}

with null where a value is unknown. With ``--config.train.num_seeds=K`` a
step trains K seeds on a batch each: ``examples_per_sec`` counts every
seed's examples, ``examples_per_sec_per_seed`` one seed's (what each of K
separate runs would see). ``compile_seconds`` covers tracing,
lowering and compiling the step. ``flops_per_step`` is XLA's estimate
(``cost_analysis()`` of the compiled step) for the program of one device,
times the number of devices. ``matmul_gflops`` is the rate of a jitted float32
matmul on one device (``MATMUL_SIZE``), and ``fraction_of_matmul`` compares
the step's rate per device with it (understated on devices simulated on one
CPU, which share its cores). ``pipeline_examples_per_sec`` counts this
process's part of the batches, and every seed's examples they feed.
``train_step_peak_bytes`` is XLA's buffer peak of one device's compiled step;
``peak_memory_bytes``, the devices' own statistic, is null on CPU, whose
devices keep none (``mmjax.complexity``).

The reference experiments (AV-MNIST late fusion at batch 40 and 256, tensor,
low-rank and FiLM fusion, the first building the dataset once, ~2 min; the
``mm_shapes`` main job, FiLM, and its attention bottleneck fusion):

  python -m mmjax.bench --config=experiments/avmnist.py \
      --config.dataset.manual_dir=../shared/data/avmnist_raw
  python -m mmjax.bench --config=experiments/avmnist.py \
      --config.dataset.manual_dir=../shared/data/avmnist_raw --batch_size=256
  python -m mmjax.bench --config=experiments/avmnist.py:fusion=tensor \
      --config.dataset.manual_dir=../shared/data/avmnist_raw
  python -m mmjax.bench --config=experiments/avmnist.py:fusion=low_rank \
      --config.dataset.manual_dir=../shared/data/avmnist_raw
  python -m mmjax.bench --config=experiments/avmnist.py:fusion=film \
      --config.dataset.manual_dir=../shared/data/avmnist_raw
  python -m mmjax.bench --config=experiments/mm_shapes.py
  python -m mmjax.bench --config=experiments/mm_shapes.py:fusion=mbt

One process only: on several hosts each would measure its own part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Callable, Iterator

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from mmjax import complexity
from mmjax import config_lib
from mmjax import parallel
from mmjax import train
from mmjax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, optionally with ':arguments'.",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per run.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compiling.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of --steps steps; "
                                "the median is reported.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size "
                                   "(default: config.input.batch_size).")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 20, "Batches "
                                         "read to time the input pipeline.")

# Side of the square float32 matmul that measures the device (large enough
# that dispatch does not count).
MATMUL_SIZE = {"cpu": 2048}
MATMUL_SIZE_ACCELERATOR = 8192
PIPELINE_WARMUP_BATCHES = 2


def benchmark(config: ml_collections.ConfigDict, experiment: str, *,
              steps: int, warmup: int, repeats: int,
              pipeline_batches: int) -> dict[str, Any]:
  """Builds ``config``'s trainer and measures it; returns the JSON record
  (see the module docstring) of ``experiment`` (the config file and args)."""
  config_lib.validate_config(config)
  jax.config.update("jax_default_prng_impl", config.rng_impl)
  dp = parallel.DataParallel(config.parallel.backend)
  trainer = _build_trainer(config, dp)
  batch_size = config.input.batch_size
  _progress(f"Compiling the train step, then timing {repeats} x {steps} steps "
            f"after {warmup} ({dp.num_devices} device(s), {dp.backend}, "
            f"global batch {batch_size})...")
  step = measure_step(trainer.train_step, dp.replicate(trainer.host_state),
                      dp.shard_batch(trainer.train_batches[0]), steps=steps,
                      warmup=warmup, repeats=repeats)
  peak_memory = complexity.peak_memory_bytes(dp.local_devices)  # Not matmul's.
  _progress("Timing a float32 matmul...")
  matmul = matmul_gflops(MATMUL_SIZE.get(jax.default_backend(),
                                         MATMUL_SIZE_ACCELERATOR))
  _progress(f"Timing the input pipeline on {pipeline_batches} batches...")
  num_seeds = len(trainer.seeds.values)
  pipeline_rate = pipeline_examples_per_sec(
      pipeline.iterate_from(trainer.train_batches, 0, config.input),
      pipeline.local_batch_size(batch_size) * num_seeds,
      num_batches=pipeline_batches)

  flops = (None if step.device_flops is None
           else step.device_flops * dp.num_devices)
  achieved = None if flops is None else flops / step.seconds / 1e9
  return {
      "experiment": experiment,
      "backend": jax.default_backend(),
      "devices": dp.num_devices,
      "device_kind": dp.devices[0].device_kind,
      "batch_size": batch_size,
      "num_seeds": num_seeds,
      "examples_per_sec": num_seeds * batch_size / step.seconds,
      "examples_per_sec_per_seed": batch_size / step.seconds,
      "ms_per_step": step.seconds * 1e3,
      "compile_seconds": step.compile_seconds,
      "flops_per_step": flops,
      "achieved_gflops": achieved,
      "matmul_gflops": matmul,
      "fraction_of_matmul": (None if achieved is None
                             else achieved / dp.num_devices / matmul),
      "pipeline_examples_per_sec": pipeline_rate,
      "train_step_peak_bytes": step.device_peak_bytes,
      "peak_memory_bytes": peak_memory,
  }


def _build_trainer(config: ml_collections.ConfigDict,
                   dp: parallel.DataParallel) -> train.Trainer:
  """``train.build_trainer`` on the prepared dataset, with vocabularies built
  from the train split as a new run builds them (no workdir)."""
  builder = train.prepare_dataset(config.dataset)
  preprocessing = pipeline.Preprocessing.parse(config.input)
  vocabularies = {key: pipeline.build_vocabulary(config.dataset, config.input,
                                                 key)
                  for key in preprocessing.text_keys}
  return train.build_trainer(config, dp, vocabularies, builder, preprocessing)


@dataclasses.dataclass(frozen=True)
class StepMeasurement:
  """What ``measure_step`` measured.

  Attributes:
    compile_seconds: tracing, lowering and compiling the step.
    seconds: per step, the median of the timed runs.
    device_flops: XLA's count for one device's program, or None.
    device_peak_bytes: XLA's buffer peak of one device's program, or None.
  """
  compile_seconds: float
  seconds: float
  device_flops: float | None
  device_peak_bytes: int | None


def measure_step(step: Callable[[Any, Any], tuple[Any, Any]], state: Any,
                 batch: Any, *, steps: int, warmup: int,
                 repeats: int) -> StepMeasurement:
  """Compiles ``step`` (a ``DataParallel.train_step``) for ``state`` and
  ``batch`` ahead of time, then times it with ``seconds_per_step``.

  ``state`` is donated: do not use it afterwards.
  """
  compiled = complexity.compile_ahead(step, state, batch)  # Calls reuse it.
  seconds = seconds_per_step(step, state, batch, steps=steps, warmup=warmup,
                             repeats=repeats)
  return StepMeasurement(
      compile_seconds=compiled.seconds, seconds=seconds,
      device_flops=complexity.flops_of(compiled.program),
      device_peak_bytes=complexity.program_peak_bytes(compiled.program))


def seconds_per_step(step: Callable[[Any, Any], tuple[Any, Any]], state: Any,
                     batch: Any, *, steps: int, warmup: int,
                     repeats: int) -> float:
  """The median over ``repeats`` runs of ``steps`` calls of ``state, _ =
  step(state, batch)`` (after ``warmup`` calls) of the seconds per call.

  ``state`` is donated to the first call: do not use it afterwards.
  """
  for _ in range(warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, _ = step(state, batch)
    jax.block_until_ready(state)
    runs.append((time.perf_counter() - start) / steps)
  return statistics.median(runs)


def matmul_gflops(size: int, runs: int = 5) -> float:
  """Float32 ``[size, size] @ [size, size]`` GFLOP/s (``2 * size**3`` flops)
  on the default device, jitted: the median of ``runs`` timed products."""
  a_NxN = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a_NxN, a_NxN))  # Compiles.
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a_NxN, a_NxN))
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times) / 1e9


def pipeline_examples_per_sec(batches: Iterator[dict[str, Any]],
                              batch_size: int, *, num_batches: int) -> float:
  """Examples/s read from ``batches`` (of ``batch_size`` examples each): the
  time of ``num_batches`` batches after ``PIPELINE_WARMUP_BATCHES`` (threads
  starting)."""
  for _ in range(PIPELINE_WARMUP_BATCHES):
    next(batches)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * batch_size / (time.perf_counter() - start)


def _progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  parallel.use_cpu_devices(config.parallel.cpu_devices)
  if _BATCH_SIZE.value is not None:
    config.input.batch_size = _BATCH_SIZE.value
  experiment = config_flags.get_config_filename(flags.FLAGS["config"])
  # Only the record goes to stdout (dataset building prints there).
  with contextlib.redirect_stdout(sys.stderr):
    record = benchmark(config, experiment, steps=_STEPS.value,
                       warmup=_WARMUP.value, repeats=_REPEATS.value,
                       pipeline_batches=_PIPELINE_BATCHES.value)
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
