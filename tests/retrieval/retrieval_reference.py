"""Straightforward dense NumPy versions of the retrieval protocol and of k-reciprocal re-ranking,

written for the tests: full distance matrices, a stable argsort per row, Python loops.
"""

import numpy as np


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = a.astype(np.float64), b.astype(np.float64)
  return ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)


def per_query(distances, query_ids, gallery_ids, query_cams=None, gallery_cams=None,
              query_groups=None, gallery_groups=None):
  """AP, first-positive rank, validity and INP per query from a dense [Q, G] distance matrix.

  INP (Ye et al. 2020): the number of positives over the 1-based rank of the last positive.
  """
  aps, first_ranks, valid, inps = [], [], [], []
  for q in range(len(query_ids)):
    order = np.argsort(distances[q], kind='stable')
    if query_cams is not None:
      junk = (gallery_ids == query_ids[q]) & (gallery_cams == query_cams[q])
      order = order[~junk[order]]
    if query_groups is not None:
      order = order[gallery_groups[order] == query_groups[q]]
    match = gallery_ids[order] == query_ids[q]
    valid.append(match.any())
    if not match.any():
      aps.append(0.0)
      first_ranks.append(len(gallery_ids))
      inps.append(0.0)
      continue
    precision = np.cumsum(match) / np.arange(1, len(match) + 1)
    aps.append(precision[match].mean())
    first_ranks.append(np.flatnonzero(match)[0])
    inps.append(match.sum() / (np.flatnonzero(match)[-1] + 1))
  return np.array(aps), np.array(first_ranks), np.array(valid), np.array(inps)


def summary(aps, first_ranks, valid, inps, ks):
  result = {'mAP': aps[valid].mean() if valid.any() else float('nan'),
            'mINP': inps[valid].mean() if valid.any() else float('nan')}
  result.update({f'acc@{k}': (first_ranks[valid] < k).mean() if valid.any() else float('nan')
                 for k in ks})
  result.update(num_queries=int(valid.sum()), num_skipped=int((~valid).sum()))
  return result


def k_reciprocal(query_emb, gallery_emb, k1, k2, lam, dtype=np.float32):
  """Dense re-ranking exactly as docs/method.md section 6 (and the common implementation).

  Distances are squared Euclidean among all N points, each column divided by its maximum, then
  transposed as the common implementation does. V and the Jaccard sums are held in `dtype`
  (that implementation uses float16). Returns the [Q, G] final distances in float64.
  """
  everything = np.concatenate([query_emb, gallery_emb])
  num_points, num_queries = len(everything), len(query_emb)
  d = squared_distances(everything, everything)
  d = (d / d.max(axis=0)).T
  rank = np.argsort(d, axis=1, kind='stable')

  def reciprocal(i, k):
    return np.array([j for j in rank[i, :k + 1] if i in rank[j, :k + 1]], dtype=np.int64)

  v = np.zeros((num_points, num_points), dtype)
  for i in range(num_points):
    neighbours = reciprocal(i, k1)
    expansion = neighbours
    for candidate in neighbours:
      candidate_set = reciprocal(candidate, int(np.around(k1 / 2.0)))
      if len(np.intersect1d(candidate_set, neighbours)) > 2.0 / 3.0 * len(candidate_set):
        expansion = np.append(expansion, candidate_set)
    expansion = np.unique(expansion)
    weight = np.exp(-d[i, expansion])
    v[i, expansion] = weight / weight.sum()
  if k2 > 1:
    v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(num_points)]).astype(dtype)
  jaccard = np.zeros((num_queries, num_points))
  for i in range(num_queries):
    minima = np.minimum(v[i][None, :], v).sum(axis=1, dtype=dtype).astype(np.float64)
    jaccard[i] = 1.0 - minima / (2.0 - minima)
  final = (1.0 - lam) * jaccard + lam * d[:num_queries]
  return final[:, num_queries:]


def clustered(seed, num_queries=40, gallery_size=120, num_ids=15, dim=8, num_cams=None,
              num_categories=None):
  """Unit embeddings around per-id centres, with exact ties and queries that have no positive.

  Ten gallery rows are copies of other gallery rows and five queries copy gallery rows, so
  exact distance ties occur; query ids run over num_ids + 3 ids, the last three absent from
  the gallery. An id's category is id % num_categories.
  """
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_ids + 3, dim))
  query_ids = rng.integers(0, num_ids + 3, size=num_queries)
  gallery_ids = rng.integers(0, num_ids, size=gallery_size)
  query_emb = centres[query_ids] + 0.8 * rng.normal(size=(num_queries, dim))
  gallery_emb = centres[gallery_ids] + 0.8 * rng.normal(size=(gallery_size, dim))
  copies = rng.choice(gallery_size, size=20, replace=False)
  gallery_emb[copies[10:]] = gallery_emb[copies[:10]]
  query_emb[:5] = gallery_emb[rng.choice(gallery_size, size=5, replace=False)]
  normalise = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  data = {'query_emb': normalise(query_emb), 'gallery_emb': normalise(gallery_emb),
          'query_ids': query_ids, 'gallery_ids': gallery_ids}
  if num_cams is not None:
    data['query_cams'] = rng.integers(0, num_cams, size=num_queries)
    data['gallery_cams'] = rng.integers(0, num_cams, size=gallery_size)
  if num_categories is not None:
    data['query_groups'] = query_ids % num_categories
    data['gallery_groups'] = gallery_ids % num_categories
  return data


def integer_grid(seed, num_points, dim=3, low=-1, high=2):
  """[N, dim] float32 points of integer coordinates: few distinct distances (ranking mostly
  decided by the tie rule), every distance exact in float32, and every coordinate exact in
  bfloat16 and float16 too, so results must agree bit for bit."""
  return np.random.default_rng(seed).integers(low, high, size=(num_points, dim)).astype(
      np.float32)


def stable_top(distances, k):
  """(indices, distances) [N, k] of each row's k smallest, equal distances by index."""
  order = np.argsort(distances, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(distances, order, axis=1)
