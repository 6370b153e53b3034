"""Handing freed host memory back to the operating system between the stages of a computation.

glibc's malloc keeps freed blocks for reuse, in one arena per thread that allocated them, and
raises its threshold for mapping large blocks directly each time such a block is freed. XLA's
CPU client allocates its buffers through malloc from several threads, so the temporaries of one
jitted stage stay resident, spread over arenas where the next stage's allocations often cannot
reuse them, and the peaks of successive stages add up. `release()` returns every arena's free
memory (malloc_trim); elsewhere (macOS, musl) it does nothing.
"""

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
  """glibc's malloc_trim, or None where the C library has none."""
  name = ctypes.util.find_library('c')
  try:
    function = ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError, TypeError):
    return None
  function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
  return function


def release() -> bool:
  """Returns the free memory of every malloc arena to the OS; True when some was returned.

  Costs about a millisecond per hundred MB of free heap: call it between stages, not in loops.
  """
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False
