"""Where metrics go: ``metrics.jsonl``, TensorBoard and the console.

``metrics.jsonl`` holds one JSON object per line,
``{"step": int, "split": "train" | "validation" | "test", <metric>: float}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import numpy as np


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def mean_over_steps(per_step: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages train metrics fetched from several steps."""
  keys = per_step[0].keys()
  return {k: float(np.mean([np.asarray(m[k]) for m in per_step])) for k in keys}


def sums_to_means(sums: Mapping[str, Any]) -> dict[str, float]:
  """Eval sums (with ``count``) -> means over examples."""
  count = float(sums["count"])
  return {k: float(v) / max(count, 1.0) for k, v in sums.items() if k != "count"}


def add_sums(total: dict[str, np.ndarray] | None,
             sums: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Accumulates eval sums (scalars, or ``[seeds]`` arrays) in float64."""
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  return sums if total is None else {k: total[k] + sums[k] for k in total}


def seed_slice(metrics: Mapping[str, Any], seed_index: int | None
               ) -> dict[str, Any]:
  """Seed ``seed_index``'s values of metrics with a leading ``[seeds]`` axis;
  ``metrics`` itself when ``seed_index`` is None (a run of one seed)."""
  if seed_index is None:
    return dict(metrics)
  return {k: np.asarray(v)[seed_index] for k, v in metrics.items()}


def first_nonfinite(metrics: Mapping[str, float]) -> str | None:
  """The name of the first metric that is NaN or infinite, else None."""
  for name, value in metrics.items():
    if not math.isfinite(value):
      return name
  return None


class MetricWriter:
  """Appends metrics to ``workdir/metrics.jsonl`` and ``workdir/tb``.

  Only process 0 writes; other processes get a writer that does nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def truncate_after(self, step: int) -> list[dict[str, Any]]:
    """Drops lines logged after ``step`` (a resumed run logs them again);
    returns the records kept (none on a disabled writer)."""
    if not self.enabled or not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      logged = [(line, json.loads(line)) for line in f if line.strip()]
    kept = [(line, record) for line, record in logged if record["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(line for line, _ in kept)
    os.replace(tmp, self.path)
    return [record for _, record in kept]

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **to_floats(metrics)}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name not in ("step", "split"):
        self._tb.add_scalar(f"{split}/{name}", value, step)
    logging.info("step %d %s: %s", step, split, ", ".join(
        f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "split")))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Every record of ``workdir/metrics.jsonl``, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
