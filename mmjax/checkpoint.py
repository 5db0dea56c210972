"""Orbax checkpoints of the train state and the config.

Layout: ``workdir/checkpoints/<step>/{state,config}``. The data position needs
no saving: train batches are indexed by step (``mmjax.data.pipeline``). Saves
are asynchronous; ``wait`` blocks until the last one is on disk and checks
that it is. Restoring tries the newest step first; a step that cannot be read
(missing or truncated files) is logged, moved aside to
``workdir/checkpoints.corrupt/<step>`` (never deleted) and the next older one
is tried.

With ``config.checkpoint.keep_best`` (e.g. ``"validation/accuracy"``) the
state of the step with the best value of that metric is also kept, in
``workdir/best_checkpoint/<step>/{state,config,best}`` (``best``: the step,
metric and value), by ``BestCheckpoint``; each seed of a several-seed run
keeps its own in ``workdir/seed<s>/best_checkpoint``.

With several processes every process calls ``save`` and ``restore_latest``
(Orbax synchronises them; process 0 writes the replicated state), so the
directory must be on storage that every host sees.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any
# Directions of BestCheckpoint's metric: higher or lower is better.
BEST_MODES = ("max", "min")
# Checkpoints written before the data position was derived from the step also
# hold a "data" item (a grain iterator state); it is ignored.
_ITEMS = ("state", "config")
_BEST_ITEMS = ("state", "config", "best")


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed; the previous ones are untouched."""


class Checkpointer:
  """Saves and restores ``(train state, config)``.

  A context manager: leaving it waits for the last save and closes Orbax, and
  when an exception is leaving it says whether that save reached the disk.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.corrupt_directory = self.directory.rstrip("/") + ".corrupt"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=_ITEMS)
    self._unconfirmed_step = None

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, config: dict[str, Any]) -> None:
    """Starts saving ``state`` (one unreplicated copy) at ``step``.

    A failed save (a full disk, say) raises ``CheckpointSaveError``; Orbax
    writes into a temporary directory and renames it only when complete, so
    the previous checkpoint stays intact.
    """
    with self._explain_failure(step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          config=ocp.args.JsonSave(config)), force=True)
    self._unconfirmed_step = step

  @contextlib.contextmanager
  def _explain_failure(self, step: int | None):
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      what = f"checkpoint {step}" if step is not None else "a checkpoint"
      raise CheckpointSaveError(
          f"Saving {what} in {self.directory} failed ({type(e).__name__}: "
          f"{e}). The newest complete checkpoint is intact: "
          f"{self._steps_on_disk()[-1:] or 'none'}. Free space or "
          "fix the directory, then run the same command to resume.") from e

  def restore_latest(self, abstract_state: PyTree
                     ) -> Optional[tuple[PyTree, int]]:
    """``(state, step)`` of the newest readable step, or ``None`` when there
    is no readable checkpoint."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # pylint: disable=broad-except
        self._move_aside(step, e)
        continue
      return restored.state, step
    return None

  def _move_aside(self, step: int, error: Exception) -> None:
    if jax.process_index() != 0:  # Every process fails alike; one moves.
      return
    os.makedirs(self.corrupt_directory, exist_ok=True)
    target = os.path.join(self.corrupt_directory, str(step))
    suffix = 0
    while os.path.exists(target):
      suffix += 1
      target = os.path.join(self.corrupt_directory, f"{step}.{suffix}")
    logging.warning("Checkpoint %d in %s cannot be restored (%s: %s); moved "
                    "it to %s and trying an older one.", step, self.directory,
                    type(error).__name__, str(error)[:500], target)
    print(f"WARNING: checkpoint {step} is unreadable ({type(error).__name__}); "
          f"moved to {target}.", flush=True)
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises ``CheckpointSaveError``
    if it is not (Orbax logs, rather than raises, some background failures)."""
    with self._explain_failure(None):
      self._manager.wait_until_finished()
    step, self._unconfirmed_step = self._unconfirmed_step, None
    if step is not None and step not in self._steps_on_disk():
      with self._explain_failure(step):
        raise FileNotFoundError(f"step {step} is not on disk after the save "
                                "finished; Orbax's log above says why")

  def _steps_on_disk(self) -> list[int]:
    """The steps in the directory now, not Orbax's cached list."""
    self._manager.reload()
    return list(self._manager.all_steps())

  def newest_step_on_disk(self) -> Optional[int]:
    """The newest complete step in the directory now (after any save in
    flight finished or failed: call ``wait`` first)."""
    return max(self._steps_on_disk(), default=None)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    if exc_type is None:
      self.close()
      return
    # Something else stopped the run: finish (or fail) the save in flight and
    # say where that left the checkpoints, without hiding the first error.
    unconfirmed = self._unconfirmed_step
    try:
      self.close()
      if unconfirmed is not None:
        print(f"The run stopped with {exc_type.__name__} while checkpoint "
              f"{unconfirmed} was being saved; that save completed.",
              flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"The run stopped with {exc_type.__name__}, and the checkpoint "
            f"save in flight did not complete: {e}", flush=True)


class BestCheckpoint:
  """Keeps the state of the step with the best value of one metric.

  ``update`` saves a state when its value beats the kept one (strictly; a
  NaN never does), replacing it; the record of the kept step survives
  restarts (it is read back from disk), so a resumed run compares against
  the best of the steps before it. A record of another metric (the run was
  resumed with another ``keep_best``) counts as none. A context manager, as
  ``Checkpointer``.
  """

  def __init__(self, directory: str, *, metric: str, mode: str,
               async_save: bool = True):
    if mode not in BEST_MODES:
      raise ValueError(f"mode must be one of {BEST_MODES}; got {mode!r}.")
    self.directory = os.path.abspath(directory)
    self.metric, self.mode = metric, mode
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=_BEST_ITEMS)
    self.record = self._read_record()

  def _read_record(self) -> Optional[dict[str, Any]]:
    step = self._manager.latest_step()
    if step is None:
      return None
    record = self._manager.restore(step, args=ocp.args.Composite(
        best=ocp.args.JsonRestore())).best
    return record if record.get("metric") == self.metric else None

  def is_better(self, value: float) -> bool:
    """Whether ``value`` beats the kept step's value (any finite value does
    when none is kept)."""
    if not math.isfinite(value):
      return False
    if self.record is None:
      return True
    kept = self.record["value"]
    return value > kept if self.mode == "max" else value < kept

  def update(self, step: int, value: float,
             state: Callable[[], PyTree], config: dict[str, Any]) -> bool:
    """Saves ``state()`` (one unreplicated copy; called only when needed) at
    ``step`` if ``value`` is better; returns whether it saved."""
    if not self.is_better(value):
      return False
    record = {"step": int(step), "metric": self.metric, "value": float(value),
              "mode": self.mode}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state()),
        config=ocp.args.JsonSave(config),
        best=ocp.args.JsonSave(record)), force=True)
    self.record = record
    return True

  def restore(self, abstract_state: PyTree) -> PyTree:
    """The kept state (call after the last ``update`` finished: ``wait``)."""
    if self.record is None:
      raise FileNotFoundError(f"No best checkpoint of {self.metric} in "
                              f"{self.directory}.")
    return self._manager.restore(self.record["step"], args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> "BestCheckpoint":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def load_params(directory: str, step: Optional[int] = None
                ) -> tuple[PyTree, PyTree, int]:
  """``(params, batch_stats, step)`` of checkpoint ``step`` (default: the
  newest) in ``directory``: a run's workdir or its ``checkpoints/``, or a
  ``best_checkpoint/``. For warm starts and evaluation."""
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  manager = ocp.CheckpointManager(
      os.path.abspath(directory), item_names=_ITEMS,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  steps = manager.all_steps()
  if step is None:
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint found in {directory}.")
  if step not in steps:
    raise FileNotFoundError(f"No checkpoint of step {step} in {directory}; "
                            f"it has steps {sorted(steps)}.")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  manager.close()
  state = restored.state
  return state["params"], state.get("batch_stats", {}), step


def check_same_structure(loaded: PyTree, expected: PyTree, what: str) -> None:
  """Raises naming the first parameter whose presence or shape differs."""
  flat_loaded = {jax.tree_util.keystr(k): v.shape for k, v in
                 jax.tree_util.tree_flatten_with_path(loaded)[0]}
  flat_expected = {jax.tree_util.keystr(k): v.shape for k, v in
                   jax.tree_util.tree_flatten_with_path(expected)[0]}
  for key, shape in flat_expected.items():
    if key not in flat_loaded:
      raise ValueError(f"{what}: parameter {key} is missing from the checkpoint.")
    if tuple(flat_loaded[key]) != tuple(shape):
      raise ValueError(f"{what}: parameter {key} has shape {flat_loaded[key]} "
                       f"in the checkpoint but {shape} in this model.")
  extra = sorted(set(flat_loaded) - set(flat_expected))
  if extra:
    raise ValueError(f"{what}: the checkpoint has parameters this model lacks: "
                     f"{', '.join(extra[:5])}.")
