"""Test setup: four simulated CPU devices, set before JAX is imported, so
multi-device code is tested on this machine."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As the experiment files do (config.rng_impl): threefry's random calls take
# seconds each to compile on CPU.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
