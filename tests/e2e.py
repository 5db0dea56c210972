"""Shared by the end-to-end tests (and ``tests/stress``): a small
``mm_shapes/simple``, a small model, and the command that trains it."""

import importlib.util
import os
import socket
import subprocess
import sys
import time

import numpy as np

from mmjax import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_SPLITS = {"train": 640, "validation": 96, "test": 96}
# A small model, so that compiling takes seconds.
SMALL_MODEL = {"model.encoders.image.features": (8, 16),
               "model.encoders.question.hidden": 32,
               "model.fusion.channels": 16,
               "model.fusion.dim": 32}


def build_small_mm_shapes(data_dir: str, splits=None) -> str:
  """Generates ``mm_shapes/simple`` with ``splits`` (default
  ``SMALL_SPLITS``) examples in ``data_dir``."""
  from mmjax.data import mm_shapes  # pylint: disable=g-import-not-at-top
  builder = mm_shapes.MmShapes(config="simple", data_dir=data_dir)
  builder.SPLIT_SIZES = splits or SMALL_SPLITS  # Later readers: prepared.
  builder.download_and_prepare(file_format="array_record")
  return data_dir


def load_experiment(name: str = "mm_shapes"):
  """The module of ``experiments/<name>.py`` (``.get_config(arg)``)."""
  path = os.path.join(ROOT, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def small_config(data_dir: str, *, experiment: str = "mm_shapes",
                 arg: str = "runlocal", **overrides):
  """The config ``command`` runs, in process: runlocal mm_shapes on
  ``data_dir`` with ``SMALL_MODEL``, then ``overrides`` (``{"a.b": value}``);
  ``experiment`` and ``arg`` choose another experiment file or variant."""
  config = load_experiment(experiment).get_config(arg)
  config.dataset.data_dir = data_dir
  for key, value in {**SMALL_MODEL, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def flags(overrides: dict) -> list[str]:
  """``{"a.b": 1}`` -> ``["--config.a.b=1"]``."""
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def command(workdir, data_dir, *overrides: str) -> list[str]:
  """``python -m mmjax.main`` on the small model: runlocal plus overrides."""
  return [sys.executable, "-m", "mmjax.main",
          "--config=experiments/mm_shapes.py:runlocal", f"--workdir={workdir}",
          f"--config.dataset.data_dir={data_dir}", *flags(SMALL_MODEL),
          *overrides]


def run(cmd: list[str], env=None) -> subprocess.CompletedProcess:
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result


def history(workdir) -> list[dict]:
  """Every logged value but the timings, in order."""
  return [{k: v for k, v in r.items()
           if k not in ("examples_per_sec", "train_seconds")}
          for r in metrics_lib.read_metrics(str(workdir))]


def leaves(tree) -> list[np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def checkpoint_steps(workdir) -> list[int]:
  """The complete checkpoint steps in ``workdir/checkpoints``, sorted (Orbax
  names a save in flight ``<step>.orbax-checkpoint-tmp-*``)."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """One multi-process JAX job on this machine: ``commands[i]`` is process
  ``i``'s command line (usually the same for all), started as the README's
  "Several hosts" section does on several hosts. Each process writes its
  output to ``log_dir/process_<i>.log`` (files, not pipes: a full pipe would
  stall one process and, through the collectives, all of them)."""

  def __init__(self, commands: list[list[str]], log_dir,
               devices_per_process: int):
    port = free_port()
    num_processes = len(commands)
    os.makedirs(log_dir, exist_ok=True)
    self.logs = [os.path.join(log_dir, f"process_{i}.log")
                 for i in range(num_processes)]
    self.processes = []
    for index, (cmd, log) in enumerate(zip(commands, self.logs)):
      env = dict(os.environ,
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(num_processes),
                 JAX_PROCESS_ID=str(index), JAX_PLATFORMS="cpu",
                 XLA_FLAGS=("--xla_force_host_platform_device_count="
                            f"{devices_per_process}"))
      with open(log, "w") as out:
        self.processes.append(subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))

  def output(self, index: int) -> str:
    with open(self.logs[index]) as f:
      return f.read()

  def wait_for(self, index: int, text: str, timeout: float = 300) -> None:
    """Waits until process ``index`` has printed ``text``."""
    deadline = time.time() + timeout
    while text not in self.output(index):
      if self.processes[index].poll() is not None or time.time() > deadline:
        raise AssertionError(f"process {index} did not print {text!r}:\n"
                             f"{self.output(index)[-3000:]}")
      time.sleep(0.05)

  def finish(self, timeout: float = 600) -> list[tuple[int, str]]:
    """``(exit code, output)`` of each process, once all have ended; kills
    them all if one does not end in time."""
    deadline = time.time() + timeout
    try:
      for process in self.processes:
        process.wait(timeout=max(deadline - time.time(), 1))
    finally:
      for process in self.processes:
        if process.poll() is None:
          process.kill()
          process.wait()
    return [(process.returncode, self.output(i))
            for i, process in enumerate(self.processes)]
