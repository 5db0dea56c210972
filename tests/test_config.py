"""Experiment files and config validation: bad input fails early and clearly."""

import os
import subprocess
import sys

import pytest

from mmjax import config_common
from mmjax import config_lib
from e2e import ROOT, load_experiment


@pytest.fixture
def get_config():
  return load_experiment().get_config


def test_parse_arg_types_values_like_defaults():
  arg = config_common.parse_arg(
      "fusion=concat,runlocal,modalities=image,steps=7", fusion="film",
      runlocal=False, modalities=("image", "question"), steps=1)
  assert arg.fusion == "concat" and arg.runlocal is True
  assert arg.modalities == ("image",) and arg.steps == 7


def test_parse_arg_rejects_unknown_and_mistyped_arguments():
  with pytest.raises(ValueError, match="Unknown config argument 'fuson'.*fusion"):
    config_common.parse_arg("fuson=concat", fusion="film")
  with pytest.raises(ValueError, match="'steps' takes a int; got 'many'"):
    config_common.parse_arg("steps=many", steps=1)


@pytest.mark.parametrize("arg", ["", "fusion=concat", "fusion=tensor",
                                 "fusion=low_rank", "fusion=gated",
                                 "fusion=multiplicative", "modalities=image",
                                 "modalities=question", "dataset=relational",
                                 "runlocal"])
def test_every_variant_validates(get_config, arg):
  config_lib.validate_config(get_config(arg))


EXPERIMENTS = ("mm_shapes", "avmnist", "mm_shapes_multitask",
               "mm_shapes_contrastive")


def test_loading_an_experiment_imports_no_jax_and_no_model():
  # Each experiment in a fresh interpreter: what get_config imports.
  script = (
      "import sys\n"
      "sys.path.insert(0, 'tests')\n"
      "from e2e import load_experiment\n"
      f"for name in {EXPERIMENTS!r}:\n"
      "  load_experiment(name).get_config('runlocal')\n"
      "heavy = [m for m in ('jax', 'flax', 'optax', 'mmjax.models') "
      "if m in sys.modules]\n"
      "print(heavy)\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def test_runlocal_shrinks_steps_batches_and_the_svm():
  config = config_common.base_config()
  config.svm = config_common.svm_baseline()
  config_common.apply_runlocal(config, batch_size=8, eval_batch_size=16)
  assert (config.train.steps, config.checkpoint.every_steps) == (6, 3)
  assert (config.input.batch_size, config.eval.batch_size) == (8, 16)
  assert config.svm.max_train_examples == 1000


def test_unimodal_variant_uses_concat(get_config):
  config = get_config("modalities=image")
  assert config.model.modalities == ("image",)
  assert config.model.fusion.name == "concat"


def test_unknown_fusion_lists_valid_names(get_config):
  config = get_config()
  config.model.fusion.name = "tensor_magic"
  with pytest.raises(ValueError, match=r"Unknown fusion 'tensor_magic'.*concat.*film"):
    config_lib.validate_config(config)


def test_unknown_encoder_lists_valid_names(get_config):
  config = get_config()
  config.model.encoders.image.name = "resnet9000"
  with pytest.raises(ValueError, match=r"Unknown encoder 'resnet9000'.*cnn.*lstm"):
    config_lib.validate_config(config)


def test_unknown_hyperparameter_lists_valid_ones(get_config):
  config = get_config()
  config.model.fusion.num_blocs = 3
  with pytest.raises(ValueError, match=r"fusion.num_blocs is not a hyper-parameter.*num_blocks"):
    config_lib.validate_config(config)


def test_modality_without_encoder_is_named(get_config):
  config = get_config()
  config.model.modalities = ("image", "audio")
  with pytest.raises(ValueError, match="Modality 'audio'.*no encoder"):
    config_lib.validate_config(config)


def test_unknown_op_in_pipeline(get_config):
  config = get_config()
  config.input.pp_train += "|sharpen(key='image')"
  with pytest.raises(ValueError, match="Unknown preprocessing op 'sharpen'"):
    config_lib.validate_config(config)


def test_batch_size_must_divide_over_devices(get_config):
  config = get_config()
  config.input.batch_size = 30  # 4 simulated devices in the tests.
  with pytest.raises(ValueError, match=r"batch_size=30 must be a positive multiple.*\(4\)"):
    config_lib.validate_config(config)


def test_unknown_backend(get_config):
  config = get_config()
  config.parallel.backend = "pjit"
  with pytest.raises(ValueError, match="backend 'pjit'. Valid: pmap, shard_map"):
    config_lib.validate_config(config)


@pytest.mark.parametrize("field,value,message", [
    ("optim.name", "lamb", r"config.optim.name: Unknown optimizer 'lamb'. "
     r"Valid optimizer names: adamw, sgd"),
    ("optim.schedule", "cosine", r"config.optim.schedule: Unknown schedule "
     r"'cosine'.*constant, step, warmup_cosine"),
    ("rng_impl", "mersenne", r"config.rng_impl='mersenne'.*threefry2x32"),
])
def test_unknown_optimizer_schedule_and_rng_list_valid_names(
    get_config, field, value, message):
  config = get_config()
  section, _, key = field.rpartition(".")
  (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)


def _main(*args):
  return subprocess.run([sys.executable, "-m", "mmjax.main", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_command_line_rejects_unknown_key_and_wrong_type(tmp_path):
  config = "--config=experiments/mm_shapes.py:runlocal"
  unknown = _main(config, f"--workdir={tmp_path}", "--config.train.stepz=3")
  assert unknown.returncode != 0 and "stepz" in unknown.stderr
  mistyped = _main(config, f"--workdir={tmp_path}", "--config.train.steps=abc")
  assert mistyped.returncode != 0 and "steps" in mistyped.stderr
  assert not os.path.exists(tmp_path / "checkpoints")
