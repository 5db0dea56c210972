r"""CPU devices soak: does a host split into devices deadlock in a collective?

Not part of the default test suite (about 20 minutes with the defaults on
the 2-core CPU machine). With ``config.parallel.cpu_devices=N`` a step's
all-reduces wait on XLA:CPU pool threads for the other devices. Once the
next step is dispatched before the last one ends, too few threads can all
be held by waiting collectives: XLA then aborts the process after its
collective timeout (``rendezvous.cc ... Termination timeout``). So
``DataParallel`` waits for each step on split CPU devices
(``waits_for_each_step``), which this soak checks.

Each trial runs ``python -m mmjax.bench`` (one run of ``--steps`` steps,
called one after another as in training) with ``PJRT_NPROC`` set to each of
``--threads`` in turn, and counts the runs that abort::

    python tests/stress/cpu_devices.py --runs=5 --threads=2,4 \
        --manual_dir=../shared/data/avmnist_raw

``mmjax.parallel.CPU_THREADS_PER_DEVICE`` is chosen from its figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys

# A deadlocked run aborts after this many seconds instead of XLA's 40.
COLLECTIVE_TIMEOUT_SECONDS = 10


def bench_once(args, threads: int) -> tuple[str, float | None]:
  """One ``mmjax.bench`` run with ``threads`` pool threads: ``("ok",
  ms_per_step)``, or ``("deadlock" | "failed (exit N)", None)``."""
  env = dict(os.environ, PJRT_NPROC=str(threads), XLA_FLAGS=(
      "--xla_cpu_collective_call_terminate_timeout_seconds="
      f"{COLLECTIVE_TIMEOUT_SECONDS} "
      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=5"))
  cmd = [sys.executable, "-m", "mmjax.bench", f"--config={args.config}",
         f"--config.dataset.manual_dir={args.manual_dir}",
         f"--config.parallel.cpu_devices={args.devices}",
         f"--steps={args.steps}", "--warmup=5", "--repeats=1",
         "--pipeline_batches=1"]
  result = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          check=False)
  if result.returncode == 0:
    return "ok", json.loads(result.stdout.splitlines()[-1])["ms_per_step"]
  if "Termination timeout" in result.stderr:
    return "deadlock", None
  return f"failed (exit {result.returncode})", None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--threads", default="2,4",
                      help="PJRT_NPROC values to compare, interleaved.")
  parser.add_argument("--config", default="experiments/avmnist.py")
  parser.add_argument("--manual_dir", default="../shared/data/avmnist_raw")
  args = parser.parse_args()
  outcomes = collections.defaultdict(collections.Counter)
  ms = collections.defaultdict(list)
  for run in range(args.runs):
    for threads in map(int, args.threads.split(",")):
      outcome, ms_per_step = bench_once(args, threads)
      outcomes[threads][outcome] += 1
      if ms_per_step is not None:
        ms[threads].append(ms_per_step)
      print(f"[{run + 1}/{args.runs}] PJRT_NPROC={threads}: {outcome}"
            + (f", {ms_per_step:.1f} ms a step" if ms_per_step else ""),
            flush=True)
  print(json.dumps({
      str(threads): {"outcomes": dict(counter),
                     "median_ms_per_step": (statistics.median(ms[threads])
                                            if ms[threads] else None)}
      for threads, counter in outcomes.items()}, indent=2))


if __name__ == "__main__":
  main()
