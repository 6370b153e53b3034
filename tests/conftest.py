"""Test session setup: four simulated CPU devices, so data parallelism is exercised on CPU.

XLA reads the flag once, when JAX initialises, so it is set before anything imports jax.
"""

import os

from simulated_devices import NUM_DEVICES, TEST_XLA_FLAGS

os.environ['XLA_FLAGS'] = (
    f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS.format(NUM_DEVICES)}".strip())
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
