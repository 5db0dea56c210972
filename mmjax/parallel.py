"""Data parallelism: the only module that knows about devices.

A step is written for one device (see ``mmjax.steps``) and averages what must
agree over the named axis ``AXIS``. ``DataParallel`` maps it over every device
with one of two interchangeable backends:

* ``pmap`` (default): the state is replicated with a leading ``[devices]``
  axis and each local batch is split into ``[devices, per_device, ...]``.
* ``shard_map``: ``jax.shard_map`` under ``jax.jit`` over a 1-D ``Mesh``; the
  state is one replicated global array per leaf and the batch one global array
  sharded along its first axis. (JAX implements pmap on top of shard_map and
  recommends the latter.) Replication checking (``check_vma``) is off: flax's
  scanned RNNs start from an unvarying carry that the check rejects, while the
  step makes every output equal across devices with ``pmean``/``psum``
  (``tests/test_parallel.py`` checks the result against one device).

Both donate the state, so an update reuses its buffers, and on a host split
into CPU devices both return a step only once it is computed
(``CPU_THREADS_PER_DEVICE``). Everything leaving this module for the host
(metrics, state to save) is a single unreplicated copy.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
BACKENDS = ("pmap", "shard_map")

PyTree = Any


def initialize_distributed() -> None:
  """Joins a multi-host job when launched as one (no-op on a single host).

  Set ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every host, or run under a
  cluster that JAX detects (SLURM, Open MPI, Cloud TPU, Kubernetes). On CPU,
  cross-process collectives use gloo.
  """
  env = os.environ
  num_processes = env.get("JAX_NUM_PROCESSES")
  process_id = env.get("JAX_PROCESS_ID")
  if (num_processes is None) != (process_id is None):
    raise ValueError("Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (this "
                     "host's index, 0 to JAX_NUM_PROCESSES - 1), or neither.")
  explicit = env.get("JAX_COORDINATOR_ADDRESS") or num_processes is not None
  under_slurm = int(env.get("SLURM_NTASKS", "1")) > 1
  if not (explicit or under_slurm):
    return
  if explicit and not env.get("JAX_COORDINATOR_ADDRESS"):
    raise ValueError("JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS is "
                     "not: set it to host:port of process 0 on every host.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      num_processes=int(num_processes) if num_processes else None,
      process_id=int(process_id) if process_id else None)


# XLA:CPU threads per device when the host is split into several devices.
# One thread per device is the fastest (AV-MNIST late fusion at batch 40, 2
# devices on 2 cores: 41-42 ms a step against 46-47 with two), and safe only
# while each device runs one step at a time: a device's collectives wait on
# pool threads for the other devices, and with the next step dispatched
# before the last one ended, each such run deadlocked in an all-reduce
# within 600 steps (tests/stress/cpu_devices.py). ``DataParallel`` therefore
# waits for each step on split CPU devices (``waits_for_each_step``).
CPU_THREADS_PER_DEVICE = 1


def use_cpu_devices(count: int) -> None:
  """Splits the host CPU into ``count`` XLA devices (0: JAX's default, one).

  Data parallelism over them gives each device part of the batch and a
  share of the cores. On the 2-core CPU machine AV-MNIST's small
  convolutions train faster this way than with one device running each
  operation on both cores (README, Performance). Metrics then equal a run on
  as many accelerators, not a one-device run: the float sums are split
  differently, as they are by another thread count.

  Sets XLA's CPU thread pool to at least ``CPU_THREADS_PER_DEVICE`` threads
  per device and at least one per core (unless ``PJRT_NPROC`` is set). Call
  it before JAX initialises its backends (before the first JAX operation);
  no other backend changes.
  """
  if count < 0:
    raise ValueError(f"config.parallel.cpu_devices={count}: use 0 (JAX's "
                     "default) or a number of devices to split the CPU into.")
  if count == 0:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:  # Backends started: fine if they match.
    running = len(jax.devices("cpu"))
    if running == count:
      return
    raise RuntimeError(
        f"config.parallel.cpu_devices={count}, but JAX already started "
        f"{running} CPU device(s) in this process. Apply the setting before "
        "the first JAX operation (python -m mmjax.main does), or set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before "
        "starting Python.") from e
  threads = max(os.cpu_count() or 1, CPU_THREADS_PER_DEVICE * count)
  os.environ.setdefault("PJRT_NPROC", str(threads))


def gather_from_processes(value: np.ndarray) -> np.ndarray:
  """``[processes, ...]``: every process's ``value`` (all must call it)."""
  if jax.process_count() == 1:
    return np.asarray(value)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def sync_processes(name: str) -> None:
  """Waits until every process reaches the barrier ``name``."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class DataParallel:
  """Maps per-device steps over all devices with ``backend``."""

  def __init__(self, backend: str = "pmap", devices=None):
    if backend not in BACKENDS:
      raise ValueError(f"Unknown parallel backend {backend!r}. Valid: "
                       f"{', '.join(BACKENDS)}.")
    self.backend = backend
    self.devices = list(devices or jax.devices())
    self.local_devices = [d for d in self.devices
                          if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.array(self.devices), (AXIS,))
    # pmap's input layout: a leading axis over this process's devices.
    self._pmap_sharding = NamedSharding(
        Mesh(np.array(self.local_devices), (AXIS,)), P(AXIS))
    # A host split into CPU devices runs one step at a time (see
    # CPU_THREADS_PER_DEVICE); accelerators keep JAX's asynchronous dispatch.
    self.waits_for_each_step = len(self.devices) > 1 and all(
        d.platform == "cpu" for d in self.devices)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  # State ---------------------------------------------------------------------

  def replicate(self, tree: PyTree) -> PyTree:
    """Host state -> device state (one copy per device)."""
    if self.backend == "shard_map":
      # Every process holds the same host state: no cross-process transfer
      # (or the equality check that device_put would make).
      replicated = NamedSharding(self.mesh, P())
      return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
          replicated, np.asarray(x)), tree)
    n = len(self.local_devices)

    def stack(x):
      x = np.stack([np.asarray(x)] * n)
      return jax.device_put(x, self._pmap_sharding)

    return jax.tree.map(stack, tree)

  def unreplicate(self, tree: PyTree) -> PyTree:
    """Device state -> one copy (on the first local device).

    Reads this process's first shard: indexing the whole pmap array instead
    (``x[0]``) would be a computation over every process's devices.
    """
    if self.backend == "shard_map":
      return tree
    return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)

  def host_copy(self, tree: PyTree) -> PyTree:
    """Device state -> one copy in host memory (numpy), e.g. to save."""
    first_shard = lambda x: np.asarray(x.addressable_data(0))
    if self.backend == "shard_map":
      return jax.tree.map(first_shard, tree)
    return jax.tree.map(lambda x: first_shard(x)[0], tree)

  # Batches -------------------------------------------------------------------

  def shard_batch(self, batch: dict[str, np.ndarray]) -> PyTree:
    """This process's ``[local_batch, ...]`` -> the global batch on devices."""
    if self.backend == "shard_map":
      sharding = NamedSharding(self.mesh, P(AXIS))
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    n = len(self.local_devices)

    def split(x):
      if x.shape[0] % n:
        raise ValueError(f"Local batch of {x.shape[0]} does not split over "
                         f"{n} devices; use a batch size divisible by {n}.")
      x = x.reshape((n, x.shape[0] // n) + x.shape[1:])
      return jax.device_put(x, self._pmap_sharding)

    return jax.tree.map(split, batch)

  # Steps ---------------------------------------------------------------------

  def train_step(self, step_fn: Callable[..., tuple[PyTree, PyTree]]
                 ) -> Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]:
    """``step_fn(state, batch, axis_name=...) -> (state, metrics)`` over all
    devices; returned metrics are unreplicated scalars (still on device).

    With either backend the result has jax's ``.lower(state, batch)``: its
    ``.compile()`` is the program that calls run (and caches it for them), for
    one device, so its ``cost_analysis()`` counts one device's share.
    """
    per_device = lambda state, batch: step_fn(state, batch, axis_name=AXIS)
    if self.backend == "shard_map":
      step = jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                                   in_specs=(P(), P(AXIS)),
                                   out_specs=(P(), P()), check_vma=False),
                     donate_argnums=0)
    else:
      pmapped = jax.pmap(per_device, axis_name=AXIS, donate_argnums=0,
                         devices=self.devices)

      def step(state, batch):
        state, metrics = pmapped(state, batch)
        return state, self.unreplicate(metrics)

      step.lower = pmapped.lower
    return self._one_at_a_time(step)

  def eval_step(self, step_fn: Callable[..., PyTree]
                ) -> Callable[[PyTree, PyTree], PyTree]:
    """``step_fn(state, batch, axis_name=...) -> sums`` over all devices,
    with ``.lower(state, batch)`` as ``train_step``'s."""
    per_device = lambda state, batch: step_fn(state, batch, axis_name=AXIS)
    if self.backend == "shard_map":
      step = jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                                   in_specs=(P(), P(AXIS)), out_specs=P(),
                                   check_vma=False))
    else:
      pmapped = jax.pmap(per_device, axis_name=AXIS, devices=self.devices)

      def step(state, batch):
        return self.unreplicate(pmapped(state, batch))

      step.lower = pmapped.lower
    return self._one_at_a_time(step)

  def _one_at_a_time(self, step: Callable[..., PyTree]
                     ) -> Callable[..., PyTree]:
    """``step`` returning only once its outputs are computed, where
    ``waits_for_each_step``; ``step`` itself elsewhere."""
    if not self.waits_for_each_step:
      return step

    def waiting_step(*args):
      return jax.block_until_ready(step(*args))

    waiting_step.lower = step.lower
    return waiting_step
