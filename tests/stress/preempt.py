r"""Preemption soak: signal runs at random moments, restart them, count losses.

Not part of the default test suite (it takes about an hour on the 2-core CPU
machine). Each trial starts ``python -m mmjax.main`` on a small model
(checkpoints every 7 steps, validation every 4, as in issue 11's
reproduction), sends it a stop signal, then runs the same command again to the
end, and checks:

* the run exits with 128 + signal and names the step it saved, and that step
  is on disk when it exits (or the run finished with ``results.json``, if the
  signal came during the final evaluation or after ``Done``);
* the restart resumes from exactly that step;
* the resumed run ends with parameters and BatchNorm statistics bit-identical
  to an uninterrupted run of the same command.

Where the signal lands is drawn per trial: at a random moment (0-0.3 s after
a random step, 0-59, was logged; step 0 is while the first step compiles),
the moment an async save's temporary directory appears, the moment a
validation starts (a train line at an evaluation step logged, its validation
line not yet), or during the final evaluation. A trial sends SIGTERM or
SIGINT, sometimes a second signal while the first is handled; a few trials
send SIGKILL during a save instead and check that the restart resumes from
the newest complete checkpoint. What was observed just before each signal (a save in flight, an
evaluation in progress) is counted::

    python tests/stress/preempt.py --runs=100 --parallel=2 \
        --workdir=/tmp/mmjax/stress
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import e2e  # pylint: disable=g-import-not-at-top,wrong-import-position
from mmjax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

STEPS, SAVE_EVERY, EVAL_EVERY, LOG_EVERY = 60, 7, 4, 2
OVERRIDES = [f"--config.train.steps={STEPS}",
             f"--config.checkpoint.every_steps={SAVE_EVERY}",
             f"--config.train.eval_every_steps={EVAL_EVERY}",
             f"--config.train.log_every_steps={LOG_EVERY}"]
# A larger validation split makes an evaluation last long enough to aim at.
SPLITS = {"train": 640, "validation": 1500, "test": 96}
# The second form is the message before issue 11's fix, so that the script
# can be pointed at older commits.
SAVED = re.compile(r"checkpoint (\d+) is on disk|"
                   r"saved a checkpoint at step (\d+)")
RESUMED = re.compile(r"Resuming from checkpoint at step (\d+)\.")


def _save_in_flight(workdir) -> bool:
  path = os.path.join(workdir, "checkpoints")
  return os.path.isdir(path) and any("tmp" in d for d in os.listdir(path))


def _last_logged(workdir) -> dict:
  """The last complete line of ``metrics.jsonl`` (the run may be writing
  the next one)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().split("\n")[:-1]
  except FileNotFoundError:
    lines = []
  return json.loads(lines[-1]) if lines else {"step": 0, "split": ""}


def _eval_in_progress(workdir) -> bool:
  """The last line is a train line at an evaluation step (before the end)."""
  last = _last_logged(workdir)
  return (last["split"] == "train" and last["step"] % EVAL_EVERY == 0
          and last["step"] < STEPS)


def _final_eval_in_progress(workdir) -> bool:
  """The last step is logged (and maybe its validation), its test not yet."""
  last = _last_logged(workdir)
  return last["step"] == STEPS and last["split"] in ("train", "validation")


def _wait_until(predicate, process, timeout=300.0) -> bool:
  deadline = time.time() + timeout
  while process.poll() is None and time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.001)
  return False


def _params(workdir):
  params, stats, step = checkpoint_lib.load_params(str(workdir))
  return e2e.leaves(params) + e2e.leaves(stats), step


def _identical(a, b) -> bool:
  return len(a) == len(b) and all(
      x.dtype == y.dtype and x.shape == y.shape and (x == y).all()
      for x, y in zip(a, b))


def trial(index: int, args, data_dir: str, reference) -> dict:
  """One signalled run and its restart; returns what happened."""
  rng = random.Random(args.seed * 100_003 + index)
  aim = rng.choices(["random", "save", "evaluation", "final_evaluation",
                     "sigkill_in_save"], weights=[40, 25, 20, 5, 10])[0]
  signum = signal.SIGKILL if aim == "sigkill_in_save" else rng.choice(
      [signal.SIGTERM, signal.SIGTERM, signal.SIGINT])
  second = aim != "sigkill_in_save" and rng.random() < 0.3
  workdir = os.path.join(args.workdir, f"trial_{index:03d}")
  shutil.rmtree(workdir, ignore_errors=True)
  command = e2e.command(workdir, data_dir, *OVERRIDES)
  record = dict(trial=index, aim=aim, signal=signal.Signals(signum).name,
                second_signal=second, problems=[])

  log_path = workdir + ".log"
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, cwd=e2e.ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
  read_log = lambda: open(log_path).read()
  _wait_until(lambda: "Training" in read_log(), process)
  after_step = rng.randrange(STEPS - SAVE_EVERY)  # Aim at a later save/eval.
  if aim == "random":
    after_step = rng.randrange(STEPS)
    _wait_until(lambda: _last_logged(workdir)["step"] >= after_step, process)
    time.sleep(rng.uniform(0, 0.3))
  elif aim == "final_evaluation":
    _wait_until(lambda: _final_eval_in_progress(workdir), process)
  elif aim in ("save", "sigkill_in_save"):
    _wait_until(lambda: (_last_logged(workdir)["step"] >= after_step and
                         _save_in_flight(workdir)), process)
  else:
    _wait_until(lambda: (_last_logged(workdir)["step"] >= after_step and
                         _eval_in_progress(workdir)), process)
  record["save_in_flight"] = _save_in_flight(workdir)
  record["eval_in_progress"] = _eval_in_progress(workdir)
  complete_before = e2e.checkpoint_steps(workdir)
  if process.poll() is None:
    process.send_signal(signum)
    record["sent"] = True
    if second:
      time.sleep(rng.uniform(0, 0.5))
      if process.poll() is None:
        process.send_signal(rng.choice([signal.SIGTERM, signal.SIGINT]))
  else:
    record["sent"] = False
  process.wait(timeout=600)
  output = read_log()
  record["exit_code"] = process.returncode
  on_disk = e2e.checkpoint_steps(workdir)
  record["on_disk_after_stop"] = on_disk

  if aim == "sigkill_in_save":
    expected = max(on_disk, default=0)  # 0: a fresh start.
    if expected < max(complete_before, default=0):
      record["problems"].append(f"SIGKILL lost complete steps: before "
                                f"{complete_before}, after {on_disk}")
  elif process.returncode == 0 or (process.returncode < 0 and
                                   "Done: " in output):
    # The signal came during the final evaluation (the run finishes), or
    # after the run had ended (it may then kill the exiting process).
    expected = STEPS
    record["finished_anyway"] = True
    if not os.path.exists(os.path.join(workdir, "results.json")):
      record["problems"].append("the run ended without results.json")
  elif process.returncode == 128 + signum:
    reported = [int(a or b) for a, b in SAVED.findall(output)]
    expected = reported[-1] if reported else None
    record["reported_step"] = expected
    if expected is None:
      record["problems"].append("no step reported")
    elif expected not in on_disk:
      record["problems"].append(
          f"LOST: reported checkpoint {expected}, on disk {on_disk}")
  else:
    expected = None
    record["problems"].append(f"exit code {process.returncode}:\n"
                              f"{output[-1500:]}")

  restart = subprocess.run(command, cwd=e2e.ROOT, capture_output=True,
                           text=True, timeout=900)
  resumed = [int(s) for s in RESUMED.findall(restart.stdout)]
  record["resumed_from"] = resumed[0] if resumed else 0
  if restart.returncode != 0:
    record["problems"].append(f"restart failed: {restart.stderr[-1500:]}")
  elif expected is not None and record["resumed_from"] != expected:
    record["problems"].append(f"resumed from {record['resumed_from']}, "
                              f"expected {expected}")
  if restart.returncode == 0:
    leaves, step = _params(workdir)
    if step != STEPS or not _identical(leaves, reference):
      record["problems"].append("final parameters differ from the "
                                "uninterrupted run")
  if not record["problems"] and not args.keep:
    shutil.rmtree(workdir, ignore_errors=True)
    os.remove(log_path)
  return record


def summarize(records: list[dict]) -> dict:
  sent = [r for r in records if r.get("sent")]
  return {
      "trials": len(records),
      "signals_sent": len(sent),
      "by_aim": dict(collections.Counter(r["aim"] for r in records)),
      "by_signal": dict(collections.Counter(r["signal"] for r in sent)),
      "second_signal": sum(r["second_signal"] for r in sent),
      "save_in_flight_at_signal": sum(r["save_in_flight"] for r in sent),
      "eval_in_progress_at_signal": sum(r["eval_in_progress"] for r in sent),
      "stopped_at": dict(sorted(collections.Counter(
          r.get("reported_step") for r in sent
          if r.get("reported_step") is not None).items())),
      "finished_anyway": sum(bool(r.get("finished_anyway")) for r in sent),
      "resumed_from": dict(sorted(collections.Counter(
          r["resumed_from"] for r in records
          if r.get("resumed_from") is not None).items())),
      "lost_checkpoints": sum(any(p.startswith("LOST") for p in r["problems"])
                              for r in records),
      "trials_with_problems": sum(bool(r["problems"]) for r in records),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", type=int, default=100)
  parser.add_argument("--parallel", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/mmjax/stress")
  parser.add_argument("--keep", action="store_true",
                      help="Keep every trial's workdir, not only failed ones.")
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  data_dir = os.path.join(args.workdir, "tfds")
  if not os.path.isdir(os.path.join(data_dir, "mm_shapes")):
    e2e.build_small_mm_shapes(data_dir, SPLITS)

  reference_dir = os.path.join(args.workdir, "uninterrupted")
  if not os.path.exists(os.path.join(reference_dir, "results.json")):
    e2e.run(e2e.command(reference_dir, data_dir, *OVERRIDES))
  reference, _ = _params(reference_dir)

  records, lock = [], threading.Lock()
  results_path = os.path.join(args.workdir, "trials.jsonl")

  def run_one(index):
    try:
      record = trial(index, args, data_dir, reference)
    except Exception as e:  # pylint: disable=broad-except
      record = dict(trial=index, aim="?", signal="?", second_signal=False,
                    resumed_from=None, problems=[f"the script failed: {e!r}"])
    with lock:
      records.append(record)
      with open(results_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      status = "ok" if not record["problems"] else record["problems"]
      print(f"[{len(records)}/{args.runs}] trial {index} {record['aim']} "
            f"{record['signal']} -> resumed from {record['resumed_from']}: "
            f"{status}", flush=True)

  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    list(pool.map(run_one, range(args.runs)))
  summary = summarize(records)
  print(json.dumps(summary, indent=2))
  with open(os.path.join(args.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  sys.exit(1 if summary["trials_with_problems"] else 0)


if __name__ == "__main__":
  main()
