"""Retrieval evaluation (method.md section 5): mAP and Acc@k (CMC) of queries against a gallery.

Ranking is by exact float32 Euclidean distance with ties broken by gallery index.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.losses import pairwise_euclidean


def pairwise_distances(queries: jax.Array, gallery: jax.Array) -> jax.Array:
  """Euclidean distances, queries: [Q, D] float, gallery: [G, D] float -> [Q, G] float32.

  The loss's implementation (full float32 matmul) without its gradient-safety floor, which
  would otherwise merge every pair closer than 1e-6 into a tie.
  """
  return pairwise_euclidean(queries, gallery, min_squared=0.0)


@jax.jit
def per_query_metrics(
    query_emb: jax.Array,
    gallery_emb: jax.Array,
    query_ids: jax.Array,
    gallery_ids: jax.Array,
    query_cams: jax.Array | None = None,
    gallery_cams: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Average precision and first-positive rank of every query, all queries at once.

  The gallery is sorted by distance ascending, ties by gallery index. With cameras given,
  gallery items sharing both the query's id and its camera are dropped from its ranking.
  Memory is O(Q x G): `evaluate_retrieval` calls this on fixed-size query chunks.

  Args:
    query_emb: [Q, D] float.
    gallery_emb: [G, D] float.
    query_ids: [Q] int.
    gallery_ids: [G] int.
    query_cams: [Q] int or None.
    gallery_cams: [G] int or None (given together with query_cams).

  Returns:
    ap: [Q] float32, mean over the positives of the precision at their ranks (0 when invalid).
    first_rank: [Q] int32, 0-based rank of the first positive; G when there is none.
    valid: [Q] bool, the query has at least one positive left in its ranking.
  """
  distances = pairwise_distances(query_emb, gallery_emb)
  match = query_ids[:, None] == gallery_ids[None, :]
  if query_cams is not None:
    dropped = match & (query_cams[:, None] == gallery_cams[None, :])
    # +inf sends a dropped item behind every kept one, so the kept items keep their ranks.
    distances = jnp.where(dropped, jnp.inf, distances)
    match = match & ~dropped
  # A stable sort keyed on distance alone carries the match flags along in gallery-index
  # order within ties, without materialising a [Q, G] permutation and gathering through it.
  _, ranked_match = jax.lax.sort(
      (distances, match.astype(jnp.int32)), dimension=1, is_stable=True, num_keys=1
  )
  num_positives = jnp.sum(ranked_match, axis=1)
  valid = num_positives > 0
  hits = jnp.cumsum(ranked_match, axis=1)
  ranks = jnp.arange(1, ranked_match.shape[1] + 1, dtype=jnp.float32)
  precision_at_hits = jnp.where(ranked_match > 0, hits / ranks, 0.0)
  ap = jnp.sum(precision_at_hits, axis=1) / jnp.maximum(num_positives, 1)
  first_rank = jnp.where(valid, jnp.argmax(ranked_match, axis=1), ranked_match.shape[1])
  return ap, first_rank.astype(jnp.int32), valid


@functools.partial(jax.jit, static_argnames='topk')
def rank_gallery(
    query_emb: jax.Array, gallery_emb: jax.Array, topk: int
) -> tuple[jax.Array, jax.Array]:
  """The `topk` nearest gallery items of each query, in the metrics' order (for visualisation).

  Args:
    query_emb: [Q, D] float.
    gallery_emb: [G, D] float.
    topk: list length; clipped to G.

  Returns:
    indices: [Q, min(topk, G)] int32 gallery indices, nearest first, ties by gallery index.
    distances: [Q, min(topk, G)] float32, ascending.
  """
  distances = pairwise_distances(query_emb, gallery_emb)
  gallery_index = jnp.broadcast_to(
      jnp.arange(distances.shape[1], dtype=jnp.int32), distances.shape)
  # The same stable sort as per_query_metrics, so the list shown is the list scored.
  distances, indices = jax.lax.sort(
      (distances, gallery_index), dimension=1, is_stable=True, num_keys=1)
  return indices[:, :topk], distances[:, :topk]


def _padded_chunk_size(num_queries: int, chunk_size: int) -> int:
  """Chunk length: chunk_size, or the next power of two for fewer queries.

  Every chunk has the same length, so one compilation serves the whole query set, and a small
  query set (one category of a constrained evaluation) is not padded to a full chunk.
  """
  return min(chunk_size, 1 << max(num_queries - 1, 0).bit_length())


def evaluate_retrieval(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    query_cams: np.ndarray | None = None,
    gallery_cams: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    chunk_size: int = 1024,
) -> dict[str, float | int]:
  """mAP and Acc@k of every query against the whole gallery.

  Queries without any positive in the gallery (after the same-id-same-camera rule, when
  cameras are given) are skipped from every metric. Acc@k is the fraction of evaluated queries
  with a positive among their first k results (k may exceed G).

  Args:
    query_emb: [Q, D] float.
    gallery_emb: [G, D] float.
    query_ids: [Q] int.
    gallery_ids: [G] int.
    query_cams: [Q] int or None (given together with gallery_cams).
    gallery_cams: [G] int or None.
    ks: the k of each Acc@k.
    chunk_size: queries per jitted call; memory grows as chunk_size x G.

  Returns:
    {'mAP': float, 'acc@k': float for k in ks, 'num_queries': evaluated queries,
     'num_skipped': queries without a positive}. Metrics are NaN when no query is evaluated.
  """
  if (query_cams is None) != (gallery_cams is None):
    raise ValueError('query_cams and gallery_cams must be given together.')
  num_queries = len(query_ids)
  if num_queries == 0:
    raise ValueError('evaluate_retrieval needs at least one query.')
  chunk = _padded_chunk_size(num_queries, chunk_size)
  padding = -num_queries % chunk

  def pad(array):
    return np.pad(np.asarray(array), [(0, padding)] + [(0, 0)] * (np.ndim(array) - 1))

  query_emb, query_ids = pad(query_emb), pad(query_ids)
  query_cams = None if query_cams is None else pad(query_cams)
  # Moved to the device once, not once per chunk.
  gallery_emb, gallery_ids = jnp.asarray(gallery_emb), jnp.asarray(gallery_ids)
  gallery_cams = None if gallery_cams is None else jnp.asarray(gallery_cams)

  chunks = []
  for start in range(0, num_queries + padding, chunk):
    rows = slice(start, start + chunk)
    chunk_cams = None if query_cams is None else query_cams[rows]
    chunks.append(per_query_metrics(
        query_emb[rows], gallery_emb, query_ids[rows], gallery_ids, chunk_cams, gallery_cams))
  # Padded rows are cut off here, so they need no mask inside the jitted function.
  ap, first_rank, valid = (
      np.concatenate([np.asarray(c[i]) for c in chunks])[:num_queries] for i in range(3)
  )

  num_evaluated = int(valid.sum())
  metrics = {'mAP': float(ap[valid].mean(dtype=np.float64)) if num_evaluated else float('nan')}
  for k in ks:
    metrics[f'acc@{k}'] = float((first_rank[valid] < k).mean()) if num_evaluated else float('nan')
  metrics['num_queries'] = num_evaluated
  metrics['num_skipped'] = num_queries - num_evaluated
  return metrics
