"""Bad settings and broken disks fail early, say what to fix, and never
damage what a run already saved."""

import errno
import json
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from mmjax import checkpoint as checkpoint_lib
from mmjax import config_lib
from mmjax import registry
from mmjax import train
from mmjax.data import pipeline
from e2e import load_experiment


def test_resuming_with_a_different_model_is_refused(tmp_path):
  config = load_experiment().get_config("")
  train.prepare_workdir(str(tmp_path), config)
  changed = load_experiment().get_config("fusion=concat")
  with pytest.raises(ValueError, match=r"(?s)different config.*model\.fusion\.name: 'film' -> 'concat'.*allow_config_change=True"):
    train.prepare_workdir(str(tmp_path), changed)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["fusion"]["name"] == "film"  # Not overwritten.
  changed.allow_config_change = True
  train.prepare_workdir(str(tmp_path), changed)
  assert json.loads((tmp_path / "config.json").read_text())[
      "model"]["fusion"]["name"] == "concat"


def test_longer_training_and_other_logging_may_resume(tmp_path):
  config = load_experiment().get_config("")
  train.prepare_workdir(str(tmp_path), config)
  config.train.steps *= 2
  config.checkpoint.every_steps = 7
  config.parallel.backend = "shard_map"
  train.prepare_workdir(str(tmp_path), config)


def test_config_changes_lists_every_difference():
  old = {"model": {"a": (1, 2), "b": "x"}, "train": {"steps": 5}}
  new = {"model": {"a": [1, 3], "c": 1}, "train": {"steps": 9}}
  assert config_lib.config_changes(old, new) == [
      "model.a: [1, 2] -> [1, 3]", "model.b: 'x' -> '<unset>'",
      "model.c: '<unset>' -> 1"]


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(OSError, match=r"Cannot write to workdir .*a_file/run.*writable --workdir"):
    train.prepare_workdir(str(blocker / "run"), load_experiment().get_config(""))


def _checkpointer_with_step_1(directory, async_save):
  """A Checkpointer in ``directory`` that has saved step 1 (``w`` = ones)."""
  checkpointer = checkpoint_lib.Checkpointer(str(directory),
                                             async_save=async_save)
  checkpointer.save(1, {"w": jnp.ones(3)}, {})
  checkpointer.wait()
  return checkpointer


async def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, async_save):
  directory = tmp_path / "ckpt"
  checkpointer = _checkpointer_with_step_1(directory, async_save)
  # Orbax writes every item through async_save, waiting at once when saves
  # are synchronous.
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save",
                      _disk_full)
  with pytest.raises(checkpoint_lib.CheckpointSaveError,
                     match=r"Saving checkpoint 2 .*No space left on device.*intact: \[1\]"):
    checkpointer.save(2, {"w": jnp.zeros(3)}, {})
    checkpointer.wait()
  monkeypatch.undo()

  fresh = checkpoint_lib.Checkpointer(str(directory))
  restored, step = fresh.restore_latest({"w": jnp.zeros(3)})
  assert step == 1
  np.testing.assert_array_equal(restored["w"], np.ones(3))


def _dataset_config(name, **extra):
  """A ``config.dataset``."""
  return ml_collections.ConfigDict(dict(
      name=name, config="", data_dir=extra.get("data_dir", ""),
      manual_dir=extra.get("manual_dir", "")))


def test_unknown_dataset_lists_the_built_in_ones():
  with pytest.raises(ValueError, match=r"Unknown dataset 'mm_shapez'. Valid "
                     r"dataset names: avmnist, mm_shapes\. Any other TFDS "
                     r"dataset works too"):
    pipeline.ensure_prepared(_dataset_config("mm_shapez"))


def test_the_dataset_registry_is_the_one_source_of_the_unknown_name_error():
  registry.register_datasets()
  with pytest.raises(ValueError) as from_registry:
    registry.DATASETS.get("mm_shapez")
  with pytest.raises(ValueError) as from_pipeline:
    pipeline.ensure_prepared(_dataset_config("mm_shapez"))
  assert str(from_pipeline.value) == str(from_registry.value)
  # Registered under the names TFDS gives the builders.
  for name in registry.DATASETS.names():
    assert registry.DATASETS.get(name).name == name


class ManualToyDataset(tfds.core.GeneratorBasedBuilder):
  """A builder that needs files from the user, like AV-MNIST."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Download toy.npz from the toy site."

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"x": tfds.features.Scalar(dtype=np.int32)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(dl_manager.manual_dir / "toy.npz")}

  def _generate_examples(self, path):
    for i, value in enumerate(np.load(path)["x"]):
      yield i, {"x": int(value)}


def test_missing_manual_dir_says_what_to_download_and_where(tmp_path):
  dataset = _dataset_config("manual_toy_dataset", data_dir=str(tmp_path / "tfds"),
                            manual_dir=str(tmp_path / "raw"))
  with pytest.raises(FileNotFoundError, match=r"(?s)raw is missing or empty\. Download toy\.npz.*--config\.dataset\.manual_dir"):
    pipeline.ensure_prepared(dataset)
  os.makedirs(tmp_path / "raw")
  np.savez(tmp_path / "raw" / "toy.npz", x=np.arange(3))
  builder = pipeline.ensure_prepared(dataset)
  assert builder.info.splits["train"].num_examples == 3


def test_model_modality_the_data_lacks_is_named():
  config = load_experiment().get_config("")
  batch = {"image": np.zeros(1), "question": np.zeros(1), "answer": np.zeros(1)}
  train._check_batch_has(batch, ["image", "answer"], config)
  with pytest.raises(ValueError, match=r"needs audio .*mm_shapes/simple.*hold only: answer, image, question"):
    train._check_batch_has(batch, ["image", "audio"], config)


def test_a_save_missing_from_disk_after_wait_is_an_error(tmp_path,
                                                          monkeypatch):
  """``wait()`` confirms the step is on disk instead of trusting Orbax's
  return, which does not raise for every background failure."""
  directory = tmp_path / "ckpt"
  checkpointer = _checkpointer_with_step_1(directory, True)
  real_wait = ocp.CheckpointManager.wait_until_finished

  def wait_then_lose_step_2(manager):
    real_wait(manager)
    shutil.rmtree(directory / "2")

  checkpointer.save(2, {"w": jnp.zeros(3)}, {})
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished",
                      wait_then_lose_step_2)
  with pytest.raises(checkpoint_lib.CheckpointSaveError,
                     match=r"checkpoint 2 .*not on disk.*intact: \[1\]"):
    checkpointer.wait()
