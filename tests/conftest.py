"""Test setup: four simulated CPU devices, set before JAX is imported, so
multi-device code is tested on this machine."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As the experiment files do (config.rng_impl): threefry's random calls take
# seconds each to compile on CPU.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A small ``mm_shapes/simple``, generated once per test worker."""
  import e2e  # pylint: disable=g-import-not-at-top
  return e2e.build_small_mm_shapes(str(tmp_path_factory.mktemp("tfds")))
