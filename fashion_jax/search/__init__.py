"""Visual search over a shop catalogue with a trained model: index, query, serve, export.

See docs/search.md. `python -m fashion_jax.search --help` lists the commands.
"""

import os


def use_every_cpu_core() -> None:
  """Presents each CPU core as a JAX device, so the index is searched on all cores at once.

  Only before JAX starts, and only when XLA_FLAGS does not already choose a device count;
  accelerators are unaffected.
  """
  import sys
  flags = os.environ.get('XLA_FLAGS', '')
  if 'jax' in sys.modules or 'xla_force_host_platform_device_count' in flags:
    return
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  if cores and cores > 1:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={cores}'.strip()
