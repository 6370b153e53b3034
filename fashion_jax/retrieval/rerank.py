"""k-reciprocal re-ranking (Zhong et al., CVPR 2017; docs/method.md section 6) on neighbour lists.

Only top-k lists and padded sparse rows are built, never an N x N matrix; every stage is jitted
array code over rows dealt out to the devices (memory: k_reciprocal_rerank).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.retrieval import host_memory, knn, search
from fashion_jax.retrieval.search import Reranked

# Rows of the sparse stages are padded to a multiple of this (times the devices); each stage
# handles them in chunks of a power of two up to it.
_ROW_UNIT = 256


def _chunk(bytes_per_row: int, budget: int) -> int:
  """The largest power-of-two chunk up to _ROW_UNIT rows whose temporaries take ~budget bytes."""
  return 1 << int(np.clip(np.log2(budget / max(bytes_per_row, 1)), 0, np.log2(_ROW_UNIT)))


# Sums of V entries run in fixed point, 2^30 units per 1: integer sums do not depend on the order
# of the additions (results are the same on any number of devices, and with a GPU's unordered
# scatter-adds), and they are more accurate than float32 ones: every row of V sums to 1, so each
# sum lies in [0, 1] and each term is off by at most 2^-31.
_ONE = 1 << 30


def _fixed(x):
  return jnp.round(x * np.float32(_ONE)).astype(jnp.int32)


def _unfixed(x):
  return x.astype(jnp.float32) * np.float32(1.0 / _ONE)


def _reciprocal(rows, neighbours, k):
  """R(i, k) of the rows: [n, k+1] int32, their top-(k+1) lists with non-reciprocal slots -1.

  neighbours: [Nr, K] int32 lists of every point (rows past N all -1).
  """
  forward = neighbours[rows, :k + 1]
  back = neighbours[jnp.maximum(forward, 0), :k + 1]
  mutual = jnp.any(back == rows[:, None, None], axis=2) & (forward >= 0)
  return jnp.where(mutual, forward, -1)


def _compact(entries, width):
  """Valid (>= 0) entries of each row moved to its front, in order: [n, width], -1 padded."""
  valid = entries >= 0
  slot = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, width)
  rows = jnp.broadcast_to(jnp.arange(entries.shape[0])[:, None], entries.shape)
  out = jnp.full((entries.shape[0], width), -1, entries.dtype)
  return out.at[rows, slot].set(entries, mode='drop'), jnp.sum(valid, axis=1)


def _expanded_sets(rows, neighbours, half, k1):
  """R*(i): R(i, k1) plus every R(c, round(k1/2)), c in R(i, k1), that lies > 2/3 inside it.

  half: [Nr, H] the R(c, round(k1/2)) of every point. An accepted c's set has fewer than a third
  of its H members outside R(i, k1), so at most K x (ceil(H/3) - 1) points are added (K = k1+1):
  the duplicates among them are found pairwise, no sort. Returns [n, K + that] distinct point
  indices per row, -1 padded, and their counts.
  """
  own = _reciprocal(rows, neighbours, k1)
  n, slots = own.shape
  members = jnp.where(own[:, :, None] >= 0, half[jnp.maximum(own, 0)], -1)
  in_own = jnp.any(members[..., None] == own[:, None, None, :], axis=3) & (members >= 0)
  size = jnp.sum(members >= 0, axis=2)
  # inside > 2/3 size in integers: the reference's float comparison gives the same answers.
  accepted = (own >= 0) & (3 * jnp.sum(in_own, axis=2) > 2 * size)
  outside = jnp.where(accepted[:, :, None] & ~in_own, members, -1).reshape(n, -1)
  limit = max(slots * (-(-half.shape[1] // 3) - 1), 1)
  added, _ = _compact(outside, limit)
  earlier = jnp.tril(jnp.ones((limit, limit), bool), -1)
  repeated = jnp.any((added[:, :, None] == added[:, None, :]) & earlier, axis=2)
  return _compact(jnp.concatenate([own, jnp.where(repeated, -1, added)], axis=1),
                  slots + limit)


def _weights(rows, index, points, row_max):
  """V rows: exp(-d(i, j) / M_i) over R*(i) (index: [n, W], -1 padded), normalised to sum 1."""
  rows_clipped = jnp.minimum(rows, row_max.shape[0] - 1)
  d = search.gathered_squared_distances(points[rows_clipped], points, index)
  w = jnp.where(index >= 0, jnp.exp(-d / row_max[rows_clipped][:, None]), 0.0)
  return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def _expanded_query(rows, neighbours, index, values, k2):
  """V[i] <- mean of V[n] over the top-k2 neighbours n of i (i itself first), on sparse rows.

  The k2 rows' entries are sorted by (column, position), one int32 key each, and equal
  columns summed in fixed point (_fixed). Returns [n, k2 x W] columns (ascending, -1
  padded), values, and the counts.
  """
  near = neighbours[rows, :k2]
  columns = jnp.where(near[:, :, None] >= 0, index[jnp.maximum(near, 0)], -1)
  n = columns.shape[0]
  columns = columns.reshape(n, -1)
  weights = values[jnp.maximum(near, 0)].reshape(n, -1)
  width = columns.shape[1]
  bits = max(width - 1, 1).bit_length()
  last = jnp.iinfo(jnp.int32).max
  position = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), columns.shape)
  if index.shape[0] << bits < 1 << 31:
    # XLA's CPU sort of one key array is ~5x faster than of a key and a payload.
    key = jnp.sort(jnp.where(columns >= 0, columns * (1 << bits) + position, last), axis=1)
    valid = key != last
    sorted_columns, order = jnp.where(valid, key >> bits, -1), key & ((1 << bits) - 1)
  else:
    sorted_columns, order = jax.lax.sort((jnp.where(columns >= 0, columns, last), position),
                                         dimension=1, num_keys=2)
    valid = sorted_columns != last
    sorted_columns = jnp.where(valid, sorted_columns, -1)
  sorted_weights = jnp.take_along_axis(weights, order, axis=1)
  first = valid & jnp.concatenate([jnp.ones((n, 1), bool),
                                   sorted_columns[:, 1:] != sorted_columns[:, :-1]], axis=1)
  run = jnp.where(valid, jnp.cumsum(first, axis=1) - 1, width)
  line = jnp.broadcast_to(jnp.arange(n)[:, None], run.shape)
  sums = jnp.zeros((n, width), jnp.int32).at[line, run].add(
      _fixed(sorted_weights / k2), mode='drop')
  out = jnp.full((n, width), -1, jnp.int32).at[line, jnp.where(first, run, width)].set(
      sorted_columns, mode='drop')
  return out, jnp.where(out >= 0, _unfixed(sums), 0.0), jnp.sum(first, axis=1)


@functools.partial(jax.jit, static_argnames=('num_columns',))
def _inverted_index(index, values, num_columns):
  """Gallery rows by support column: where each column's entries start, their rows and values.

  index, values: [G, W] the gallery's sparse rows, columns below num_columns (N). Returns
  col_start [N + 1] int32 (entries of column c at col_start[c] .. col_start[c + 1] - 1), rows
  [G x W] int32 (gallery-relative) and values [G x W].
  """
  columns = index.ravel()
  valid = columns >= 0
  _, entry = jax.lax.sort((jnp.where(valid, columns, num_columns),
                           jnp.arange(columns.shape[0], dtype=jnp.int32)), num_keys=1,
                          is_stable=True)
  counts = jax.ops.segment_sum(valid.astype(jnp.int32), jnp.where(valid, columns, num_columns),
                               num_columns + 1)
  col_start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts)])[:num_columns + 1]
  return col_start, entry // index.shape[1], values.ravel()[entry]


def _pair_counts(columns, col_start):
  """Per query row (columns: [n, W]): the (query entry, gallery entry) pairs sharing a column."""
  safe = jnp.maximum(columns, 0)
  return jnp.sum(jnp.where(columns >= 0, col_start[safe + 1] - col_start[safe], 0), axis=1)


def _jaccard_rows(columns, weights, col_start, gallery_rows, gallery_values, *, pairs,
                  gallery_size):
  """Jaccard distances of query rows to the gallery rows sharing support with them.

  sum_k min(V[i,k], V[j,k]) is gathered through the inverted index: pair p of a row belongs to
  the query entry whose pairs start at or before p (a running maximum of marks), and is
  summed into a dense [n, G] block by gallery row.

  columns, weights: [n, W] the query rows. Returns [n, G] gallery indices (those with a
  shared column first, ascending, -1 padded), their distances 1 - m / (2 - m) (m the sum of
  minima), and the counts.
  """
  n, width = columns.shape
  safe = jnp.maximum(columns, 0)
  count = jnp.where(columns >= 0, col_start[safe + 1] - col_start[safe], 0)
  start = jnp.cumsum(count, axis=1) - count
  line = jnp.arange(n)[:, None]
  marks = jnp.zeros((n, pairs), jnp.int32).at[
      line, jnp.where(count > 0, start, pairs)].max(jnp.arange(width, dtype=jnp.int32),
                                                   mode='drop')
  entry = jax.lax.cummax(marks, axis=1)
  position = jnp.arange(pairs, dtype=jnp.int32)
  at = col_start[jnp.take_along_axis(safe, entry, axis=1)] + position - jnp.take_along_axis(
      start, entry, axis=1)
  at = jnp.clip(at, 0, gallery_rows.shape[0] - 1)
  real = position < jnp.sum(count, axis=1, keepdims=True)
  minima = jnp.minimum(jnp.take_along_axis(weights, entry, axis=1), gallery_values[at])
  sums = jnp.zeros((n, gallery_size), jnp.int32).at[
      line, jnp.where(real, gallery_rows[at], gallery_size)].add(_fixed(minima), mode='drop')
  # Where the rows share a column the sum is positive: every V entry is at least e^-1 / (k2 W),
  # W the widest row, far above the fixed point's 2^-31.
  shared = sums > 0
  slot = jnp.where(shared, jnp.cumsum(shared, axis=1) - 1, gallery_size)
  found = jnp.full((n, gallery_size), -1, jnp.int32).at[line, slot].set(
      jnp.arange(gallery_size, dtype=jnp.int32), mode='drop')
  # 1 - m / (2 - m) = 2 (1 - m) / (2 - m), with 1 - m exact in fixed point.
  rest = (_ONE - jnp.zeros((n, gallery_size), jnp.int32).at[line, slot].set(
      sums, mode='drop')).astype(jnp.float32)
  jaccard = jnp.where(found >= 0, 2.0 * rest / (rest + np.float32(_ONE)), 1.0)
  return found, jaccard, jnp.sum(shared, axis=1)


def _width(counts, limit: int) -> int:
  """The widest row's count rounded up to a multiple of 8 (at most `limit`), so that the next
  stages' programs serve similar data again (a later evaluation) uncompiled."""
  return min(-(-max(int(np.max(counts, initial=0)), 1) // 8) * 8, limit)


def _trimmed(arrays, counts):
  """[R, W] arrays cut, where they lie, to _width of their rows' counts."""
  width = _width(np.asarray(counts), arrays[0].shape[1])
  return [a[:, :width] for a in arrays]


def k_reciprocal_rerank(query_emb, gallery_emb, k1: int = 20, k2: int = 6, lam: float = 0.3, *,
                        chunk_size: int | None = None, gallery_chunk_size: int = 1024,
                        knn_precision: str | None = None, result_on_device: bool | None = None,
                        progress=None, devices=None) -> Reranked:
  """Re-ranked query-gallery distances, as docs/method.md section 6's dense algorithm gives them.

  Distances among all N = Q + G points are squared Euclidean, each row divided by its maximum
  over all N points (the common implementation divides columns, then transposes), and
  final = (1 - lam) * Jaccard + lam * that distance. Neighbour lists are ordered by distance,
  ties by index. Device memory O(N x (D + k1^2 + k2 W)) plus per-chunk blocks, host memory
  the embeddings plus O(N x k1) and, unless it stays on the devices (result_on_device), the
  result, O(Q x J): W is the widest expanded row, J the most gallery items sharing a neighbour
  with one query (a few thousand at N = 10,000 on random data).

  Args:
    query_emb: [Q, D] float.
    gallery_emb: [G, D] of the same dtype.
    k1, k2, lam: the method's parameters (k1 >= 1, k2 >= 1, 0 <= lam <= 1).
    chunk_size: block side of the all-pairs kNN search (knn.all_pairs_top_k); None: 1,024 on
      CPU (2,048 was no faster there and holds 4x the temporaries), 4,096 on accelerators.
    gallery_chunk_size: accepted for compatibility; the kNN blocks are square.
    knn_precision: the kNN products' inputs, 'float32' or 'bfloat16' (re-scored in float32,
      same results); None: float32 on CPU, bfloat16 on accelerators.
    result_on_device: leave the Jaccard rows (`jaccard_index`, `jaccard`) on the devices as
      jax Arrays, where the metrics and top-k read them, instead of bringing them to the host;
      None: on accelerators, whose memory then holds them instead of the host's (each device
      the whole [Q, J] rows, and twice that while they are joined).
    progress: optional callable(stage, num_done, total).
    devices: the devices every stage runs on (default: all local devices).

  Returns:
    Reranked, to pass as `rerank=` to the metrics and top-k functions with the same arrays.
  """
  query_emb, gallery_emb = np.asarray(query_emb), np.asarray(gallery_emb)
  if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
    raise ValueError(f'embeddings must be [Q, D] and [G, D], got {query_emb.shape} and '
                     f'{gallery_emb.shape}')
  if not len(query_emb) or not len(gallery_emb):
    raise ValueError(f're-ranking needs at least one query and one gallery item, got '
                     f'Q={len(query_emb)}, G={len(gallery_emb)}')
  if k1 < 1 or k2 < 1 or not 0.0 <= lam <= 1.0:
    raise ValueError(f'need k1 >= 1, k2 >= 1 and 0 <= lam <= 1, got {k1}, {k2}, {lam}')
  search.check_finite(query_emb, 'query')
  search.check_finite(gallery_emb, 'gallery')
  report = progress or (lambda *args: None)
  num_queries, num_points = len(query_emb), len(query_emb) + len(gallery_emb)
  mesh = search.gallery_mesh(devices)
  cpu = mesh.devices.flat[0].platform == 'cpu'
  block = search.chunk_length(num_points, chunk_size or (1024 if cpu else 4096))
  points = knn.placed_points([query_emb, gallery_emb], mesh, block)
  k = min(k1 + 1, num_points)
  neighbours, _, row_max = knn.all_pairs_top_k(
      points, num_points, k, block=block, mesh=mesh,
      precision=knn_precision or ('float32' if cpu else 'bfloat16'), progress=progress)
  if k < k2:
    raise ValueError(f'k2={k2} exceeds the {k} neighbours each point has (k1 = {k1}, '
                     f'N = {num_points} points)')
  row_max = np.maximum(row_max, np.finfo(np.float32).tiny)
  # After each stage its temporaries go back to the OS, so that the next stage's do not come
  # on top of them (host_memory).
  host_memory.release()

  # Working memory per device and chunk of rows: small on CPU, where it is the host's.
  budget = 1 << 24 if cpu else 1 << 28
  unit = _ROW_UNIT * mesh.devices.size
  rows = np.arange(-(-num_points // unit) * unit, dtype=np.int32)
  # Padding rows have empty lists, so every stage leaves them empty.
  table = search.pad_rows(neighbours.astype(np.int32), unit, -1)
  # A k1 of N or more takes every point, as the reference's slices [:k1 + 1] do: the sets are
  # sized by the neighbours there are (k - 1), not by k1.
  half = knn.map_rows(_reciprocal, mesh, _ROW_UNIT, (rows,), (table,),
                      k=min(int(np.around(k1 / 2.0)), k - 1))
  expanded, counts = knn.map_rows(_expanded_sets, mesh, _chunk(k * k * 64, budget), (rows,),
                                  (table, half), k1=k - 1)
  (expanded,) = _trimmed([expanded], counts)
  del half
  host_memory.release()
  report('expansion', num_points, num_points)

  width = expanded.shape[1]
  values = knn.map_rows(_weights, mesh, _chunk(width * points.shape[1] * 8, budget),
                        (rows, expanded),
                        (points, search.pad_rows(row_max, unit, 1.0)))
  del points
  index = expanded
  if k2 > 1:
    index, values, counts = knn.map_rows(_expanded_query, mesh, _chunk(k2 * width * 32, budget),
                                         (rows,), (table, expanded, values), k2=k2)
    index, values = _trimmed([index, values], counts)
  host_memory.release()
  report('query expansion', num_points, num_points)

  on_device = not cpu if result_on_device is None else result_on_device
  jaccard_index, jaccard = _jaccard(index, values, num_queries, num_points, mesh, budget,
                                    on_device)
  del index, values
  host_memory.release()
  report('jaccard', num_queries, num_queries)
  return Reranked(scale=(lam / row_max[:num_queries]).astype(np.float32),
                  jaccard_index=jaccard_index, jaccard=jaccard, lam=float(lam))


def _jaccard(index, values, num_queries, num_points, mesh, budget, on_device):
  """The query rows' Jaccard distances to the gallery: [Q, J] indices (-1 padded) and values,
  host arrays or, with on_device, arrays on the devices."""
  gallery_size = num_points - num_queries
  col_start, gallery_rows, gallery_values = _inverted_index(
      index[num_queries:num_points], values[num_queries:num_points], num_columns=num_points)
  unit = _ROW_UNIT * mesh.devices.size
  columns = search.pad_rows(index[:num_queries], unit, -1)
  weights = search.pad_rows(values[:num_queries], unit, 0.0)
  totals = np.asarray(knn.map_rows(_pair_counts, mesh, _ROW_UNIT, (columns,), (col_start,)))
  # One pair budget for all rows, rounded so that similar data reuses the compiled program.
  pairs = max(-(-int(totals.max(initial=0)) // 1024) * 1024, 1024)
  chunk = _chunk(pairs * 28 + gallery_size * 16, budget)
  # Rows per call: their [rows, G] results stay within ~4 budgets before they are trimmed.
  call = max(_chunk(gallery_size * 8, 4 * budget), chunk) * mesh.devices.size
  # Each call's rows are written into the result, which widens when a later call needs more
  # room: the pieces are never held all at once beside it.
  index_out = jaccard = None
  pieces = []
  for start in range(0, num_queries, call):
    found, distances, counts = knn.map_rows(
        _jaccard_rows, mesh, chunk, (columns[start:start + call], weights[start:start + call]),
        (col_start, gallery_rows, gallery_values), pairs=pairs, gallery_size=gallery_size)
    rows = min(call, num_queries - start)
    width = _width(np.asarray(counts)[:rows], gallery_size)
    if on_device:
      pieces.append((found[:rows, :width], distances[:rows, :width]))
      continue
    # One slice on the device: only the trimmed rows travel (and are copied) to the host.
    found, distances = np.asarray(found[:rows, :width]), np.asarray(distances[:rows, :width])
    if index_out is None or width > index_out.shape[1]:
      index_out = _widened(index_out, num_queries, width, -1, np.int32)
      jaccard = _widened(jaccard, num_queries, width, 1.0, np.float32)
    index_out[start:start + rows, :width] = found
    jaccard[start:start + rows, :width] = distances
    del found, distances
    host_memory.release()
  if on_device:
    return _joined(pieces, max(p[0].shape[1] for p in pieces))
  return index_out, jaccard


@functools.partial(jax.jit, static_argnames=('width',))
def _joined(pieces, width):
  """The calls' [rows, w] (index, distance) pieces widened to `width` (-1 and 1 added) and
  stacked on the devices."""
  widen = lambda x, fill: jnp.pad(x, [(0, 0), (0, width - x.shape[1])], constant_values=fill)
  return (jnp.concatenate([widen(index, -1) for index, _ in pieces]),
          jnp.concatenate([widen(jaccard, 1.0) for _, jaccard in pieces]))


def _widened(array, rows, width, fill, dtype):
  """A [rows, width] array filled with `fill`, holding `array` (narrower, or None) on the left."""
  out = np.full((rows, width), fill, dtype)
  if array is not None:
    out[:, :array.shape[1]] = array
  return out

