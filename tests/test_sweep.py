"""Ablation files and the sweep runner."""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest

from mmjax import config_lib, models, sweep
from test_config import ROOT, load_experiment

ABLATIONS = sorted(glob.glob(os.path.join(ROOT, "experiments", "ablations",
                                          "*.py")))


def _configured(config_path: str, variant: sweep.Variant):
  """The config a variant's command line gives."""
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
    models.build_model(
        config.model, vocab_sizes=dict.fromkeys(config.model.modalities, 10),
        num_classes={h.target: 10 for h in config.model.heads.values()},
        axis_name=None)


def test_command_and_report(tmp_path):
  variants = [sweep.Variant("a_s0", "fusion=concat", (("seed", 0),
                                                      ("x.y", (1, 2))), "a"),
              sweep.Variant("a_s1", "fusion=concat", (("seed", 1),), "a"),
              sweep.Variant("b", "fusion=film")]
  cmd = sweep.command("experiments/mm_shapes.py", variants[0], str(tmp_path))
  assert cmd[:3] == [sys.executable, "-m", "mmjax.main"]
  assert cmd[3:] == ["--config=experiments/mm_shapes.py:fusion=concat",
                     f"--workdir={tmp_path}/a_s0", "--config.seed=0",
                     "--config.x.y=1+2"]
  for name, accuracy in (("a_s0", 0.5), ("a_s1", 0.7)):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "results.json").write_text(json.dumps(dict(
        test=dict(accuracy=accuracy), examples_per_sec=100.0,
        train_seconds=120.0, num_params=1234)))
  table = sweep.report(variants, str(tmp_path)).splitlines()
  assert table[2] == "| a | 0.600 ± 0.141 | 2/2 | 1,234 | 100 | 2.0 min |"
  assert table[3] == "| b | not run | 0/1 | | | |"
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
  assert table[2] == "| a | 0.650 ± 0.129 | 4/4 | 1,234 | 100 | 1.0 min |"
  assert table[3] == "| b | not run | 0/2 | | | |"
