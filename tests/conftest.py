"""Test session setup: four simulated CPU devices, so data parallelism is exercised on CPU.

XLA reads the flag once, when JAX initialises, so it is set before anything imports jax.
"""

import os

# Subprocess tests start their own processes with these flags, so results compare bitwise.
TEST_XLA_FLAGS = '--xla_force_host_platform_device_count={}'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS.format(4)}".strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
  """fashion_synth/tiny generated once per test session (per xdist worker)."""
  from data_pipelines import datasets
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  datasets.get_builder('fashion_synth/tiny', data_dir)
  return data_dir


@pytest.fixture(scope='session')
def tiny_builder(tiny_data_dir):
  from data_pipelines import datasets
  return datasets.get_builder('fashion_synth/tiny', tiny_data_dir)


@pytest.fixture(autouse=True, scope='session')
def _compilation_cache(tmp_path_factory):
  """Compiled programs are shared between tests that build the same computation."""
  import jax
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.getbasetemp() / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
