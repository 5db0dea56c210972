"""Checkpoints: round trip with the data iterator, and falling back from a
damaged newest checkpoint without deleting it."""

import os

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import checkpoint as checkpoint_lib


def _iterator():
  return iter(grain.MapDataset.range(100).seed(0).shuffle()
              .to_iter_dataset(grain.ReadOptions(num_threads=0)))


def _state(value):
  return {"params": {"w": jnp.full((3, 2), value, jnp.float32)},
          "step": jnp.asarray(int(value), jnp.int32)}


def _save_steps(directory, steps):
  checkpointer = checkpoint_lib.Checkpointer(str(directory), max_to_keep=5)
  iterator = _iterator()
  positions = {}
  for step in steps:
    positions[step] = next(iterator)
    checkpointer.save(step, _state(step), iterator, {"step": step})
  checkpointer.close()
  return positions


def _files(directory):
  return [os.path.join(root, name) for root, _, names in os.walk(directory)
          for name in names]


def test_restore_returns_state_and_iterator_position(tmp_path):
  positions = _save_steps(tmp_path / "ckpt", [1, 2])
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  iterator = _iterator()
  state, step = checkpointer.restore_latest(_state(0.0), iterator)
  assert step == 2
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 2.0))
  # The iterator continues after the element drawn before the save.
  reference = _iterator()
  drawn = [next(reference) for _ in range(3)]
  assert drawn[1] == positions[2] and next(iterator) == drawn[2]


def test_no_checkpoint_returns_none(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  assert checkpointer.restore_latest(_state(0.0), _iterator()) is None


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
  state, step = checkpointer.restore_latest(_state(0.0), _iterator())
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
  _, step = checkpointer.restore_latest(_state(0.0), _iterator())
  assert step == 1


def test_load_params_for_warm_start(tmp_path):
  _save_steps(tmp_path / "run" / "checkpoints", [4])
  params, _, step = checkpoint_lib.load_params(str(tmp_path / "run"))
  assert step == 4
  np.testing.assert_array_equal(params["w"], np.full((3, 2), 4.0))
  with pytest.raises(ValueError, match=r"parameter \['w'\] has shape"):
    checkpoint_lib.check_same_structure(params, {"w": np.zeros((2, 2))},
                                        "init_from")
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    checkpoint_lib.load_params(str(tmp_path / "nothing"))
