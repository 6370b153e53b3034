"""Query-gallery distance blocks and chunked exact top-k: the kernels every retrieval step shares.

Distances are squared Euclidean in float32, computed block by block so no [Q, G] array exists.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Reranked(NamedTuple):
  """Re-ranked distances of Q queries to G gallery items, stored sparsely (see rerank.py).

  final(i, j) = scale[i] * ||q_i - g_j||^2 + (1 - lambda) * J(i, j), where J(i, j) is
  jaccard[i, s] when jaccard_index[i, s] == j and 1 otherwise (no shared neighbours).

  scale: [Q] float32, lambda / (largest squared distance of query i to all N points).
  jaccard_index: [Q, W] int32 gallery indices, -1 for padding.
  jaccard: [Q, W] float32 Jaccard distances at those indices.
  lam: the lambda weight of the original distance.
  """
  scale: np.ndarray
  jaccard_index: np.ndarray
  jaccard: np.ndarray
  lam: float


def squared_distances(queries: jax.Array, gallery: jax.Array) -> jax.Array:
  """queries: [Q, D], gallery: [G, D] (any float dtype) -> [Q, G] float32 squared distances.

  Low-precision embeddings are multiplied with float32 accumulation; float32 ones in full
  float32 (HIGHEST), since accelerators default to TF32/bf16 passes.
  """
  cross = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
  q = queries.astype(jnp.float32)
  g = gallery.astype(jnp.float32)
  squared = jnp.sum(q * q, axis=1)[:, None] + jnp.sum(g * g, axis=1)[None, :] - 2.0 * cross
  return jnp.maximum(squared, 0.0)


def gathered_squared_distances(queries: jax.Array, gallery: jax.Array,
                               index: jax.Array) -> jax.Array:
  """queries: [Q, D], gallery: [G, D], index: [Q, P] -> [Q, P] float32 ||q_i - g_index[i,p]||^2.

  The same expansion as `squared_distances`, so ties between exactly representable distances
  are ties here too. Negative indices give meaningless values; callers mask them.
  """
  picked = gallery[jnp.clip(index, 0)]
  cross = jnp.einsum('qd,qpd->qp', queries, picked, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
  q = queries.astype(jnp.float32)
  g = picked.astype(jnp.float32)
  squared = jnp.sum(q * q, axis=1)[:, None] + jnp.sum(g * g, axis=2) - 2.0 * cross
  return jnp.maximum(squared, 0.0)


def block_distances(queries: jax.Array, gallery: jax.Array, start: jax.Array,
                    rerank: Reranked | None) -> jax.Array:
  """Ranking distances of a query chunk to the gallery block starting at index `start`.

  Args:
    queries: [Qc, D].
    gallery: [Gc, D], gallery items start .. start + Gc - 1.
    start: int32 scalar.
    rerank: None, or a Reranked whose arrays hold the rows of this query chunk.

  Returns:
    [Qc, Gc] float32: squared distances, or re-ranked distances when `rerank` is given.
  """
  squared = squared_distances(queries, gallery)
  if rerank is None:
    return squared
  rows = jnp.broadcast_to(jnp.arange(squared.shape[0])[:, None], rerank.jaccard_index.shape)
  # Padding (-1) and indices outside this block are sent past its end and dropped; a negative
  # column would wrap around instead.
  local = rerank.jaccard_index - start
  cols = jnp.where((rerank.jaccard_index >= 0) & (local >= 0), local, squared.shape[1])
  jaccard = jnp.ones_like(squared).at[rows, cols].set(rerank.jaccard, mode='drop')
  return rerank.scale[:, None] * squared + (1.0 - rerank.lam) * jaccard


def pad_rows(array: np.ndarray, multiple: int, value=0) -> np.ndarray:
  """Pads axis 0 up to a multiple of `multiple` with `value`."""
  array = np.asarray(array)
  padding = -len(array) % multiple
  return np.pad(array, [(0, padding)] + [(0, 0)] * (array.ndim - 1), constant_values=value)


def chunk_length(count: int, chunk_size: int) -> int:
  """chunk_size, or the next power of two for fewer items.

  Every chunk has the same length, so one compilation serves a whole pass, and a small set
  (one category of a constrained evaluation) is not padded to a full chunk.
  """
  return min(chunk_size, 1 << max(count - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnames=('k', 'gallery_chunk'))
def _top_k_chunk(queries, gallery, gallery_size, rerank, k, gallery_chunk):
  """Top-k of one query chunk over a padded gallery: scan over gallery blocks, merge."""
  num_queries = queries.shape[0]

  def body(carry, start):
    best_d, best_i, row_max = carry
    block = jax.lax.dynamic_slice_in_dim(gallery, start, gallery_chunk)
    d = block_distances(queries, block, start, rerank)
    index = start + jnp.arange(gallery_chunk, dtype=jnp.int32)
    real = index < gallery_size
    row_max = jnp.maximum(row_max, jnp.max(jnp.where(real[None], d, -jnp.inf), axis=1))
    d = jnp.where(real[None], d, jnp.inf)
    # Earlier blocks come first in the concatenation and lax.top_k keeps the lower position
    # among equal values, so ties stay ordered by gallery index across blocks.
    both_d = jnp.concatenate([best_d, d], axis=1)
    both_i = jnp.concatenate([best_i, jnp.broadcast_to(index, d.shape)], axis=1)
    neg_d, pos = jax.lax.top_k(-both_d, k)
    return (-neg_d, jnp.take_along_axis(both_i, pos, axis=1), row_max), None

  init = (jnp.full((num_queries, k), jnp.inf, jnp.float32),
          jnp.full((num_queries, k), -1, jnp.int32),
          jnp.full((num_queries,), -jnp.inf, jnp.float32))
  starts = jnp.arange(0, gallery.shape[0], gallery_chunk, dtype=jnp.int32)
  (best_d, best_i, row_max), _ = jax.lax.scan(body, init, starts)
  return best_d, best_i, row_max


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, *, rerank: Reranked | None = None,
          chunk_size: int = 1024, gallery_chunk_size: int = 1024,
          progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The k nearest gallery items of every query, exact, ties by gallery index.

  Memory O((Q + G) x D + Q x k): queries in chunks of `chunk_size`, each scanned over gallery
  blocks of `gallery_chunk_size` whose top-k are merged into a running list.

  Args:
    queries: [Q, D] float (float32, bfloat16 or float16).
    gallery: [G, D] same dtype.
    k: list length; clipped to G.
    rerank: rank by these re-ranked distances instead (Q rows).
    chunk_size, gallery_chunk_size: block shape; memory grows as their product.
    progress: optional callable(stage, num_done, total) called after each query chunk.

  Returns:
    index: [Q, min(k, G)] int32, nearest first.
    distances: [Q, min(k, G)] float32 ranking distances (squared Euclidean, or re-ranked).
    row_max: [Q] float32, the largest distance of each query to the gallery.
  """
  queries, gallery = np.asarray(queries), np.asarray(gallery)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f'top_k needs [Q, D] and [G, D] embeddings, got {queries.shape} and '
                     f'{gallery.shape}')
  num_queries, gallery_size = len(queries), len(gallery)
  if num_queries == 0 or gallery_size == 0 or k < 1:
    raise ValueError(f'top_k needs queries, a gallery and k >= 1, got Q={num_queries}, '
                     f'G={gallery_size}, k={k}')
  k = min(k, gallery_size)
  q_chunk = chunk_length(num_queries, chunk_size)
  g_chunk = chunk_length(gallery_size, gallery_chunk_size)
  padded_gallery = jnp.asarray(pad_rows(gallery, g_chunk))
  padded_queries = pad_rows(queries, q_chunk)
  padded_rerank = pad_rerank(rerank, q_chunk)
  outputs = []
  for start in range(0, len(padded_queries), q_chunk):
    rows = slice(start, start + q_chunk)
    # Read back per chunk: progress then reports finished work, not queued work.
    outputs.append([np.asarray(a) for a in _top_k_chunk(
        padded_queries[rows], padded_gallery, gallery_size, slice_rerank(padded_rerank, rows),
        k, g_chunk)])
    if progress is not None:
      progress('top-k', min(start + q_chunk, num_queries), num_queries)
  distances, index, row_max = (
      np.concatenate([o[i] for o in outputs])[:num_queries] for i in range(3))
  return index, distances, row_max


def pad_rerank(rerank: Reranked | None, multiple: int) -> Reranked | None:
  """Query rows padded to a multiple (padding rows have no Jaccard entries)."""
  if rerank is None:
    return None
  return Reranked(pad_rows(rerank.scale, multiple), pad_rows(rerank.jaccard_index, multiple, -1),
                  pad_rows(rerank.jaccard, multiple), rerank.lam)


def slice_rerank(rerank: Reranked | None, rows: slice) -> Reranked | None:
  """The Reranked rows of one query chunk."""
  if rerank is None:
    return None
  return Reranked(rerank.scale[rows], rerank.jaccard_index[rows], rerank.jaccard[rows],
                  rerank.lam)
