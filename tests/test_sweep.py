"""Ablation files and the sweep runner."""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import traceback

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import pytest

from mmjax import config_lib, losses, models, sweep, train
from mmjax.data import avmnist
from mmjax.data import mm_shapes as ms
from mmjax.data import preprocess
from e2e import ROOT, load_experiment

ABLATIONS = sorted(glob.glob(os.path.join(ROOT, "experiments", "ablations",
                                          "*.py")))


def _configured(config_path: str, variant: sweep.Variant):
  """The config a variant's command line gives."""
  config_path = variant.config or config_path
  name = os.path.splitext(os.path.basename(config_path))[0]
  config = load_experiment(name).get_config(variant.arg)
  for key, value in variant.overrides:
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    assert leaf in node, f"{variant.name}: unknown override {key}"
    node[leaf] = value
  return config


# One example's model inputs per dataset, as the input pipelines give them
# (text: ``tokenize``'s ``max_len`` in the config's ``pp_train``).
INPUT_SHAPES = {"mm_shapes": {"image": (ms.IMAGE_SIZE, ms.IMAGE_SIZE, 3)},
                "avmnist": {"image": avmnist.IMAGE_SHAPE,
                            "audio": avmnist.AUDIO_SHAPE}}


def _dummy_batch(config, batch_size=2) -> dict[str, jax.ShapeDtypeStruct]:
  batch = {k: jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32)
           for k, shape in INPUT_SHAPES[config.dataset.name].items()}
  for name, kwargs in preprocess.parse_pp(config.input.pp_train):
    if name == "tokenize":
      shape = (batch_size, kwargs["max_len"])
      batch[kwargs["key"]] = jax.ShapeDtypeStruct(shape, jnp.int32)
      batch[f"{kwargs['key']}_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_)
  return batch


@pytest.mark.parametrize("path", ABLATIONS, ids=os.path.basename)
def test_every_variant_is_a_valid_config_whose_model_builds(path):
  config_path, variants = sweep.load_sweep(path)
  assert len(variants) > 1
  seen = set()
  for variant in variants:
    config = _configured(os.path.join(ROOT, config_path), variant)
    config_lib.validate_config(config)
    # The variant differs from the others: ablations are not copies.
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    assert key not in seen, f"{variant.name} repeats another variant"
    seen.add(key)
    heads = config.model.get("heads", {})
    num_classes = {h.target: 10 for h in heads.values()}
    model = models.build_model(
        config.model, vocab_sizes=dict.fromkeys(config.model.modalities, 10),
        num_classes=num_classes, axis_name=None)
    # Initialised on inputs of the dataset's shapes (traced, not compiled):
    # every part fits the next, and every head gives [batch, classes] (the
    # config's, else the data's), or [batch, 1] for a regression head.
    batch = _dummy_batch(config)
    logits, variables = jax.eval_shape(
        functools.partial(model.init_with_output, train=False),
        jax.random.PRNGKey(0), batch)
    assert {k.split("_", 1)[1] for k in variables["params"]
            if k.startswith("encoders_")} == set(config.model.modalities)
    if config.model.get("contrastive"):  # A two-tower model: embeddings.
      width = config.model.contrastive.embed_dim
      assert {m: x.shape for m, x in logits.items()} == {
          m: (2, width) for m in config.model.modalities}, variant.name
      continue
    assert {head: x.shape for head, x in logits.items()} == {
        head: (2, 1 if losses.LOSSES[h.get("loss", "softmax_xent")].regression
               else h.get("num_classes", num_classes[h.target]))
        for head, h in config.model.heads.items()}, variant.name


def test_command_and_report(tmp_path):
  variants = [sweep.Variant("a_s0", "fusion=concat", (("seed", 0),
                                                      ("x.y", (1, 2))), "a"),
              sweep.Variant("a_s1", "fusion=concat", (("seed", 1),), "a"),
              sweep.Variant("b", "fusion=film")]
  cmd = sweep.command("experiments/mm_shapes.py", variants[0], str(tmp_path))
  assert cmd[:3] == [sys.executable, "-m", "mmjax.main"]
  assert cmd[3:] == ["--config=experiments/mm_shapes.py:fusion=concat",
                     f"--workdir={tmp_path}/a_s0", "--config.seed=0",
                     "--config.x.y=(1, 2)"]
  for name, accuracy, flops in (("a_s0", 0.5, 3.0e6), ("a_s1", 0.7, 3.2e6)):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "results.json").write_text(json.dumps(dict(
        test=dict(accuracy=accuracy), examples_per_sec=100.0,
        train_seconds=120.0, num_params=1234, complexity=dict(
            train_flops_per_example=flops, inference_flops_per_example=1.1e6,
            train_compile_seconds=10.0, eval_compile_seconds=3.0,
            train_step_peak_bytes=3 * 2**20, peak_memory_bytes=None))))
  table = sweep.report(variants, str(tmp_path)).splitlines()
  assert table[2] == ("| a | 0.600 ± 0.141 | 0.500, 0.700 | 2/2 | 1,234 "
                      "| 3.1M | 1.1M | 13 | 3 MiB | 100 | 2.0 min |")
  assert table[3] == "| b | not run | | 0/1 |" + " |" * 7
  assert all(row.count("|") == table[0].count("|") for row in table)
  sweep.plot(variants, str(tmp_path), str(tmp_path / "report.png"))
  assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
  # Finished variants are skipped, so a sweep resumes where it stopped.
  assert sweep.run_sweep("experiments/mm_shapes.py", variants[:2],
                         str(tmp_path)) == []


def test_duplicate_variant_names_are_refused(tmp_path):
  path = tmp_path / "dup.py"
  path.write_text("CONFIG = 'x.py'\n"
                  "def get_sweep():\n  return [dict(name='a'), dict(name='a')]\n")
  with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
    sweep.load_sweep(str(path))


def test_a_variant_of_several_seeds_counts_as_its_seeds(tmp_path):
  three = sweep.Variant("a", "fusion=concat", (("train.num_seeds", 3),))
  single = sweep.Variant("a_s3", "fusion=concat", (("seed", 3),), group="a")
  waiting = sweep.Variant("b", "fusion=film", (("train.num_seeds", 2),))
  assert "--config.train.num_seeds=3" in sweep.command(
      "experiments/mm_shapes.py", three, str(tmp_path))
  per_seed = [dict(test=dict(accuracy=accuracy), examples_per_sec=100.0,
                   train_seconds=60.0, num_params=1234, seed=seed)
              for seed, accuracy in enumerate((0.5, 0.6, 0.7))]
  os.makedirs(tmp_path / "a")
  (tmp_path / "a" / "results.json").write_text(json.dumps(dict(
      test=dict(accuracy=0.6), per_seed=per_seed, examples_per_sec=300.0,
      train_seconds=60.0, num_params=1234)))
  os.makedirs(tmp_path / "a_s3")
  (tmp_path / "a_s3" / "results.json").write_text(json.dumps(dict(
      test=dict(accuracy=0.8), examples_per_sec=100.0, train_seconds=60.0,
      num_params=1234)))
  table = sweep.report([three, single, waiting], str(tmp_path)).splitlines()
  # Four seeds: 0.5, 0.6, 0.7 (one program) and 0.8 (a separate run).
  # Results without "complexity" (runs from before it was recorded).
  assert table[2] == ("| a | 0.650 ± 0.129 | 0.500, 0.600, 0.700, 0.800 "
                      "| 4/4 | 1,234 | – | – | – | – | 100 | 1.0 min |")
  assert table[3] == "| b | not run | | 0/2 |" + " |" * 7


def test_at_best_reports_each_run_at_its_best_step(tmp_path):
  """``--at_best``: the test accuracy at each run's best validation step
  (``results["best"]``), the last step's for a run that kept no best."""
  trained = sweep.Variant("net", overrides=(("train.num_seeds", 2),))
  baseline = sweep.Variant("svm")
  per_seed = [dict(test=dict(accuracy=last), examples_per_sec=100.0,
                   train_seconds=60.0, num_params=10, seed=seed,
                   best=dict(metric="validation/accuracy", step=step,
                             validation=dict(accuracy=0.9),
                             test=dict(accuracy=at_best)))
              for seed, (last, at_best, step) in enumerate(
                  ((0.50, 0.60, 3), (0.70, 0.80, 5)))]
  svm = dict(test=dict(accuracy=0.4), examples_per_sec=100.0,
             train_seconds=60.0, num_params=10)
  for name, results in (("net", dict(per_seed[0], per_seed=per_seed)),
                        ("svm", svm)):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "results.json").write_text(json.dumps(results))
  last = sweep.report([trained, baseline], str(tmp_path)).splitlines()
  assert last[0].startswith("| variant | test accuracy | per run |")
  assert last[2].startswith("| net | 0.600 ± 0.141 | 0.500, 0.700 | 2/2 |")
  best = sweep.report([trained, baseline], str(tmp_path),
                      at_best=True).splitlines()
  assert best[0].startswith("| variant | test accuracy at the best step |")
  assert best[2].startswith("| net | 0.700 ± 0.141 | 0.600, 0.800 | 2/2 |")
  assert best[3].startswith("| svm | 0.400 | 0.400 | 1/1 |")
  sweep.plot([trained, baseline], str(tmp_path), str(tmp_path / "best.png"),
             at_best=True)
  assert (tmp_path / "best.png").read_bytes()[:4] == b"\x89PNG"


def test_learning_curves_read_every_run_finished_or_not(tmp_path):
  seeds = sweep.Variant("net", overrides=(("train.num_seeds", 2),))
  single = sweep.Variant("net_s5", group="net")
  silent = sweep.Variant("svm")  # Logs no validation during training.
  def log(run_dir, records):
    os.makedirs(run_dir)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
  validation = lambda step, accuracy: dict(step=step, split="validation",
                                           accuracy=accuracy, loss=1.0)
  train = dict(step=10, split="train", accuracy=0.1, loss=2.0)
  log(tmp_path / "net" / "seed0", [train, validation(10, 0.5),
                                   validation(20, 0.7)])
  log(tmp_path / "net" / "seed1", [train, validation(10, 0.6)])  # Running.
  log(tmp_path / "net_s5", [validation(10, 0.4), validation(20, 0.9)])
  log(tmp_path / "svm", [dict(step=0, split="test", accuracy=0.3)])
  curves = sweep.learning_curves([seeds, single, silent], str(tmp_path))
  assert curves == {"net": [[(10, 0.5), (20, 0.7)], [(10, 0.6)],
                            [(10, 0.4), (20, 0.9)]]}
  sweep.curves_plot(curves, str(tmp_path / "curves.png"))
  assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


# Running sweeps. ``run_sweep`` starts each variant as ``python -m mmjax.main``;
# here that command line runs in this process instead (a new process costs
# seconds of importing JAX): parsed as ``mmjax.main`` parses it, trained by
# the same ``train.train_and_evaluate``, an exception giving exit status 1 and
# a stop signal 128 + its number, as the process would.


def _run_in_process(cmd, stdout, stderr, check):
  """``subprocess.run(cmd, stdout=log, stderr=STDOUT)`` for an ``mmjax.main``
  command line, in this process."""
  assert cmd[:3] == [sys.executable, "-m", "mmjax.main"], cmd
  assert stderr == subprocess.STDOUT and not check
  argv = ["mmjax.main", *cmd[3:]]
  # ``mmjax.main``'s flags, on their own FlagValues: its module cannot be
  # imported next to ``mmjax.sweep`` (both define --workdir).
  flag_values = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
      "config", None, "", flag_values=flag_values, lock_config=True,
      sys_argv=argv)
  workdir = flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  returncode = 0
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
    try:
      flag_values(argv)
      train.train_and_evaluate(config.value, workdir.value)
    except SystemExit as e:
      returncode = e.code
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      returncode = 1
  return subprocess.CompletedProcess(cmd, returncode)


SWEEP_FILE = """
CONFIG = {config!r}
OVERRIDES = {overrides!r}

def get_sweep():
  return [
      dict(name="broken", arg="runlocal,modalities=image",
           overrides=dict(OVERRIDES, **{{"model.fusion.name": "nope"}})),
      dict(name="image", arg="runlocal,modalities=image", overrides=OVERRIDES,
           group="image"),
      dict(name="image_seed1", arg="runlocal,modalities=image",
           overrides=dict(OVERRIDES, seed=1), group="image"),
  ]
"""


@pytest.fixture
def tiny_sweep(tmp_path, data_dir, monkeypatch):
  """``(ablation file, workdir, names of the variants run)``: three variants
  of 2 steps of a small image-only mm_shapes model (the cheapest to compile),
  the first of which fails, run by ``_run_in_process``."""
  overrides = {"model.encoders.image.features": (8, 16),
               "model.fusion.hidden": (16,), "dataset.data_dir": data_dir,
               "train.steps": 2, "train.eval_every_steps": 2,
               "checkpoint.every_steps": 2}
  path = tmp_path / "tiny_sweep.py"
  path.write_text(SWEEP_FILE.format(
      config=os.path.join(ROOT, "experiments", "mm_shapes.py"),
      overrides=overrides))
  ran = []

  def run(cmd, **kwargs):
    ran.append(os.path.basename(cmd[4].removeprefix("--workdir=")))
    return _run_in_process(cmd, **kwargs)

  monkeypatch.setattr(sweep.subprocess, "run", run)
  return str(path), str(tmp_path / "sweep"), ran


def _main(*args):
  """``python -m mmjax.sweep ARGS``, in this process."""
  try:
    flags.FLAGS(["mmjax.sweep", *args])
    sweep.main([])
  finally:
    flags.FLAGS.unparse_flags()


def _read(workdir, *path):
  with open(os.path.join(workdir, *path)) as f:
    return json.load(f) if path[-1].endswith(".json") else f.read()


def test_sweep_runs_the_named_variants_past_a_failed_one_and_reports_it(
    tiny_sweep, capsys):
  path, workdir, ran = tiny_sweep
  with pytest.raises(SystemExit, match=r"Failed variants .*: broken\.$"):
    _main(f"--sweep={path}", f"--workdir={workdir}", "--only=broken,image")
  # --only: the named variants ran, in sweep order; the other did not.
  assert ran == ["broken", "image"]
  assert not os.path.exists(os.path.join(workdir, "image_seed1"))
  assert re.search(r"\] broken: .*\n +FAILED \(exit 1\)",
                   capsys.readouterr().out)
  # The failure is in the variant's log, and left no results.
  log = _read(workdir, "broken.log")
  assert "ValueError" in log and "'nope'" in log, log
  assert not os.path.exists(os.path.join(workdir, "broken", "results.json"))
  # The variant after it ran to the end, with the overrides as given (tuples
  # too went through the command line).
  results = _read(workdir, "image", "results.json")
  assert results["steps"] == 2 and 0.0 <= results["test"]["accuracy"] <= 1.0
  model = _read(workdir, "image", "config.json")["model"]
  assert model["encoders"]["image"]["features"] == [8, 16]
  assert model["fusion"]["hidden"] == [16]
  # The table has the --only variants, in sweep order: broken, not run, and
  # image (image_seed1, of the same group, is left out).
  report = _read(workdir, "report.md").splitlines()
  assert report[2] == "| broken | not run | | 0/1 |" + " |" * 7
  accuracy = f"{results['test']['accuracy']:.3f}"
  assert report[3].startswith(f"| image | {accuracy} | {accuracy} | 1/1 | ")
  assert len(report) == 4
  with open(os.path.join(workdir, "report.png"), "rb") as f:
    assert f.read(4) == b"\x89PNG"

  # The same command again: finished variants are skipped, the failed one is
  # retried (and fails again), and the finished results are untouched.
  ran.clear()
  with pytest.raises(SystemExit, match=r": broken\.$"):
    _main(f"--sweep={path}", f"--workdir={workdir}", "--only=broken,image")
  assert ran == ["broken"]
  assert "image: done already." in capsys.readouterr().out
  assert _read(workdir, "image", "results.json") == results
  assert _read(workdir, "report.md").splitlines() == report


def test_dry_run_lists_the_commands_and_runs_nothing(tiny_sweep, capsys):
  path, workdir, ran = tiny_sweep
  _main(f"--sweep={path}", f"--workdir={workdir}", "--dry_run")
  assert ran == [] and os.listdir(workdir) == []  # Nor writes a report.
  out = capsys.readouterr().out
  config_path, variants = sweep.load_sweep(path)
  for i, variant in enumerate(variants):
    # Each command, as a shell would read it back.
    cmd = sweep.command(config_path, variant, workdir)
    line = f"[{i + 1}/3] {variant.name}: {shlex.join(cmd)}"
    assert line in out.splitlines()
    assert shlex.split(line.split(": ", 1)[1]) == cmd
  assert "| image | not run | | 0/2 | | | |" in out

  _main(f"--sweep={path}", f"--workdir={workdir}", "--dry_run",
        "--only=image_seed1", "--override=parallel.cpu_devices=2",
        "--override=input.num_threads=1")
  out = capsys.readouterr().out
  assert "[1/1] image_seed1: " in out and "broken" not in out
  line, = [l for l in out.splitlines() if l.startswith("[1/1]")]
  assert line.endswith(" --config.parallel.cpu_devices=2 "
                       "--config.input.num_threads=1")
  assert ran == []
  with pytest.raises(app.UsageError, match="use key=value"):
    _main(f"--sweep={path}", f"--workdir={workdir}", "--dry_run",
          "--override=parallel.cpu_devices")
  with pytest.raises(app.UsageError,
                     match=r"unknown variants \['imag'\]; valid: broken, "):
    _main(f"--sweep={path}", f"--workdir={workdir}", "--only=imag")


def test_an_interrupted_variant_stops_the_sweep(tmp_path, monkeypatch):
  """A variant stopped by SIGINT or SIGTERM (exit 130 or 143, after saving a
  checkpoint) stops the sweep; another failure does not."""
  variants = [sweep.Variant(name) for name in ("a", "b", "c")]
  for returncode, ran_after_b in ((1, ["c"]), (128 + 2, []), (128 + 15, [])):
    ran = []

    def run(cmd, returncode=returncode, ran=ran, **kwargs):
      del kwargs
      ran.append(os.path.basename(cmd[4]))
      return subprocess.CompletedProcess(cmd, returncode if ran[-1] == "b"
                                         else 0)

    monkeypatch.setattr(sweep.subprocess, "run", run)
    workdir = str(tmp_path / str(returncode))
    assert sweep.run_sweep("x.py", variants, workdir) == ["b"]
    assert ran == ["a", "b", *ran_after_b]
