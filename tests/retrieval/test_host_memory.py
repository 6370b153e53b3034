"""host_memory.release: freed heap blocks that malloc keeps go back to the OS."""

import numpy as np
import pytest

from fashion_jax.retrieval import host_memory


def _resident_mb() -> float:
  with open('/proc/self/status', encoding='ascii') as f:
    line = next(line for line in f if line.startswith('VmRSS:'))
  return int(line.split()[1]) / 1024


def test_release_returns_the_freed_heap_to_the_os():
  if host_memory._malloc_trim() is None:
    pytest.skip('this C library has no malloc_trim')
  host_memory.release()
  # 96 MB in 64 KB blocks (below malloc's threshold for mapping blocks of their own), then all
  # freed but the last one, which keeps the heap's top where it is: the freed blocks stay
  # resident until they are released.
  blocks = [np.ones(8192) for _ in range(1536)]
  last = blocks[-1]
  before = _resident_mb()
  del blocks
  kept = _resident_mb()
  assert host_memory.release()
  released = _resident_mb()
  assert last.sum() == 8192
  assert kept > before - 16, (before, kept)
  assert released < kept - 64, (kept, released)

