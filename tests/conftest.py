"""Test setup: CPU only, seeded keys, a tiny digits config. Multi-device tests start their
own subprocesses (the device count is fixed when jax initializes)."""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compilation dominates these tests; XLA's lowest backend optimization level compiles in about
# half the time (the suite runs ~20% faster). Set here, before jax starts, it holds in-process
# and in every subprocess the tests start, so runs that are compared share it.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: helpers, datagen


@pytest.fixture
def key():
  return jax.random.key(0)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def tiny_config():
  from helpers import tiny_digits_config
  return tiny_digits_config()


@pytest.fixture(scope='module')
def cache_env(tmp_path_factory):
  """Environment for subprocesses of one test module sharing a persistent XLA compilation
  cache: every start after the first costs its imports, not a compile."""
  d = tmp_path_factory.mktemp('xla_cache')
  return {'JAX_COMPILATION_CACHE_DIR': str(d), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}
