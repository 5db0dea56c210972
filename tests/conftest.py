"""Test setup: four simulated CPU devices, set before JAX is imported, so
multi-device code is tested on this machine, and one compilation cache for
the whole test session."""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As the experiment files do (config.rng_impl): threefry's random calls take
# seconds each to compile on CPU.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

# Many tests, and the runs the end-to-end tests start as subprocesses (they
# inherit this environment), compile the same small programs: JAX's
# persistent cache loads them instead (a small mm_shapes run: 26 CPU-seconds
# compiling, 7 loading). The pytest process that creates the cache (the xdist
# controller, which its workers inherit it from) starts it empty and deletes
# it at the end, so no test sees a program compiled by another commit.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="mmjax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
  del config
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A small ``mm_shapes/simple``, generated once per test worker."""
  import e2e  # pylint: disable=g-import-not-at-top
  return e2e.build_small_mm_shapes(str(tmp_path_factory.mktemp("tfds")))
