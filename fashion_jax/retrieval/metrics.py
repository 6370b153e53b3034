"""Retrieval evaluation (docs/method.md section 5): exact mAP and Acc@k (CMC), no gallery sort.

The rank of every positive is counted per query chunk: memory O((Q + G) x D + Q x P + chunk x G).
"""

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fashion_jax.retrieval import host_memory, search
from fashion_jax.retrieval.search import Reranked


def _codes(query_values, gallery_values, size_q: int, size_g: int):
  """Dense int32 codes of labels of any dtype (equal labels, equal codes); zeros when None."""
  if query_values is None:
    return np.zeros(size_q, np.int32), np.zeros(size_g, np.int32)
  query_values, gallery_values = np.asarray(query_values), np.asarray(gallery_values)
  _, codes = np.unique(np.concatenate([query_values, gallery_values]), return_inverse=True)
  return codes[:size_q].astype(np.int32), codes[size_q:].astype(np.int32)


def positive_lists(query_ids, gallery_ids, query_cams=None, gallery_cams=None,
                   query_groups=None, gallery_groups=None) -> np.ndarray:
  """Gallery indices of every query's positives: [Q, P] int32, ascending, -1 padded (P >= 1).

  A positive has the query's id and group, and not both its id and its camera (those are
  dropped from the ranking altogether, the ReID rule). All arguments are [Q] or [G] arrays.
  """
  order = np.argsort(gallery_ids, kind='stable')
  sorted_ids = np.asarray(gallery_ids)[order]
  low = np.searchsorted(sorted_ids, query_ids, side='left')
  high = np.searchsorted(sorted_ids, query_ids, side='right')
  width = max(int((high - low).max(initial=0)), 1)
  slot = low[:, None] + np.arange(width)[None, :]
  index = np.where(slot < high[:, None], order[np.minimum(slot, len(order) - 1)], -1)
  keep = index >= 0
  if query_groups is not None:
    keep &= gallery_groups[index] == query_groups[:, None]
  if query_cams is not None:
    keep &= gallery_cams[index] != query_cams[:, None]
  index = np.where(keep, index, np.iinfo(np.int32).max)
  index = np.sort(index, axis=1)
  width = max(int(keep.sum(axis=1).max(initial=0)), 1)
  index = index[:, :width]
  return np.where(index == np.iinfo(np.int32).max, -1, index).astype(np.int32)


GALLERY_AXIS = search.GALLERY_AXIS


@functools.partial(jax.jit, static_argnames=('gallery_chunk', 'mesh'))
def _chunk_metrics(queries, query_ids, query_groups, positives, gallery, gallery_ids,
                   gallery_groups, gallery_size, rerank, gallery_chunk, mesh):
  """AP, first-positive rank, validity and INP of one query chunk (see per_query_metrics)."""
  is_positive = positives >= 0

  def shard(queries, query_ids, query_groups, gallery, gallery_ids, gallery_groups,
            gallery_size, rerank):
    """This device's gallery shard: its positives' distances and counts, summed over devices."""
    shard_size = gallery.shape[0]
    offset = jax.lax.axis_index(GALLERY_AXIS) * shard_size
    starts = offset + jnp.arange(0, shard_size, gallery_chunk, dtype=jnp.int32)

    def distances(_, start):
      block = jax.lax.dynamic_slice_in_dim(gallery, start - offset, gallery_chunk)
      return None, search.block_distances(queries, block, start, rerank)

    # The chunk's distances to the shard are stored once ([blocks, Qc, block], chunk x G / devices
    # floats) and both the positives' distances and the counts are read from that one array, so
    # a tie is a tie in both: the same distance computed twice may round differently (fused
    # multiply-adds, another dot-product shape).
    _, strip = jax.lax.scan(distances, None, starts)
    local = positives - offset
    owned = is_positive & (local >= 0) & (local < shard_size)
    safe = jnp.clip(local, 0, shard_size - 1)
    found = strip[safe // gallery_chunk, jnp.arange(positives.shape[0])[:, None],
                  safe % gallery_chunk]
    # One device owns each positive and the others add exact zeros.
    positive_d = jax.lax.psum(jnp.where(owned, found, 0.0), GALLERY_AXIS)
    # An item ranks before a positive if it is closer, or equally close with a smaller index:
    # d < the next float above the positive's distance for smaller indices. CPUs flush
    # denormals to zero, so above 0 the next float that compares as larger is `tiny`.
    above = jnp.where(positive_d == 0, jnp.finfo(jnp.float32).tiny,
                      jnp.nextafter(positive_d, jnp.inf))

    def count(negatives_before, block):
      start, d = block
      index = start + jnp.arange(gallery_chunk, dtype=jnp.int32)
      block_ids = jax.lax.dynamic_slice_in_dim(gallery_ids, start - offset, gallery_chunk)
      block_groups = jax.lax.dynamic_slice_in_dim(gallery_groups, start - offset, gallery_chunk)
      # Items with the query's id are either positives (counted below) or dropped by the
      # camera rule; other groups are outside a category-constrained ranking.
      negative = ((block_ids[None] != query_ids[:, None])
                  & (block_groups[None] == query_groups[:, None]) & (index < gallery_size)[None])
      d = jnp.where(negative, d, jnp.inf)[:, None, :]
      threshold = jnp.where(index[None, None, :] < positives[:, :, None], above[:, :, None],
                            positive_d[:, :, None])
      # A float sum vectorises better than an int one on CPU; exact below 2^24 per block.
      in_block = jnp.sum((d < threshold).astype(jnp.float32), axis=2)
      return negatives_before + in_block.astype(jnp.int32), None

    # The counts differ between shards until summed: the carry is marked as varying.
    zeros = jax.lax.pcast(jnp.zeros(positives.shape, jnp.int32), (GALLERY_AXIS,), to='varying')
    negatives_before, _ = jax.lax.scan(count, zeros, (starts, strip))
    return positive_d, jax.lax.psum(negatives_before, GALLERY_AXIS)

  replicated, sharded = P(), P(GALLERY_AXIS)
  positive_d, negatives_before = jax.shard_map(
      shard, mesh=mesh, out_specs=(replicated, replicated),
      in_specs=(replicated,) * 3 + (sharded,) * 3 + (replicated,) * 2)(
          queries, query_ids, query_groups, gallery, gallery_ids, gallery_groups, gallery_size,
          rerank)
  pd, pi = positive_d[:, :, None], positives[:, :, None]
  earlier = (positive_d[:, None, :] < pd) | ((positive_d[:, None, :] == pd)
                                             & (positives[:, None, :] < pi))
  positives_before = jnp.sum(earlier & is_positive[:, None, :], axis=2)
  rank = negatives_before + positives_before
  precision = (positives_before + 1) / (rank + 1).astype(jnp.float32)
  num_positives = jnp.sum(is_positive, axis=1)
  valid = num_positives > 0
  ap = jnp.sum(jnp.where(is_positive, precision, 0.0), axis=1) / jnp.maximum(num_positives, 1)
  first_rank = jnp.min(jnp.where(is_positive, rank, gallery_size), axis=1).astype(jnp.int32)
  # INP: the positives over the rank (1-based) of the hardest one, the last to come.
  last_rank = jnp.max(jnp.where(is_positive, rank, -1), axis=1)
  inp = jnp.where(valid, num_positives / (last_rank + 1).astype(jnp.float32), 0.0)
  return ap, first_rank, valid, inp


class QueryMetrics(NamedTuple):
  """Per-query results of a ranking, [Q] each."""
  ap: np.ndarray          # float32 average precision (0 when invalid)
  first_rank: np.ndarray  # int32 0-based rank of the first positive (G when invalid)
  valid: np.ndarray       # bool: the query has at least one positive left in its ranking
  inp: np.ndarray         # float32 inverse negative penalty, |positives| / (1 + last rank)


def per_query_metrics(query_emb, gallery_emb, query_ids, gallery_ids, query_cams=None,
                      gallery_cams=None, *, query_groups=None, gallery_groups=None,
                      rerank: Reranked | None = None, chunk_size: int | None = None,
                      gallery_chunk_size: int = 2048,
                      progress=None, devices=None) -> QueryMetrics:
  """Average precision, first-positive rank and inverse negative penalty of every query.

  The gallery is ranked by distance ascending, ties by gallery index, exactly as a stable
  argsort of each row would rank it; no row is sorted: for every positive the gallery items
  ranked before it are counted. Gallery items sharing the query's id and camera are dropped
  from its ranking; with groups (categories) given, only the query's group is ranked.

  Args:
    query_emb: [Q, D] float (float32, bfloat16 or float16).
    gallery_emb: [G, D] of the same dtype, on the host or the devices.
    query_ids, gallery_ids: [Q], [G] labels of any dtype.
    query_cams, gallery_cams: [Q], [G] or None (given together).
    query_groups, gallery_groups: [Q], [G] or None (given together).
    rerank: rank by these re-ranked distances instead of the Euclidean ones.
    chunk_size: queries per jitted call; working memory holds chunk_size x G / devices
      distances. None: the most, up to 1,024, that keep them within 16 MB per CPU device (at
      least 256) or 2 GB per accelerator (bench/retrieval_bench.py measures the choice).
    gallery_chunk_size: gallery items per block of the counting loop (its temporaries are
      chunk x block x P, P the largest number of positives of a query).
    progress: optional callable(stage, num_done, total) called after each query chunk.
    devices: the devices to shard the gallery over (default: all local devices).

  Returns:
    QueryMetrics: ap, first_rank, valid and inp (mINP's per-query term, Ye et al. 2020: the
    number of positives divided by the 1-based rank of the last of them; 0 when invalid).
  """
  # A gallery already on the devices stays there (search.shard_gallery pads it there).
  query_emb = np.asarray(query_emb)
  gallery_emb = gallery_emb if isinstance(gallery_emb, jax.Array) else np.asarray(gallery_emb)
  num_queries, gallery_size = len(query_emb), len(gallery_emb)
  if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
    raise ValueError(f'embeddings must be [Q, D] and [G, D], got {query_emb.shape} and '
                     f'{gallery_emb.shape}')
  if num_queries == 0 or gallery_size == 0:
    raise ValueError(f'need at least one query and one gallery item, got Q={num_queries}, '
                     f'G={gallery_size}')
  for name, q, g in (('ids', query_ids, gallery_ids), ('cams', query_cams, gallery_cams),
                     ('groups', query_groups, gallery_groups)):
    if (q is None) != (g is None):
      raise ValueError(f'query_{name} and gallery_{name} must be given together.')
    if q is not None and (np.shape(q) != (num_queries,) or np.shape(g) != (gallery_size,)):
      raise ValueError(f'query_{name} {np.shape(q)} and gallery_{name} {np.shape(g)} must be '
                       f'[Q={num_queries}] and [G={gallery_size}]')
  search.check_finite(query_emb, 'query')
  search.check_finite(gallery_emb, 'gallery')
  if rerank is not None and rerank.scale.shape != (num_queries,):
    raise ValueError(f'rerank holds {rerank.scale.shape[0]} queries, not {num_queries}')
  query_ids, gallery_ids = _codes(query_ids, gallery_ids, num_queries, gallery_size)
  if query_cams is not None:
    query_cams, gallery_cams = _codes(query_cams, gallery_cams, num_queries, gallery_size)
  query_groups, gallery_groups = _codes(query_groups, gallery_groups, num_queries, gallery_size)
  positives = positive_lists(query_ids, gallery_ids, query_cams, gallery_cams, query_groups,
                             gallery_groups)

  # Freed blocks of earlier work (re-ranking's stages) go back to the OS before these chunks
  # allocate theirs, and these chunks' afterwards (host_memory).
  host_memory.release()
  mesh = search.gallery_mesh(devices)
  if chunk_size is None:
    per_device = -(-gallery_size // mesh.devices.size)
    cpu = mesh.devices.flat[0].platform == 'cpu'
    # Distances held per device: 2^22 (16 MB) on CPU, where they are the host's memory, with
    # at least 256 queries per chunk (fewer re-read the gallery too often); 2^29 on accelerators.
    budget = 1 << (22 if cpu else 29)
    chunk_size = 1 << int(np.clip((budget // per_device).bit_length() - 1, 8 if cpu else 0, 10))
  q_chunk = search.chunk_length(num_queries, chunk_size)
  # The gallery is split evenly over all devices, each shard a whole number of blocks, and moved
  # to the devices once, not once per chunk.
  g_chunk, (gallery, gallery_ids, gallery_groups) = search.shard_gallery(
      mesh, gallery_size, gallery_chunk_size, gallery_emb, gallery_ids, gallery_groups)
  queries = search.pad_rows(query_emb, q_chunk)
  query_ids = search.pad_rows(query_ids, q_chunk)
  query_groups = search.pad_rows(query_groups, q_chunk)
  positives = search.pad_rows(positives, q_chunk, -1)
  outputs = []
  for start in range(0, len(queries), q_chunk):
    rows = slice(start, start + q_chunk)
    # Read back per chunk: progress then reports finished work, not queued work.
    outputs.append([np.asarray(a) for a in _chunk_metrics(
        queries[rows], query_ids[rows], query_groups[rows], positives[rows], gallery,
        gallery_ids, gallery_groups, gallery_size,
        search.rerank_chunk(rerank, start, q_chunk, mesh), g_chunk, mesh)])
    if progress is not None:
      progress('metrics', min(start + q_chunk, num_queries), num_queries)
  del gallery, queries
  host_memory.release()
  # Padded rows are cut off here, so they need no mask inside the jitted function.
  return QueryMetrics(*(np.concatenate([o[i] for o in outputs])[:num_queries]
                        for i in range(4)))


def summarize(ap: np.ndarray, first_rank: np.ndarray, valid: np.ndarray,
              ks: Sequence[int], inp: np.ndarray | None = None) -> dict[str, float | int]:
  """{'mAP', 'mINP' (when `inp` is given), 'acc@k' for k in ks, 'num_queries', 'num_skipped'}
  over the valid queries.

  Acc@k is the fraction of evaluated queries with a positive among their first k results;
  metrics are NaN when no query is evaluated.
  """
  num_evaluated = int(valid.sum())
  metrics = {'mAP': float(ap[valid].mean(dtype=np.float64)) if num_evaluated else float('nan')}
  if inp is not None:
    metrics['mINP'] = (float(inp[valid].mean(dtype=np.float64)) if num_evaluated
                       else float('nan'))
  for k in ks:
    metrics[f'acc@{k}'] = float((first_rank[valid] < k).mean()) if num_evaluated else float('nan')
  metrics['num_queries'] = num_evaluated
  metrics['num_skipped'] = len(valid) - num_evaluated
  return metrics


def cmc(first_rank: np.ndarray, valid: np.ndarray, max_rank: int) -> np.ndarray:
  """CMC curve: [max_rank] float64, entry r-1 = Acc@r over the valid queries (NaN if none)."""
  if not valid.any():
    return np.full(max_rank, np.nan)
  counts = np.bincount(np.minimum(first_rank[valid], max_rank), minlength=max_rank + 1)
  return np.cumsum(counts[:max_rank]) / valid.sum()


def evaluate_retrieval(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    query_cams: np.ndarray | None = None,
    gallery_cams: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    chunk_size: int | None = None,
    **options,
) -> dict[str, float | int]:
  """mAP and Acc@k of every query against the gallery (see per_query_metrics).

  Queries without any positive in their ranking are skipped from every metric.
  `options` are per_query_metrics' keyword arguments (groups, rerank, gallery_chunk_size,
  progress, devices).

  Returns:
    {'mAP': float, 'mINP': float, 'acc@k': float for k in ks, 'num_queries': evaluated
     queries, 'num_skipped': queries without a positive}.
  """
  result = per_query_metrics(query_emb, gallery_emb, query_ids, gallery_ids, query_cams,
                             gallery_cams, chunk_size=chunk_size, **options)
  return summarize(result.ap, result.first_rank, result.valid, ks, inp=result.inp)


def per_category(ap: np.ndarray, first_rank: np.ndarray, valid: np.ndarray,
                 query_categories: np.ndarray, ks: Sequence[int],
                 inp: np.ndarray | None = None) -> tuple[dict, dict]:
  """Per-category metrics and their unweighted average over categories (Street2Shop's protocol).

  Use the per-query arrays of a category-constrained ranking (groups = categories).

  Returns:
    table: {category: summarize(...) of its queries}, categories in sorted order.
    average: {'mAP', 'acc@k'} means over the categories with at least one evaluated query,
      plus 'num_categories'.
  """
  query_categories = np.asarray(query_categories)
  table = {}
  for category in np.unique(query_categories):
    rows = query_categories == category
    table[category.item()] = summarize(ap[rows], first_rank[rows], valid[rows], ks,
                                       inp=None if inp is None else inp[rows])
  scored = [m for m in table.values() if m['num_queries'] > 0]
  keys = ['mAP'] + (['mINP'] if inp is not None else []) + [f'acc@{k}' for k in ks]
  average = {key: float(np.mean([m[key] for m in scored])) if scored else float('nan')
             for key in keys}
  average['num_categories'] = len(scored)
  return table, average


def rank_gallery(query_emb, gallery_emb, topk: int, *, rerank: Reranked | None = None,
                 **options) -> tuple[np.ndarray, np.ndarray]:
  """The `topk` first gallery items of each query, in the metrics' order (for ranked lists).

  With `rerank`, the order is the re-ranked one the metrics score. A Reranked covers the queries
  it was computed with (re-ranking depends on all of them); to draw a few of them, pass their
  rows: `rank_gallery(query_emb[rows], gallery_emb, k, rerank=reranked.select(rows))`.
  `options` are search.top_k's keyword arguments (chunk sizes, progress, devices).

  Returns:
    indices: [Q, min(topk, G)] int32 gallery indices, best first, ties by gallery index.
    distances: [Q, min(topk, G)] float32: Euclidean, or the re-ranked distances.
  """
  indices, distances, _ = search.top_k(query_emb, gallery_emb, topk, rerank=rerank, **options)
  return indices, distances if rerank is not None else np.sqrt(distances)
