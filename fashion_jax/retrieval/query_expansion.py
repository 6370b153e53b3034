"""Average query expansion (alpha-QE; docs/method.md section 9): each query is replaced by the
normalised, similarity-weighted mean of itself and its k nearest gallery items, then searched
again. Exact and chunked: the neighbours come from `search.top_k`.
"""

import numpy as np

from fashion_jax.retrieval import search


def expand_queries(query_emb: np.ndarray, gallery_emb: np.ndarray, k: int = 2,
                   alpha: float = 3.0, **options) -> np.ndarray:
  """The expanded queries: normalise(q + sum_i max(s_i, 0)^alpha g_i) over the k nearest
  gallery items g_i (ties by gallery index), s_i = q . g_i their cosine similarity.

  The query weighs 1 (its similarity to itself); alpha = 0 gives the plain mean. Negative
  similarities weigh 0, so a far neighbour never pushes the query away.

  Args:
    query_emb: [Q, D], gallery_emb: [G, D] unit vectors (any float dtype).
    k: neighbours per query (clipped to G); 0 returns the queries unchanged.
    alpha: the similarity exponent, >= 0.
    options: search.top_k's chunk sizes, progress and devices.

  Returns:
    [Q, D] float32 unit vectors.
  """
  if k < 0 or alpha < 0:
    raise ValueError(f'query expansion needs k >= 0 and alpha >= 0, got k={k}, alpha={alpha}')
  queries = np.asarray(query_emb, np.float32)
  if k == 0:
    return queries
  gallery = np.asarray(gallery_emb)
  index, _, _ = search.top_k(np.asarray(query_emb), gallery, k, **options)
  neighbours = gallery[index].astype(np.float32)                      # [Q, k, D]
  similarity = np.einsum('qd,qkd->qk', queries, neighbours)
  weights = np.maximum(similarity, 0.0) ** alpha
  expanded = queries + np.einsum('qk,qkd->qd', weights, neighbours)
  return expanded / np.maximum(np.linalg.norm(expanded, axis=1, keepdims=True), 1e-12)
