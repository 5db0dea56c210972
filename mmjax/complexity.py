"""What a model costs to train and to run, from XLA's analysis of its steps.

A run compiles its train and eval steps ahead of time (``compile_ahead``):
the steps' later calls reuse those programs, and XLA's analyses of them give
the FLOPs per example (``cost_analysis``) and the memory one device's program
needs (``memory_analysis``), on every backend. ``report`` gathers them into
the ``"complexity"`` record of ``results.json``:

* ``train_flops_per_example``, ``inference_flops_per_example``: XLA's count
  of floating-point operations of one train step (forward, backward and the
  optimizer update) and one eval step (the forward pass and the metrics'
  sums), divided by the examples one device's program processes, counted once
  per seed (with ``train.num_seeds = K`` the program trains K models). The
  update is a per-step cost that every device pays (each replica applies
  it), shared by the device's examples: the train figure falls with the
  batch per device. Padding rows of the last eval batch count as examples.
* ``train_compile_seconds``, ``eval_compile_seconds``: tracing, lowering and
  compiling each step (short when the persistent compilation cache has it).
* ``train_step_peak_bytes``: XLA's buffer-assignment peak of one device's
  train program (arguments, outputs and temporaries live at once); a
  compile-time figure, available on CPU too.
* ``peak_memory_bytes``: the most bytes any local device has held during the
  run, where the backend keeps statistics (GPU, TPU); null on CPU.

Steady-state examples/sec and the parameter count are ``results.json``'s
``examples_per_sec`` and ``num_params``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

import jax


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """A step compiled ahead of time.

  Attributes:
    program: the compiled program of one device.
    seconds: tracing, lowering and compiling it.
  """
  program: Any  # jax.stages.Compiled
  seconds: float


def compile_ahead(step: Any, *args: Any) -> CompiledStep:
  """Compiles ``step`` (a ``parallel.DataParallel`` train or eval step, which
  has ``.lower``) for ``args``. Calls of ``step`` on arguments of the same
  shapes, shardings and dtypes reuse the program (``tests/test_complexity.py``
  checks both backends)."""
  start = time.perf_counter()
  program = step.lower(*args).compile()
  return CompiledStep(program=program, seconds=time.perf_counter() - start)


def flops_of(program: Any) -> float | None:
  """XLA's count of the floating-point operations of one run of ``program``
  (a ``jax.stages.Compiled``), or None where the backend gives none.

  ``cost_analysis()`` is a dict in recent jax and a list of one dict per HLO
  module in older versions.
  """
  analysis = program.cost_analysis()
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = sum(module.get("flops", 0.0) for module in analysis or [])
  return float(flops) if flops > 0 else None


def program_peak_bytes(program: Any) -> int | None:
  """XLA's peak of the buffers ``program`` holds at once, or None where the
  backend does not say."""
  try:
    stats = program.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  peak = getattr(stats, "peak_memory_in_bytes", None)
  return int(peak) if peak else None


def peak_memory_bytes(devices: Iterable[jax.Device]) -> int | None:
  """The most bytes any of ``devices`` has held so far, or None where the
  backend keeps no statistics (CPU)."""
  peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use")
           for device in devices]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def report(train: CompiledStep, evaluation: CompiledStep, *,
           train_examples: int, eval_examples: int,
           devices: Iterable[jax.Device]) -> dict[str, Any]:
  """The ``"complexity"`` record (module docstring) of a run whose compiled
  train and eval programs process ``train_examples`` and ``eval_examples``
  examples of one seed on one device."""
  return {
      "train_flops_per_example": _per_example(flops_of(train.program),
                                              train_examples),
      "inference_flops_per_example": _per_example(
          flops_of(evaluation.program), eval_examples),
      "train_compile_seconds": train.seconds,
      "eval_compile_seconds": evaluation.seconds,
      "train_step_peak_bytes": program_peak_bytes(train.program),
      "peak_memory_bytes": peak_memory_bytes(devices),
  }


def _per_example(flops: float | None, examples: int) -> float | None:
  return None if flops is None else flops / examples
