"""Average query expansion against a dense NumPy version, and its evaluator's sections."""

import numpy as np
import pytest
import retrieval_reference as reference

from fashion_jax import configlib, evaluators
from fashion_jax.retrieval import query_expansion


def _reference_expand(query_emb, gallery_emb, k, alpha):
  """Dense: stable argsort of every query's squared distances, weights max(s, 0)^alpha."""
  distances = reference.squared_distances(query_emb, gallery_emb)
  out = []
  for q, row in zip(query_emb.astype(np.float64), distances):
    nearest = np.argsort(row, kind='stable')[:k]
    g = gallery_emb[nearest].astype(np.float64)
    weights = np.maximum(g @ q, 0.0) ** alpha
    expanded = q + (weights[:, None] * g).sum(axis=0)
    out.append(expanded / np.linalg.norm(expanded))
  return np.array(out)


@pytest.mark.parametrize('k, alpha', [(1, 3.0), (2, 3.0), (5, 0.0), (3, 1.5)])
def test_matches_the_dense_reference(k, alpha):
  data = reference.clustered(5)
  got = query_expansion.expand_queries(data['query_emb'], data['gallery_emb'], k, alpha,
                                       chunk_size=8, gallery_chunk_size=32)
  expected = _reference_expand(data['query_emb'], data['gallery_emb'], k, alpha)
  np.testing.assert_allclose(got, expected, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_no_neighbours_keeps_the_queries_and_bad_settings_are_refused():
  data = reference.clustered(6)
  np.testing.assert_array_equal(
      query_expansion.expand_queries(data['query_emb'], data['gallery_emb'], k=0),
      data['query_emb'])
  with pytest.raises(ValueError, match='k >= 0 and alpha >= 0'):
    query_expansion.expand_queries(data['query_emb'], data['gallery_emb'], k=2, alpha=-1)


def test_the_evaluator_scores_expanded_queries_with_and_without_reranking():
  data = reference.clustered(7, num_queries=40, gallery_size=120)
  rows = lambda n, **kw: dict(process=np.zeros(n, np.int64), position=np.arange(n), **kw)
  query = evaluators.Embeddings(**rows(40, embeddings=data['query_emb'],
                                       item_id=data['query_ids'], category=np.zeros(40, int),
                                       domain=np.zeros(40, int)))
  gallery = evaluators.Embeddings(**rows(120, embeddings=data['gallery_emb'],
                                         item_id=data['gallery_ids'],
                                         category=np.zeros(120, int), domain=np.ones(120, int)))
  config = configlib.base_config()
  config.eval.query_expansion = config.eval.rerank = True
  config.eval.gallery_chunk_size = 32
  names = evaluators.evaluator_names(config.eval)
  assert names[-2:] == ('rerank', 'query_expansion')
  result = evaluators.run_evaluators(evaluators.EvalData(query, gallery),
                                     evaluators.from_config(config.eval))
  expanded = _reference_expand(data['query_emb'], data['gallery_emb'], 2, 3.0)
  arrays = reference.per_query(reference.squared_distances(expanded, data['gallery_emb']),
                               data['query_ids'], data['gallery_ids'])
  expected = reference.summary(*arrays, tuple(config.eval.ks))
  assert result.metrics['query_expansion'] == pytest.approx(expected, rel=1e-5)
  assert result.metrics['query_expansion']['mAP'] > result.metrics['mAP']
  assert set(result.metrics['query_expansion_reranked']) == set(expected)
  assert {'query expansion', 'query expansion + re-ranking'} <= set(result.curves)
