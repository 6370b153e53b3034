"""Search backends behind one interface (`base.Backend`), picked by name.

  exact   brute force, jitted (exact.py): the default and the recall reference
"""

from fashion_jax.search.backends import exact  # noqa: F401  (registers 'exact')
from fashion_jax.search.backends.base import (NO_CATEGORY, Backend, backend_names, get,
                                              register)

__all__ = ['NO_CATEGORY', 'Backend', 'backend_names', 'get', 'register']
