"""Stopping on SIGTERM/SIGINT at a step that every process agrees on.

A preemptible machine gets SIGTERM some seconds before it is taken away;
Ctrl-C sends SIGINT. Inside ``StopRequest`` neither interrupts anything: the
train loop asks ``should_stop(step)`` once per step, at the one point where
nothing is half done (after the step's logging, checkpoint and evaluation),
then saves that step, waits until it is on disk and exits. Further signals
while this happens, and until the process has exited, change nothing.

* One process: a Python handler records the first signal.
* Several processes: they must stop at the same step, or the others would
  hang in the next collective. ``jax.distributed.initialize`` installs JAX's
  preemption notifier for SIGTERM, which tells the coordination service; every
  process asks ``multihost_utils.reached_preemption_sync_point(step)``, which
  becomes True at the same step everywhere (the largest step any process had
  reached, plus one). SIGINT is passed on to that notifier as SIGTERM.
  Replacing JAX's SIGTERM handler with a Python one would silence it, so
  ``StopRequest`` leaves SIGTERM alone there.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """Turns SIGTERM and SIGINT into a request to stop at an agreed step."""

  def __init__(self):
    self._multihost = jax.process_count() > 1
    if self._multihost and not jax.config.jax_enable_preemption_service:
      raise RuntimeError(
          "Multi-process runs stop on SIGTERM through JAX's preemption "
          "service, which is disabled here; do not set "
          "jax_enable_preemption_service=False.")
    self._previous = {}
    self.signal: Optional[signal.Signals] = None  # The first one received.

  def __enter__(self) -> "StopRequest":
    handled = ((signal.SIGINT,) if self._multihost
               else (signal.SIGTERM, signal.SIGINT))
    for sig in handled:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    # After a stop the process is exiting: a further signal must not kill it
    # on the way out (its exit code would no longer say why it stopped).
    stopping = self.signal is not None
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_IGN if stopping else handler)

  def _handle(self, signum, frame) -> None:
    # Only record (and pass on): the handler runs between two bytecodes of the
    # main thread, anywhere, even inside a print, a save or an evaluation.
    del frame
    if self.signal is None:
      self.signal = signal.Signals(signum)
      if self._multihost:
        os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier.

  def should_stop(self, step: int) -> bool:
    """Whether to stop after ``step`` completed steps. Call it for every step
    on every process, at the same point of the loop."""
    if self._multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None

  @property
  def exit_code(self) -> int:
    """128 + the signal's number, as a shell reports a process it killed."""
    return 128 + int(self.signal or signal.SIGTERM)

  @property
  def reason(self) -> str:
    if self.signal is not None:
      return f"Received {self.signal.name}"
    return (f"A stop signal reached one of the {jax.process_count()} "
            "processes (SIGTERM, or SIGINT passed on as SIGTERM)")
