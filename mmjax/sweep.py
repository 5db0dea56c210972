r"""Runs an ablation file's variants one after another, and tabulates them.

An ablation file (``experiments/ablations/*.py``) names one experiment file and
lists its variants as config overrides, never as code::

    CONFIG = "experiments/mm_shapes.py"

    def get_sweep() -> list[dict]:
      return [dict(name="film", arg="fusion=film", overrides={"seed": 0}),
              ...]

Each variant runs as ``python -m mmjax.main --config=CONFIG:arg
--workdir=WORKDIR/name --config.<key>=<value>...`` in its own process, so a
sweep resumes where it stopped: finished variants (with ``results.json``) are
skipped and an interrupted one resumes from its checkpoint. Variants that
share a ``group`` (e.g. the seeds of one method) are reported as mean and
standard deviation. A variant with the override ``train.num_seeds=K`` trains
its K seeds as one vectorised program (``mmjax.train``) and counts as K runs
of its group::

    python -m mmjax.sweep --sweep=experiments/ablations/mm_shapes_fusion.py \
        --workdir=/tmp/mmjax/ablations/mm_shapes_fusion
    python -m mmjax.sweep --sweep=... --workdir=... --report   # table only

The table is printed and written to ``WORKDIR/report.md``, with a bar chart
of the accuracies in ``WORKDIR/report.png``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags

_SWEEP = flags.DEFINE_string("sweep", None, "Ablation file.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent of the variants' "
                               "workdirs.", required=True)
_ONLY = flags.DEFINE_list("only", [], "Run only these variant names.")
_REPORT = flags.DEFINE_bool("report", False, "Only print the table.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands only.")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run of a sweep.

  Attributes:
    name: the run's workdir name under the sweep's workdir.
    arg: the experiment file's argument string (``"fusion=film,..."``).
    overrides: ``{"train.steps": 3000}`` -> ``--config.train.steps=3000``.
    group: runs reported together (mean and std); defaults to ``name``.
  """
  name: str
  arg: str = ""
  overrides: tuple[tuple[str, Any], ...] = ()
  group: str = ""

  @property
  def group_name(self) -> str:
    return self.group or self.name

  @property
  def num_seeds(self) -> int:
    """The seeds the variant trains (``train.num_seeds``, default 1)."""
    return int(dict(self.overrides).get("train.num_seeds", 1))


def load_sweep(path: str) -> tuple[str, list[Variant]]:
  """Reads an ablation file -> (experiment file, variants)."""
  spec = importlib.util.spec_from_file_location("mmjax_sweep_file", path)
  if spec is None or not os.path.exists(path):
    raise ValueError(f"No ablation file at {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  variants = [Variant(name=v["name"], arg=v.get("arg", ""),
                      overrides=tuple(v.get("overrides", {}).items()),
                      group=v.get("group", ""))
              for v in module.get_sweep()]
  names = [v.name for v in variants]
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise ValueError(f"{path}: variant names must be unique; repeated: "
                     f"{duplicated}.")
  return module.CONFIG, variants


def command(config_path: str, variant: Variant, workdir: str) -> list[str]:
  """The ``mmjax.main`` command line of one variant."""
  config = f"{config_path}:{variant.arg}" if variant.arg else config_path
  cmd = [sys.executable, "-m", "mmjax.main", f"--config={config}",
         f"--workdir={os.path.join(workdir, variant.name)}"]
  for key, value in variant.overrides:
    if isinstance(value, (tuple, list)):
      # ``config_flags`` reads a tuple as a Python literal: "(8, 16)",
      # "('image',)". (``+`` joins tuples in the experiment file's argument,
      # not here: "8+16" would be read as the 1-tuple ('8+16',).)
      value = repr(tuple(value))
    cmd.append(f"--config.{key}={value}")
  return cmd


def read_results(workdir: str, variant: Variant) -> dict[str, Any] | None:
  path = os.path.join(workdir, variant.name, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_sweep(config_path: str, variants: Sequence[Variant], workdir: str,
              dry_run: bool = False) -> list[str]:
  """Runs the variants without results; returns the names of failed ones.

  Each variant's output goes to ``WORKDIR/<name>.log``.
  """
  os.makedirs(workdir, exist_ok=True)
  failed = []
  for i, variant in enumerate(variants):
    cmd = command(config_path, variant, workdir)
    if read_results(workdir, variant) is not None:
      print(f"[{i + 1}/{len(variants)}] {variant.name}: done already.")
      continue
    print(f"[{i + 1}/{len(variants)}] {variant.name}: {shlex.join(cmd)}",
          flush=True)
    if dry_run:
      continue
    start = time.time()
    with open(os.path.join(workdir, f"{variant.name}.log"), "a") as log:
      returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  check=False).returncode
    status = "ok" if returncode == 0 else f"FAILED (exit {returncode})"
    print(f"    {status} in {time.time() - start:.0f} s", flush=True)
    if returncode:
      failed.append(variant.name)
      if returncode in (128 + 2, 128 + 15):  # Interrupted: stop the sweep too.
        break
  return failed


def grouped_results(variants: Sequence[Variant], workdir: str
                    ) -> dict[str, list[dict[str, Any] | None]]:
  """``{group: [results or None per seed run]}``, in sweep order: a variant
  of K seeds gives its K seeds' results (``per_seed`` of its
  ``results.json``), or K ``None`` until it has finished."""
  groups: dict[str, list[dict[str, Any] | None]] = {}
  for variant in variants:
    results = read_results(workdir, variant)
    runs = ([None] * variant.num_seeds if results is None
            else results.get("per_seed", [results]))
    groups.setdefault(variant.group_name, []).extend(runs)
  return groups


def report(variants: Sequence[Variant], workdir: str,
           split: str = "test") -> str:
  """A markdown table: one row per group, in sweep order."""
  groups = grouped_results(variants, workdir)
  rows = [f"| variant | {split} accuracy | runs | parameters | examples/s | "
          "train time |", "|---|---|---|---|---|---|"]
  for group, results in groups.items():
    done = [r for r in results if r is not None]
    if not done:
      rows.append(f"| {group} | not run | 0/{len(results)} | | | |")
      continue
    accuracy = [r[split]["accuracy"] for r in done]
    mean = statistics.mean(accuracy)
    spread = (f" ± {statistics.stdev(accuracy):.3f}" if len(done) > 1 else "")
    speed = statistics.mean(r["examples_per_sec"] for r in done)
    minutes = statistics.mean(r["train_seconds"] for r in done) / 60
    rows.append(f"| {group} | {mean:.3f}{spread} | {len(done)}/{len(results)} "
                f"| {done[0]['num_params']:,} | {speed:,.0f} | "
                f"{minutes:.1f} min |")
  return "\n".join(rows)


def plot(variants: Sequence[Variant], workdir: str, path: str,
         split: str = "test") -> None:
  """Saves a bar chart of each finished group's accuracy (mean, with the
  standard deviation over its runs as an error bar, and each run as a dot)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = {group: [r[split]["accuracy"] for r in results if r is not None]
            for group, results in grouped_results(variants, workdir).items()}
  groups = {group: acc for group, acc in groups.items() if acc}
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(groups) + 1.5), 3.5))
  for i, accuracy in enumerate(groups.values()):
    spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
    ax.bar(i, statistics.mean(accuracy), yerr=spread, color="tab:blue",
           alpha=0.6, capsize=3)
    ax.plot([i] * len(accuracy), accuracy, "k.", markersize=4)
  ax.set_xticks(range(len(groups)), list(groups), rotation=45, ha="right")
  ax.set_ylabel(f"{split} accuracy")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  config_path, variants = load_sweep(_SWEEP.value)
  if _ONLY.value:
    unknown = sorted(set(_ONLY.value) - {v.name for v in variants})
    if unknown:
      raise app.UsageError(f"--only names unknown variants {unknown}; valid: "
                           f"{', '.join(v.name for v in variants)}.")
    variants = [v for v in variants if v.name in _ONLY.value]
  failed = []
  if not _REPORT.value:
    failed = run_sweep(config_path, variants, _WORKDIR.value, _DRY_RUN.value)
  table = report(variants, _WORKDIR.value)
  print(table)
  if not _DRY_RUN.value:
    with open(os.path.join(_WORKDIR.value, "report.md"), "w") as f:
      f.write(table + "\n")
    plot(variants, _WORKDIR.value, os.path.join(_WORKDIR.value, "report.png"))
  if failed:
    sys.exit(f"Failed variants (see their .log files): {', '.join(failed)}.")


if __name__ == "__main__":
  app.run(main)
