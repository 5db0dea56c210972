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
    python -m mmjax.sweep ... --report --at_best   # at the best validation

A variant may name its own experiment file (``config=``, e.g. a fine-tuning
run after a pre-training one), and ``{workdir}`` in an override's value is
the sweep's workdir, so a later variant can start from an earlier one's run:
``overrides={"init_from": "{workdir}/clip_seed0"}`` (variants run in order).

Settings of the machine rather than of the ablation go on the command line
and are added to every variant: ``--override=parallel.cpu_devices=2``
(repeat the flag for several).

The table is printed and written to ``WORKDIR/report.md``, with a bar chart
of the accuracies in ``WORKDIR/report.png`` and, when the runs evaluate the
validation split during training, each group's validation accuracy over the
steps (mean over its runs, their range shaded; unfinished runs too) in
``WORKDIR/curves.png``. ``--robustness`` also evaluates
each finished run with ``python -m mmjax.evaluate --robustness`` (runs whose
``evaluation.json`` has it already are skipped; ``--robustness_reference=
<variant>``, e.g. late fusion, is evaluated first and is the reference of
the others' effective robustness) and adds a second table: relative
robustness per noised modality and all, MultiBench's min-max normalisation
of the latter over the table, effective robustness, and the accuracy
without each modality (zeroed; see ``mmjax.robustness``), and draws the
accuracy-vs-noise curves of every group in ``WORKDIR/robustness.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
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

from mmjax import config_common
from mmjax import metrics as metrics_lib

_SWEEP = flags.DEFINE_string("sweep", None, "Ablation file.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent of the variants' "
                               "workdirs.", required=True)
_ONLY = flags.DEFINE_list("only", [], "Run only these variant names.")
_REPORT = flags.DEFINE_bool("report", False, "Only print the table.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands only.")
_ROBUSTNESS = flags.DEFINE_bool("robustness", False, "Also evaluate the "
                                "finished runs' robustness and tabulate it.")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "key=value added to every variant's config overrides: "
    "settings of this machine rather than of the ablation, e.g. "
    "--override=parallel.cpu_devices=2 (repeat the flag for several).")
_AT_BEST = flags.DEFINE_bool(
    "at_best", False, "Tabulate each run's metrics at its best step (by "
    "its checkpoint.keep_best, e.g. the validation accuracy; MultiBench's "
    "way) instead of its last step's.")
_ROBUSTNESS_REFERENCE = flags.DEFINE_string(
    "robustness_reference", None, "The variant whose noise curves are the "
    "reference of effective robustness (MultiBench: late fusion).")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run of a sweep.

  Attributes:
    name: the run's workdir name under the sweep's workdir.
    arg: the experiment file's argument string (``"fusion=film,..."``).
    overrides: ``{"train.steps": 3000}`` -> ``--config.train.steps=3000``.
    group: runs reported together (mean and std); defaults to ``name``.
    config: the variant's experiment file; defaults to the sweep's
      ``CONFIG``.
  """
  name: str
  arg: str = ""
  overrides: tuple[tuple[str, Any], ...] = ()
  group: str = ""
  config: str = ""

  @property
  def group_name(self) -> str:
    return self.group or self.name

  @property
  def num_seeds(self) -> int:
    """The seeds the variant trains (``train.num_seeds``, default 1)."""
    return int(dict(self.overrides).get("train.num_seeds", 1))


def with_overrides(variants: Sequence[Variant],
                   settings: Sequence[str]) -> list[Variant]:
  """``variants`` with each ``"key=value"`` of ``settings`` appended to their
  overrides (after the ablation's own, so it wins)."""
  pairs = []
  for setting in settings:
    key, sep, value = setting.partition("=")
    if not sep or not key:
      raise app.UsageError(f"--override={setting!r}: use key=value, e.g. "
                           "--override=parallel.cpu_devices=2.")
    pairs.append((key, value))
  return [dataclasses.replace(v, overrides=v.overrides + tuple(pairs))
          for v in variants]


def load_sweep(path: str) -> tuple[str, list[Variant]]:
  """Reads an ablation file -> (experiment file, variants)."""
  if not os.path.isfile(path):
    raise ValueError(f"No ablation file at {path!r}.")
  module = config_common.import_file(path, "mmjax_sweep_file")
  variants = [Variant(name=v["name"], arg=v.get("arg", ""),
                      overrides=tuple(v.get("overrides", {}).items()),
                      group=v.get("group", ""), config=v.get("config", ""))
              for v in module.get_sweep()]
  names = [v.name for v in variants]
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise ValueError(f"{path}: variant names must be unique; repeated: "
                     f"{duplicated}.")
  return module.CONFIG, variants


def command(config_path: str, variant: Variant, workdir: str) -> list[str]:
  """The ``mmjax.main`` command line of one variant."""
  config_path = variant.config or config_path
  config = f"{config_path}:{variant.arg}" if variant.arg else config_path
  cmd = [sys.executable, "-m", "mmjax.main", f"--config={config}",
         f"--workdir={os.path.join(workdir, variant.name)}"]
  for key, value in variant.overrides:
    if isinstance(value, str):
      value = value.replace("{workdir}", workdir)
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
           split: str = "test", at_best: bool = False) -> str:
  """A markdown table: one row per group, in sweep order, with each group's
  accuracy on ``split`` (mean ± std, and each run's), then its cost
  (``mmjax.complexity``): FLOPs per example to train and to infer,
  compile seconds of both steps, XLA's memory peak of the train step, steady
  examples/s and training time (means over the group's runs). When runs have
  several heads, a column per head's metric follows (``accuracy/<head>``,
  ``mae/<head>``: ``task_metrics``), empty for runs without that head.
  ``at_best``: every metric at the run's best step (``split_metrics``)."""
  groups = grouped_results(variants, workdir)
  tasks = task_metrics(groups, split)
  rows = [f"| variant | {_accuracy_label(split, at_best)} | per run | runs "
          "| parameters | train FLOPs/ex | inference FLOPs/ex | compile s "
          "| step memory | examples/s | train time |" +
          "".join(f" {split} {name} |" for name in tasks),
          "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
  for group, results in groups.items():
    done = [r for r in results if r is not None]
    if not done:
      rows.append(f"| {group} | not run | | 0/{len(results)} |" +
                  " |" * (7 + len(tasks)))
      continue
    metrics = [split_metrics(r, split, at_best) for r in done]
    values = lambda name: [m[name] for m in metrics if name in m]
    mean_and_spread = lambda name: _mean_and_spread(values(name))
    costs = [r.get("complexity", {}) for r in done]
    cost = lambda key: _mean_of([c.get(key) for c in costs])
    compile_seconds = _mean_of([
        c["train_compile_seconds"] + c["eval_compile_seconds"] for c in costs
        if "train_compile_seconds" in c])
    speed = statistics.mean(r["examples_per_sec"] for r in done)
    minutes = statistics.mean(r["train_seconds"] for r in done) / 60
    rows.append(
        f"| {group} | {mean_and_spread('accuracy')} "
        f"| {', '.join(f'{v:.3f}' for v in values('accuracy'))} "
        f"| {len(done)}/{len(results)} "
        f"| {done[0]['num_params']:,} "
        f"| {_scaled(cost('train_flops_per_example'))} "
        f"| {_scaled(cost('inference_flops_per_example'))} "
        f"| {_scaled(compile_seconds, '.0f')} "
        f"| {_scaled(cost('train_step_peak_bytes'), binary=True)} "
        f"| {speed:,.0f} | {minutes:.1f} min |" +
        "".join(f" {cell} |" if cell else " |"
                for cell in map(mean_and_spread, tasks)))
  return "\n".join(rows)


def split_metrics(results: dict[str, Any], split: str,
                  at_best: bool = False) -> dict[str, float]:
  """A run's metrics on ``split``: at its last step, or, with ``at_best``,
  at its best step (``results["best"]``: the evaluation that was best by
  ``checkpoint.keep_best``, e.g. the validation accuracy, as MultiBench
  reports). Runs that keep no best (``keep_best`` unset, the SVM baseline)
  give their last step's."""
  if at_best and "best" in results:
    return results["best"][split]
  return results[split]


def _accuracy_label(split: str, at_best: bool) -> str:
  """What the table's and the chart's accuracy is: ``"test accuracy"``, or
  ``"test accuracy at the best step"`` (``split_metrics``)."""
  return f"{split} accuracy" + (" at the best step" if at_best else "")


def task_metrics(groups: dict[str, list[dict[str, Any] | None]],
                 split: str) -> list[str]:
  """The per-head metrics of the finished runs' ``split`` (``accuracy/<head>``,
  ``mae/<head>``..., not the losses), in order of appearance; none when no
  run has several heads."""
  names = [name for results in groups.values() for r in results
           if r is not None for name in r[split]
           if "/" in name and not name.startswith("loss/")]
  return list(dict.fromkeys(names))


def _mean_and_spread(values: list[float]) -> str:
  """``"0.600 ± 0.141"`` (mean ± std of several), ``"0.600"`` or ``""``."""
  if not values:
    return ""
  spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
  return f"{statistics.mean(values):.3f}{spread}"


def _mean_of(values: list[float | None]) -> float | None:
  """The mean of the known values; None if none is known (runs made before
  they were recorded, or baselines without them)."""
  known = [v for v in values if v is not None]
  return statistics.mean(known) if known else None


def _scaled(value: float | None, spec: str = ".3g",
            binary: bool = False) -> str:
  """``12_300_000`` -> ``"12.3M"`` (``binary``: bytes, ``"11.7 MiB"``);
  ``"–"`` for None."""
  if value is None:
    return "–"
  base, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (
      1000, ("", "k", "M", "G", "T"))
  unit = 0
  while abs(value) >= base and unit < len(units) - 1:
    value, unit = value / base, unit + 1
  separator = " " if binary else ""
  return f"{value:{spec}}{separator}{units[unit]}"


def plot(variants: Sequence[Variant], workdir: str, path: str,
         split: str = "test", at_best: bool = False) -> None:
  """Saves a bar chart of each finished group's accuracy (mean, with the
  standard deviation over its runs as an error bar, and each run as a dot;
  ``at_best`` as ``report``'s)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = {group: [m["accuracy"] for m in
                    (split_metrics(r, split, at_best) for r in results
                     if r is not None) if "accuracy" in m]
            for group, results in grouped_results(variants, workdir).items()}
  groups = {group: acc for group, acc in groups.items() if acc}
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(groups) + 1.5), 3.5))
  for i, accuracy in enumerate(groups.values()):
    spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
    ax.bar(i, statistics.mean(accuracy), yerr=spread, color="tab:blue",
           alpha=0.6, capsize=3)
    ax.plot([i] * len(accuracy), accuracy, "k.", markersize=4)
  ax.set_xticks(range(len(groups)), list(groups), rotation=45, ha="right")
  ax.set_ylabel(_accuracy_label(split, at_best))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def learning_curves(variants: Sequence[Variant], workdir: str,
                    split: str = "validation", metric: str = "accuracy"
                    ) -> dict[str, list[list[tuple[int, float]]]]:
  """Each group's ``metric`` on ``split`` over training, one curve per run:
  ``{group: [[(step, value), ...], ...]}``, in sweep order, read from each
  run's ``metrics.jsonl`` (a several-seed variant's ``seed<s>/``), finished
  or not. Groups whose runs logged no such evaluation are left out."""
  curves: dict[str, list[list[tuple[int, float]]]] = {}
  for variant in variants:
    run_dir = os.path.join(workdir, variant.name)
    logs = (sorted(glob.glob(os.path.join(run_dir, "seed*", "metrics.jsonl")))
            or glob.glob(os.path.join(run_dir, "metrics.jsonl")))
    for log in logs:
      curve = [(r["step"], r[metric])
               for r in metrics_lib.read_metrics(os.path.dirname(log))
               if r["split"] == split and metric in r]
      if curve:
        curves.setdefault(variant.group_name, []).append(curve)
  return curves


def curves_plot(curves: dict[str, list[list[tuple[int, float]]]], path: str,
                label: str = "validation accuracy") -> None:
  """Saves ``learning_curves``: per group, the mean over its runs at the
  steps they all reached, with their range shaded."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7.0, 4.0))
  colors = plt.get_cmap("tab10").colors
  for i, (group, runs) in enumerate(curves.items()):
    by_step = [dict(run) for run in runs]
    steps = sorted(set.intersection(*(set(run) for run in by_step)))
    values = [[run[step] for run in by_step] for step in steps]
    color = colors[i % len(colors)]
    ax.plot(steps, [statistics.mean(v) for v in values], color=color,
            linestyle=("-", "--", ":")[i // len(colors) % 3], marker=".",
            label=f"{group} ({len(runs)})")
    ax.fill_between(steps, [min(v) for v in values],
                    [max(v) for v in values], color=color, alpha=0.2)
  ax.set_xlabel("step")
  ax.set_ylabel(label)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate_robustness(variants: Sequence[Variant], workdir: str,
                        reference: str | None = None) -> list[str]:
  """Runs ``python -m mmjax.evaluate --robustness`` (on the best checkpoint
  where the run kept one) on each finished variant without robustness in
  its ``evaluation.json``, ``reference`` first; returns the failed names.
  SVM baselines (``mmjax.svm``) are skipped: they keep no network to
  evaluate. Output goes to ``WORKDIR/<name>.robustness.log``."""
  failed = []
  ordered = sorted(variants, key=lambda v: v.name != reference)
  for variant in ordered:
    run = os.path.join(workdir, variant.name)
    results = read_results(workdir, variant)
    if results is None or "svm" in results:
      continue
    done = _read_json(os.path.join(run, "evaluation.json")).get("robustness")
    if done and (reference is None or variant.name == reference or
                 done["noise"]["all"]["effective_robustness"] is not None):
      continue
    config = _read_json(os.path.join(run, "config.json"))
    best = config.get("checkpoint", {}).get("keep_best")
    cmd = [sys.executable, "-m", "mmjax.evaluate", f"--workdir={run}",
           f"--checkpoint={'best' if best else 'latest'}", "--robustness"]
    if reference and variant.name != reference:
      cmd.append(f"--robustness_reference={os.path.join(workdir, reference)}")
    print(f"robustness of {variant.name}: {shlex.join(cmd)}", flush=True)
    with open(os.path.join(workdir, f"{variant.name}.robustness.log"),
              "a") as log:
      if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                        check=False).returncode:
        failed.append(variant.name)
  return failed


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _robustness_by_group(variants: Sequence[Variant], workdir: str
                         ) -> dict[str, list[dict[str, Any]]]:
  """``{group: [the "robustness" of each of its runs' seeds]}`` from the
  runs' ``evaluation.json``, for the groups with at least one."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for variant in variants:
    evaluation = _read_json(os.path.join(workdir, variant.name,
                                         "evaluation.json"))
    groups.setdefault(variant.group_name, []).extend(
        r["robustness"] for r in evaluation.get("per_seed", [])
        if "robustness" in r)
  return {group: runs for group, runs in groups.items() if runs}


def robustness_report(variants: Sequence[Variant], workdir: str) -> str:
  """A markdown table of each group's robustness (means over its runs'
  seeds evaluated with it), for the groups with such runs."""
  groups = _robustness_by_group(variants, workdir)
  if not groups:
    return "No run has been evaluated with --robustness."
  modalities = list(dict.fromkeys(
      m for runs in groups.values() for m in runs[0]["noise"] if m != "all"))
  columns = {}  # Name -> (group's runs -> value, or None).
  for m in modalities + ["all"]:
    columns[f"rel. rob. {m}"] = functools.partial(_noise_metric, m,
                                                  "relative_robustness")
  columns["eff. rob. all"] = functools.partial(_noise_metric, "all",
                                               "effective_robustness")
  for m in modalities:
    columns[f"without {m}"] = functools.partial(_without, m)
  values = {group: {name: column(runs) for name, column in columns.items()}
            for group, runs in groups.items()}
  # MultiBench's normalisation over the compared methods (mmjax.robustness;
  # imported here only: the sweep runner itself does not load JAX).
  from mmjax import robustness  # pylint: disable=g-import-not-at-top
  normalized = robustness.minmax_normalize(
      {g: v["rel. rob. all"] for g, v in values.items()})
  names = list(columns)
  names.insert(len(modalities) + 1, "rel. rob. all (min-max)")
  rows = ["| variant | " + " | ".join(names) + " |",
          "|---" * (len(names) + 1) + "|"]
  for group, row in values.items():
    row = {**row, "rel. rob. all (min-max)": normalized[group]}
    cells = [group] + ["" if row[n] is None else f"{row[n]:.3f}"
                       for n in names]
    rows.append("|" + "".join(f" {c} |" if c else " |" for c in cells))
  return "\n".join(rows)


def robustness_curves(variants: Sequence[Variant], workdir: str
                      ) -> dict[str, dict[str, list[float]]]:
  """``{noised target: {group: accuracy per noise level}}``, each group's
  curve the mean over its runs' seeds evaluated with ``--robustness``; the
  targets are the modalities, in the order the runs list them, then
  "all"."""
  curves: dict[str, dict[str, list[list[float]]]] = {}
  for group, runs in _robustness_by_group(variants, workdir).items():
    for run in runs:
      for target, curve in run["noise"].items():
        curves.setdefault(target, {}).setdefault(group, []).append(
            curve["accuracy"])
  return {target: {group: [statistics.mean(a) for a in zip(*runs)]
                   for group, runs in curves[target].items()}
          for target in sorted(curves, key=lambda t: t == "all")}


def robustness_plot(variants: Sequence[Variant], workdir: str,
                    path: str) -> None:
  """Saves ``robustness_curves`` as one panel per noised target (accuracy vs
  noise level, a line per group); variants whose name ends in ``_moddrop``
  (trained with modality dropout) are dashed, in their base's colour."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  from mmjax import robustness  # pylint: disable=g-import-not-at-top
  curves = robustness_curves(variants, workdir)
  fig, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.6),
                           sharey=True, squeeze=False)
  colours = {}
  for ax, (target, groups) in zip(axes[0], curves.items()):
    for group, accuracy in groups.items():
      base = group.removesuffix("_moddrop")
      colour = colours.setdefault(base, f"C{len(colours) % 10}")
      ax.plot(robustness.LEVELS, accuracy, marker=".", color=colour,
              linestyle="--" if base != group else "-", label=group)
    ax.set_title(f"noise on {target}")
    ax.set_xlabel("noise level")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test accuracy")
  fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right",
             fontsize="small")
  fig.tight_layout(rect=(0, 0, 0.85, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _noise_metric(target: str, metric: str,
                  runs: list[dict[str, Any]]) -> float | None:
  values = [r["noise"][target][metric] for r in runs
            if target in r["noise"]]
  values = [v for v in values if v is not None]
  return statistics.mean(values) if values else None


def _without(modality: str, runs: list[dict[str, Any]]) -> float | None:
  """The accuracy with ``modality`` zeroed and every other one kept."""
  values = []
  for r in runs:
    names = [m for m in r["noise"] if m != "all"]
    kept = "+".join(m for m in names if m != modality)
    if modality in names and kept in r["subsets"]:
      values.append(r["subsets"][kept]["zeros"])
  return statistics.mean(values) if values else None


def main(argv):
  del argv
  config_path, variants = load_sweep(_SWEEP.value)
  if _ONLY.value:
    unknown = sorted(set(_ONLY.value) - {v.name for v in variants})
    if unknown:
      raise app.UsageError(f"--only names unknown variants {unknown}; valid: "
                           f"{', '.join(v.name for v in variants)}.")
    variants = [v for v in variants if v.name in _ONLY.value]
  variants = with_overrides(variants, _OVERRIDE.value)
  reference = _ROBUSTNESS_REFERENCE.value
  if reference and reference not in {v.name for v in variants}:
    raise app.UsageError(f"--robustness_reference={reference} is not a "
                         "variant; valid: "
                         f"{', '.join(v.name for v in variants)}.")
  failed = []
  if not _REPORT.value:
    failed = run_sweep(config_path, variants, _WORKDIR.value, _DRY_RUN.value)
  table = report(variants, _WORKDIR.value, at_best=_AT_BEST.value)
  if _ROBUSTNESS.value and not _DRY_RUN.value:
    failed += evaluate_robustness(variants, _WORKDIR.value, reference)
    table += "\n\n" + robustness_report(variants, _WORKDIR.value)
  print(table)
  if not _DRY_RUN.value:
    with open(os.path.join(_WORKDIR.value, "report.md"), "w") as f:
      f.write(table + "\n")
    plot(variants, _WORKDIR.value, os.path.join(_WORKDIR.value, "report.png"),
         at_best=_AT_BEST.value)
    curves = learning_curves(variants, _WORKDIR.value)
    if curves:
      curves_plot(curves, os.path.join(_WORKDIR.value, "curves.png"))
    if _ROBUSTNESS.value:
      robustness_plot(variants, _WORKDIR.value,
                      os.path.join(_WORKDIR.value, "robustness.png"))
  if failed:
    sys.exit(f"Failed variants (see their .log files): {', '.join(failed)}.")


if __name__ == "__main__":
  app.run(main)
