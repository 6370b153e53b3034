"""Exact search: every query against every row, jitted, rows sharded over the local devices.

The reference the other backends are measured against, and the default for catalogues small
enough for a scan of every row per query (figures in bench/README.md).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax.retrieval.search import placed_rows
from fashion_jax.search.backends.base import NO_CATEGORY, Backend, register

# One compiled kernel serves every k up to this (a top-100 costs little more than a top-10).
_MIN_KERNEL_K = 100
# Queries searched in one call off CPU (each holds a float32 score for every row).
_MAX_QUERIES = 256
# The category of padding rows: matches no filter, and padding rows belong to no product.
_PADDING_CATEGORY = -2
# Row and product counts are rounded up to one of 2**_SIZE_STEPS sizes per doubling, so that a
# catalogue that changes while served compiles its search again only when it crosses one
# (each compilation stays in memory), for at most 1/_SIZE_STEPS padding.
_SIZE_STEPS = 4


@functools.partial(jax.jit, static_argnames=('k', 'num_products'))
def _best_products(queries, gallery, row_product, row_category, category, *, k, num_products):
  """Top-k products of each query by inner product; rows outside `category` (when >= 0) and
  padding rows (product `num_products`) are left out.

  Returns (scores [Q, k] float32, -inf where fewer products qualify; products [Q, k] int32).
  """
  similarity = jnp.matmul(queries.astype(gallery.dtype), gallery.T,
                          preferred_element_type=jnp.float32)
  allowed = (category < 0) | (row_category == category)
  similarity = jnp.where(allowed[None, :], similarity, -jnp.inf)
  per_product = jax.ops.segment_max(similarity.T, row_product, num_segments=num_products + 1,
                                    indices_are_sorted=False).T[:, :num_products]
  return jax.lax.top_k(per_product, k)


@register
class ExactBackend(Backend):
  """Brute force over the rows held in memory; nothing of its own on disk."""

  name = 'exact'

  def __init__(self, dim: int, dtype=np.float16):
    self._rows = np.zeros(0, np.int64)
    self._vectors = np.zeros((0, dim), dtype)
    self._products = np.zeros(0, np.int32)
    self._categories = np.zeros(0, np.int32)
    self._device = None  # the sharded arrays, rebuilt after a change
    # See _query_groups.
    self.one_query_per_call = jax.default_backend() == 'cpu'

  @classmethod
  def create(cls, directory, dim, dtype, settings):
    del directory, settings
    return cls(dim, np.dtype(dtype))

  @classmethod
  def open(cls, index, *, centroids):
    if centroids:
      rows = np.flatnonzero(index.product_live)
      vectors = index.centroids[rows].astype(index.embeddings.dtype)
      products, categories = rows, index.product_category[rows]
    else:
      rows = np.flatnonzero(index.live)
      vectors = index.embeddings[rows]
      products, categories = index.row_product[rows], index.row_category[rows]
    backend = cls(index.embeddings.shape[1], index.embeddings.dtype)
    backend.add(rows, vectors, products, categories)
    return backend

  def __len__(self) -> int:
    return len(self._rows)

  def add(self, rows, vectors, products, categories) -> None:
    self._rows = np.concatenate([self._rows, np.asarray(rows, np.int64)])
    self._vectors = np.concatenate([self._vectors, np.asarray(vectors, self._vectors.dtype)])
    self._products = np.concatenate([self._products, np.asarray(products, np.int32)])
    self._categories = np.concatenate([self._categories, np.asarray(categories, np.int32)])
    self._device = None

  def remove(self, rows) -> None:
    keep = ~np.isin(self._rows, np.asarray(rows, np.int64))
    self._rows, self._vectors = self._rows[keep], self._vectors[keep]
    self._products, self._categories = self._products[keep], self._categories[keep]
    self._device = None

  def _on_device(self):
    """Rows spread over every local device (each CPU core, see `use_every_cpu_core`), which
    search their share at once; padding rows go to a product that is never reported."""
    if self._device is None:
      devices = jax.local_devices()
      num_products = _rounded(int(self._products.max()) + 1) if len(self._products) else 0
      padding = _rounded(len(self._rows), multiple=len(devices)) - len(self._rows)
      row_product = np.concatenate([self._products, np.full(padding, num_products, np.int32)])
      row_category = np.concatenate([self._categories,
                                     np.full(padding, _PADDING_CATEGORY, np.int32)])
      mesh = Mesh(np.asarray(devices), ('rows',))
      sharded = NamedSharding(mesh, P('rows'))
      self._device = {
          # Written on the devices block by block: no padded copy of the rows on the host.
          'gallery': placed_rows([self._vectors], len(self._rows) + padding, sharded),
          'row_product': jax.device_put(row_product, sharded),
          'row_category': jax.device_put(row_category, sharded),
          'replicated': NamedSharding(mesh, P()), 'num_products': num_products}
    return self._device

  def search(self, queries, k, category=NO_CATEGORY):
    queries = np.asarray(queries, np.float32)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    products = np.full((len(queries), k), -1, np.int64)
    device = self._on_device()
    if device['num_products'] == 0:
      return scores, products
    kernel_k = min(device['num_products'], max(k, _MIN_KERNEL_K))
    width = min(k, kernel_k)
    for start, stop in self._query_groups(len(queries)):
      group = np.zeros((_padded(stop - start), queries.shape[1]), np.float32)
      group[:stop - start] = queries[start:stop]
      best, found = jax.device_get(_best_products(
          jax.device_put(group, device['replicated']), device['gallery'],
          device['row_product'], device['row_category'], np.int32(category), k=kernel_k,
          num_products=device['num_products']))
      best, found = best[:stop - start, :width], found[:stop - start, :width]
      scores[start:stop, :width] = best
      products[start:stop, :width] = np.where(np.isfinite(best), found, -1)
    return scores, products

  def _query_groups(self, count: int):
    """(start, stop) of the queries searched in one call. On CPU one query per call: XLA's CPU
    matrix-vector product reads a float16 index at memory speed, while a [Q > 1, D] x [D, N]
    float16 product takes a much slower path per query. Elsewhere (GPU, TPU) up to
    _MAX_QUERIES at once: one matrix product instead of a round trip per query, its [Q, N]
    scores bounded."""
    step = 1 if self.one_query_per_call else _MAX_QUERIES
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def _rounded(count: int, multiple: int = 1) -> int:
  """`count` rounded up to a size of the form m * 2**e with m < 2**(_SIZE_STEPS + 1) (16, 17,
  ... 31, 32, 34, 36, ... 62, 64, 68, ...), then to a multiple of `multiple`."""
  step = 1 << max(count.bit_length() - 1 - _SIZE_STEPS, 0)
  count = -(-count // step) * step
  return -(-count // multiple) * multiple


def _padded(count: int) -> int:
  """Queries per call rounded up to a power of two: few compilations, little padding."""
  return 1 << max(count - 1, 0).bit_length()
