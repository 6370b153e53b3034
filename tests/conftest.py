"""Test session setup: four simulated CPU devices, so data parallelism is exercised on CPU.

XLA reads the flag once, when JAX initialises, so it is set before anything imports jax.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
