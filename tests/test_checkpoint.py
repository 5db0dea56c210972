"""Checkpoints: round trip, falling back from a damaged newest checkpoint
without deleting it, and what an error during a save leaves behind."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import checkpoint as checkpoint_lib


def _state(value):
  return {"params": {"w": jnp.full((3, 2), value, jnp.float32)},
          "step": jnp.asarray(int(value), jnp.int32)}


def _save_steps(directory, steps):
  with checkpoint_lib.Checkpointer(str(directory), max_to_keep=5) as checkpointer:
    for step in steps:
      checkpointer.save(step, _state(step), {"step": step})


def _files(directory):
  return [os.path.join(root, name) for root, _, names in os.walk(directory)
          for name in names]


def test_restore_returns_the_newest_state(tmp_path):
  _save_steps(tmp_path / "ckpt", [1, 2])
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  state, step = checkpointer.restore_latest(_state(0.0))
  assert step == 2
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 2.0))
  assert checkpointer.newest_step_on_disk() == 2


def test_no_checkpoint_returns_none(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  assert checkpointer.restore_latest(_state(0.0)) is None
  assert checkpointer.newest_step_on_disk() is None


@pytest.mark.parametrize("damage", ["delete_state", "truncate_all",
                                    "empty_step_dir"])
def test_damaged_newest_checkpoint_is_moved_aside(tmp_path, damage, capsys):
  directory = tmp_path / "ckpt"
  _save_steps(directory, [1, 2])
  newest = directory / "2"
  if damage == "delete_state":
    for path in _files(newest / "state"):
      os.remove(path)
  elif damage == "truncate_all":
    for path in _files(newest):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    for path in _files(newest):
      os.remove(path)
  checkpointer = checkpoint_lib.Checkpointer(str(directory))
  state, step = checkpointer.restore_latest(_state(0.0))
  assert step == 1
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 1.0))
  assert "checkpoint 2 is unreadable" in capsys.readouterr().out
  assert os.path.isdir(tmp_path / "ckpt.corrupt" / "2")  # Kept, not deleted.
  assert checkpointer.latest_step() == 1


def test_leftover_temporary_directory_is_ignored(tmp_path):
  directory = tmp_path / "ckpt"
  _save_steps(directory, [1])
  os.makedirs(directory / "2.orbax-checkpoint-tmp-1234" / "state")
  checkpointer = checkpoint_lib.Checkpointer(str(directory))
  _, step = checkpointer.restore_latest(_state(0.0))
  assert step == 1


def test_load_params_for_warm_start(tmp_path):
  _save_steps(tmp_path / "run" / "checkpoints", [4])
  params, _, step = checkpoint_lib.load_params(str(tmp_path / "run"))
  assert step == 4
  np.testing.assert_array_equal(params["w"], np.full((3, 2), 4.0))
  with pytest.raises(ValueError, match=r"parameter \['w'\] has shape"):
    checkpoint_lib.check_same_structure(params, {"w": np.zeros((2, 2))},
                                        "init_from")
  with pytest.raises(FileNotFoundError, match="No checkpoint found in .*nothing"):
    checkpoint_lib.load_params(str(tmp_path / "nothing"))


def test_an_error_during_an_async_save_waits_for_it_and_says_so(tmp_path,
                                                                 capsys):
  directory = tmp_path / "ckpt"
  with pytest.raises(KeyboardInterrupt):
    with checkpoint_lib.Checkpointer(str(directory)) as checkpointer:
      checkpointer.save(1, _state(1.0), {"step": 1})
      raise KeyboardInterrupt  # Before anything waited for the save.
  assert ("stopped with KeyboardInterrupt while checkpoint 1 was being saved; "
          "that save completed") in capsys.readouterr().out
  assert checkpoint_lib.Checkpointer(str(directory)).newest_step_on_disk() == 1


def test_checkpoints_with_a_saved_data_iterator_still_restore(tmp_path):
  """Checkpoints written before train batches were indexed by step hold a
  grain iterator state as a third item; it is ignored."""
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"),
                                  item_names=("state", "data", "config"))
  manager.save(7, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(7.0)),
      data=grain.checkpoint.CheckpointSave(iterator),
      config=ocp.args.JsonSave({})))
  manager.close()
  state, step = checkpoint_lib.Checkpointer(
      str(tmp_path / "ckpt")).restore_latest(_state(0.0))
  assert step == 7
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 7.0))
