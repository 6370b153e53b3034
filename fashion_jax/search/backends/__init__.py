"""Search backends behind one interface (`base.Backend`), picked by name.

  exact   brute force, jitted (exact.py): the default and the recall reference
  faiss   FAISS IVF / HNSW / flat, saved next to the index, memory-mapped (faiss_index.py)
  qdrant  a Qdrant server or cluster, or qdrant-client's embedded storage (qdrant_index.py)
FAISS and qdrant-client are imported when those backends are made, not here.
"""

from fashion_jax.search.backends import exact  # noqa: F401  (registers 'exact')
from fashion_jax.search.backends import faiss_index, qdrant_index  # noqa: F401
from fashion_jax.search.backends.base import (NO_CATEGORY, Backend, BackendError, backend_names,
                                              get, register)

__all__ = ['NO_CATEGORY', 'Backend', 'BackendError', 'backend_names', 'get', 'register']
