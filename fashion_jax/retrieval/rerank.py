"""k-reciprocal re-ranking (Zhong et al., CVPR 2017; docs/method.md section 6) on neighbour lists.

Only top-k lists and sparse rows are built, never an N x N matrix (memory: k_reciprocal_rerank).
"""

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.retrieval import search
from fashion_jax.retrieval.search import Reranked

# Rows of the neighbour-list steps handled at once by NumPy: bounds their temporaries to a few
# hundred MB at k1 = 20.
_ROWS = 4096


def _reciprocal(neighbours: np.ndarray, k: int) -> np.ndarray:
  """R(i, k) of every point: [N, k+1] int64, its top-(k+1) list with non-reciprocal slots -1."""
  forward = neighbours[:, :k + 1]
  out = np.empty_like(forward)
  for start in range(0, len(forward), _ROWS):
    rows = forward[start:start + _ROWS]
    me = np.arange(start, start + len(rows))[:, None, None]
    mutual = (forward[rows] == me).any(axis=2)
    out[start:start + _ROWS] = np.where(mutual, rows, -1)
  return out


def _compact(index: np.ndarray) -> np.ndarray:
  """Sorts the valid (>= 0) entries of each row first; trims the padding columns all rows share."""
  order = np.argsort(np.where(index < 0, np.iinfo(index.dtype).max, index), axis=1, kind='stable')
  index = np.take_along_axis(index, order, axis=1)
  return index[:, :max(int((index >= 0).sum(axis=1).max(initial=0)), 1)]


def _expanded_sets(neighbours: np.ndarray, k1: int) -> np.ndarray:
  """R*(i): R(i, k1) plus every R(c, round(k1/2)), c in R(i, k1), that lies > 2/3 inside it.

  Returns [N, W] int64 distinct point indices per row, -1 padded.
  """
  full = _reciprocal(neighbours, k1)
  # np.around, as the reference implementation: halves round to even (k1 = 5 -> 2).
  half = _reciprocal(neighbours, int(np.around(k1 / 2.0)))
  half_size = (half >= 0).sum(axis=1)
  out = []
  for start in range(0, len(full), _ROWS):
    own = full[start:start + _ROWS]
    candidate_sets = np.where((own >= 0)[:, :, None], half[np.maximum(own, 0)], -1)
    inside = ((candidate_sets[:, :, :, None] == own[:, None, None, :])
              & (candidate_sets[:, :, :, None] >= 0)).any(axis=3).sum(axis=2)
    size = np.where(own >= 0, half_size[np.maximum(own, 0)], 0)
    # The same float comparison as the reference, so sizes like 6 (2/3 * 6 = 4.0) agree.
    accepted = (own >= 0) & (inside > 2.0 / 3.0 * size)
    added = np.where(accepted[:, :, None], candidate_sets, -1).reshape(len(own), -1)
    union = np.sort(np.concatenate([own, added], axis=1), axis=1)
    repeated = np.zeros_like(union, dtype=bool)
    repeated[:, 1:] = union[:, 1:] == union[:, :-1]
    out.append(np.where(repeated, -1, union))
  return _compact(np.concatenate(out))


@jax.jit
def _weights(everything, index, row_max, start):
  """V rows start .. start + n - 1: exp(-d(i, j) / M_i) normalised over the row's valid entries.

  everything: [N, D] all points; index: [n, W] R*(i) (-1 padded); row_max: [n]. Rows past N
  (padding of the last chunk) give meaningless values. Returns [n, W] float32.
  """
  rows = jnp.minimum(start + jnp.arange(index.shape[0]), everything.shape[0] - 1)
  d = search.gathered_squared_distances(everything[rows], everything, index) / row_max[:, None]
  w = jnp.where(index >= 0, jnp.exp(-d), 0.0)
  return w / jnp.sum(w, axis=1, keepdims=True)


def _query_expansion(index: np.ndarray, values: np.ndarray, neighbours: np.ndarray,
                     k2: int) -> tuple[np.ndarray, np.ndarray]:
  """V[i] <- mean of V[n] over the top-k2 neighbours n of i (i itself first), on sparse rows.

  Each row's k2 neighbour rows are stacked and sorted by column; a stable sort keeps equal
  columns in neighbour order, so each run sums in the order of the dense mean. Work and memory
  O(N x k2 x W), W the widest sparse row.

  Returns:
    index: [N, W'] int64 columns, ascending, -1 padded; values: [N, W'] float32.
  """
  parts_index, parts_values = [], []
  for start in range(0, len(index), _ROWS):
    near = neighbours[start:start + _ROWS, :k2]
    columns = index[near].reshape(len(near), -1)
    order = np.argsort(np.where(columns < 0, len(index), columns), axis=1, kind='stable')
    columns = np.take_along_axis(columns, order, axis=1)
    weights = np.take_along_axis(values[near].reshape(len(near), -1), order, axis=1)
    valid = columns >= 0
    first = valid.copy()
    first[:, 1:] &= columns[:, 1:] != columns[:, :-1]
    # Run number of every entry; padding (at the end of its row) adds zeros to the last run.
    run = np.maximum(np.cumsum(first.ravel()) - 1, 0)
    sums = np.bincount(run, weights=np.where(valid, weights / k2, 0.0).ravel(),
                       minlength=int(first.sum()))
    counts = first.sum(axis=1)
    rows = np.repeat(np.arange(len(near)), counts)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    part_index = np.full((len(near), max(int(counts.max(initial=0)), 1)), -1, np.int64)
    part_values = np.zeros(part_index.shape, np.float32)
    part_index[rows, slot] = columns[first]
    part_values[rows, slot] = sums[:len(rows)]
    parts_index.append(part_index)
    parts_values.append(part_values)
  return _stack(parts_index, -1), _stack(parts_values, 0.0)


def _nonzero_rows(present: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Dense [R, C] rows to sparse padded rows: column index [R, W] (-1 padded, ascending), values."""
  flat = np.flatnonzero(present)
  counts = np.count_nonzero(present, axis=1)
  width = max(int(counts.max(initial=0)), 1)
  # Entry n of row r goes to slot n - (entries before row r) of that row.
  target = np.arange(len(flat)) + np.repeat(np.arange(len(present)) * width
                                            - (np.cumsum(counts) - counts), counts)
  index = np.full(len(present) * width, -1, np.int64)
  out = np.zeros(len(present) * width, np.float32)
  index[target] = flat - np.repeat(np.arange(len(present)) * present.shape[1], counts)
  out[target] = values.ravel()[flat]
  return index.reshape(-1, width), out.reshape(-1, width)


def _stack(parts: list[np.ndarray], fill) -> np.ndarray:
  """Row blocks of different widths, padded with `fill` to the widest and stacked."""
  width = max(p.shape[1] for p in parts)
  return np.concatenate([np.pad(p, [(0, 0), (0, width - p.shape[1])], constant_values=fill)
                         for p in parts])


def _jaccard(index: np.ndarray, values: np.ndarray, num_queries: int,
             max_pairs: int = 1 << 22, max_cells: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
  """Jaccard distances of query rows to the gallery rows sharing support with them.

  sum_k min(V[i,k], V[j,k]) is gathered through an inverted index (support column -> gallery
  rows), for batches of query rows holding about `max_pairs` (query entry, gallery entry)
  pairs and at most `max_cells` (row, gallery item) sums.

  Returns:
    index: [Q, W] int64 gallery indices (0-based in the gallery), -1 padded.
    jaccard: [Q, W] float32, 1 - m / (2 - m) with m the sum of minima.
  """
  num_points, num_gallery = len(index), len(index) - num_queries
  gallery_index = index[num_queries:]
  keep = gallery_index >= 0
  by_col = np.argsort(gallery_index[keep], kind='stable')
  col_rows = np.nonzero(keep)[0][by_col]
  col_values = values[num_queries:][keep][by_col]
  col_start = np.searchsorted(gallery_index[keep][by_col], np.arange(num_points + 1))
  col_count = np.diff(col_start)

  q_keep = index[:num_queries] >= 0
  q_rows = np.nonzero(q_keep)[0]
  q_cols = index[:num_queries][q_keep]
  q_values = values[:num_queries][q_keep]
  pairs = col_count[q_cols]
  # Batch boundaries: every max_pairs pairs (a single row may exceed it), and every
  # max_cells // G rows.
  row_pairs = np.cumsum(np.bincount(q_rows, weights=pairs, minlength=num_queries))
  by_pairs = np.searchsorted(row_pairs, np.arange(max_pairs, row_pairs[-1], max_pairs)) + 1
  by_cells = np.arange(0, num_queries, max(max_cells // max(num_gallery, 1), 1))
  bounds = np.unique(np.concatenate([by_pairs, by_cells, [num_queries]]).clip(0, num_queries))
  parts_index, parts_minima = [], []
  for first_row, end_row in zip(bounds[:-1], bounds[1:]):
    lo, hi = np.searchsorted(q_rows, [first_row, end_row])
    count = pairs[lo:hi]
    # Pair p of query entry e reads the inverted list of e's column at col_start + (p's rank
    # among e's pairs); every per-entry quantity is repeated once per pair.
    position = np.arange(count.sum()) + np.repeat(col_start[q_cols[lo:hi]] - (np.cumsum(count)
                                                                              - count), count)
    # Dense sums over this batch's rows x the gallery: a bincount, no sort of the pairs.
    cell = np.repeat((q_rows[lo:hi] - first_row) * num_gallery, count) + col_rows[position]
    sums = np.bincount(cell, weights=np.minimum(np.repeat(q_values[lo:hi], count),
                                                col_values[position]),
                       minlength=(end_row - first_row) * num_gallery)
    sums = sums.reshape(end_row - first_row, num_gallery)
    # V's entries are positive (exp of a bounded distance, then means of them), so a sum of
    # minima is positive exactly where the rows share a column.
    parts = _nonzero_rows(sums > 0, sums)
    parts_index.append(parts[0])
    parts_minima.append(parts[1])
  index_out, minima_sum = _stack(parts_index, -1), _stack(parts_minima, 0.0)
  jaccard = np.where(index_out >= 0, 1.0 - minima_sum / (2.0 - minima_sum), 1.0)
  return index_out, jaccard.astype(np.float32)


def k_reciprocal_rerank(query_emb, gallery_emb, k1: int = 20, k2: int = 6, lam: float = 0.3, *,
                        chunk_size: int | None = None, gallery_chunk_size: int = 1024,
                        progress=None, devices=None) -> Reranked:
  """Re-ranked query-gallery distances, as docs/method.md section 6's dense algorithm gives them.

  Distances among all N = Q + G points are squared Euclidean, each row divided by its maximum
  over all N points (the common implementation divides columns, then transposes), and
  final = (1 - lam) * Jaccard + lam * that distance. Neighbour lists are ordered by distance,
  ties by index. Memory O(N x (D + k1^2) + Q x J), J the most gallery items sharing a
  neighbour with one query (a few thousand at N = 10,000 on random data).

  Args:
    query_emb: [Q, D] float.
    gallery_emb: [G, D] of the same dtype.
    k1, k2, lam: the method's parameters (k1 >= 1, k2 >= 1, 0 <= lam <= 1).
    chunk_size: block side of the all-pairs kNN search (search.all_pairs_top_k); None: 1,024
      on CPU (larger blocks were slower there), 4,096 on accelerators.
    gallery_chunk_size: accepted for compatibility; the kNN blocks are square.
    progress: optional callable(stage, num_done, total).
    devices: the devices the kNN search runs on (default: all local devices).

  Returns:
    Reranked, to pass as `rerank=` to the metrics and top-k functions with the same arrays.
  """
  query_emb, gallery_emb = np.asarray(query_emb), np.asarray(gallery_emb)
  if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
    raise ValueError(f'embeddings must be [Q, D] and [G, D], got {query_emb.shape} and '
                     f'{gallery_emb.shape}')
  if k1 < 1 or k2 < 1 or not 0.0 <= lam <= 1.0:
    raise ValueError(f'need k1 >= 1, k2 >= 1 and 0 <= lam <= 1, got {k1}, {k2}, {lam}')
  report = progress or (lambda *args: None)
  num_queries = len(query_emb)
  everything = np.concatenate([query_emb, gallery_emb])
  if chunk_size is None:
    cpu = search.gallery_mesh(devices).devices.flat[0].platform == 'cpu'
    chunk_size = 1024 if cpu else 4096
  neighbours, _, row_max = search.all_pairs_top_k(everything, k1 + 1, block_size=chunk_size,
                                                  progress=progress, devices=devices)
  neighbours = neighbours.astype(np.int64)
  if neighbours.shape[1] < k2:
    raise ValueError(f'k2={k2} exceeds the {neighbours.shape[1]} neighbour lists of N points')
  row_max = np.maximum(row_max, np.finfo(np.float32).tiny)
  expanded = _expanded_sets(neighbours, k1)
  report('expansion', len(everything), len(everything))

  device_points = jnp.asarray(everything)
  # Chunks of rows whose gathered [rows, W, D] neighbours take at most 64 MB, padded to whole
  # chunks so one compilation serves every chunk.
  gathered = expanded.shape[1] * everything.shape[1]
  rows = 1 << int(np.clip(np.log2((1 << 24) / gathered), 6, 12))
  lists = search.pad_rows(expanded, rows, -1)
  scales = search.pad_rows(row_max, rows, 1.0)
  values = np.concatenate([
      np.asarray(_weights(device_points, lists[start:start + rows], scales[start:start + rows],
                          start))
      for start in range(0, len(lists), rows)])[:len(everything)]
  index = expanded
  if k2 > 1:
    index, values = _query_expansion(index, values, neighbours, k2)
  report('query expansion', len(everything), len(everything))
  jaccard_index, jaccard = _jaccard(index, values, num_queries)
  report('jaccard', num_queries, num_queries)
  return Reranked(scale=(lam / row_max[:num_queries]).astype(np.float32),
                  jaccard_index=jaccard_index.astype(np.int32), jaccard=jaccard, lam=float(lam))
