"""Tests for fashion_jax/retrieval/rerank.py against docs/method.md section 6's dense re-ranking,

written in retrieval_reference.py, on clustered embeddings with exact ties.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import retrieval_reference as reference

from fashion_jax.retrieval import metrics, rerank, search

KS = (1, 5, 10)


def _dense(reranked, data):
  """The [Q, G] final distances a Reranked stands for."""
  return np.asarray(search.block_distances(jnp.asarray(data['query_emb']),
                                           jnp.asarray(data['gallery_emb']), 0, reranked))


# k1 >= N = 120 takes every point, as the reference's slices do (it used to size the sets by k1:
# 28 GB for k1 = 1,000 on the demo's 690 points).
@pytest.mark.parametrize('seed,k1,k2,lam', [(0, 20, 6, 0.3), (1, 7, 3, 0.5), (2, 5, 1, 0.1),
                                            (3, 200, 6, 0.3), (4, 250, 6, 0.3)])
def test_matches_dense_rerank(seed, k1, k2, lam):
  data = reference.clustered(seed, num_queries=30, gallery_size=90, num_ids=12)
  expected = reference.k_reciprocal(data['query_emb'], data['gallery_emb'], k1, k2, lam,
                                    dtype=np.float64)
  reranked = rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], k1, k2, lam,
                                        chunk_size=8, gallery_chunk_size=16)
  np.testing.assert_allclose(_dense(reranked, data), expected, atol=1e-5)


def test_matches_float16_dense_rerank_to_1e3():
  data = reference.clustered(3, num_queries=30, gallery_size=90, num_ids=12)
  expected = reference.k_reciprocal(data['query_emb'], data['gallery_emb'], 20, 6, 0.3,
                                    dtype=np.float16)
  reranked = rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'])
  np.testing.assert_allclose(_dense(reranked, data), expected, atol=1e-3)


def test_metrics_and_top_k_on_reranked_distances_match_dense():
  data = reference.clustered(4, num_queries=30, gallery_size=90, num_ids=12, num_cams=2)
  # The copies of a gallery row take its id here. Their re-ranked distances tie exactly in
  # float64, but float32 arithmetic sharded over the devices rounds two rows at different
  # places differently, so either may come first (on an AMD EPYC the copy of another id came
  # first for one query); within one id the order leaves every metric unchanged.
  _, first = np.unique(data['gallery_emb'], axis=0, return_inverse=True)
  data['gallery_ids'] = data['gallery_ids'][np.unique(first.ravel(), return_index=True)[1]][
      first.ravel()]
  dense = reference.k_reciprocal(data['query_emb'], data['gallery_emb'], 20, 6, 0.3,
                                 dtype=np.float64)
  reranked = rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'])
  expected_arrays = reference.per_query(dense, data['query_ids'], data['gallery_ids'],
                                        data['query_cams'], data['gallery_cams'])
  result = metrics.evaluate_retrieval(**data, ks=KS, rerank=reranked, gallery_chunk_size=32)
  assert result == pytest.approx(reference.summary(*expected_arrays, KS), abs=1e-6)
  plain = metrics.evaluate_retrieval(**data, ks=KS)
  assert plain['mAP'] != pytest.approx(result['mAP'], abs=1e-3)
  indices, distances = metrics.rank_gallery(data['query_emb'], data['gallery_emb'], 10,
                                            rerank=reranked, gallery_chunk_size=16)
  # Each query's ten nearest, whichever of two tied copies comes first.
  assert all(len(set(row)) == 10 for row in indices.tolist())
  np.testing.assert_allclose(np.take_along_axis(dense, indices, axis=1),
                             np.sort(dense, axis=1)[:, :10], atol=1e-5)
  np.testing.assert_allclose(distances, np.sort(dense, axis=1)[:, :10], atol=1e-5)


def test_result_left_on_the_devices_equals_the_host_result(monkeypatch):
  # Accelerators' default. Units of 2 rows: the Jaccard stage runs in 4 calls on 4 devices,
  # with k1 = 3 two of 8 columns and two of 16, whose pieces are joined on the devices.
  monkeypatch.setattr(rerank, '_ROW_UNIT', 2)
  data = reference.clustered(4, num_queries=30, gallery_size=90, num_ids=12, num_cams=2)
  host, kept = (rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], k1=3, k2=2,
                                           result_on_device=on_device)
                for on_device in (False, True))
  assert host.jaccard.shape == (30, 16)
  assert isinstance(kept.jaccard_index, jax.Array) and isinstance(host.jaccard, np.ndarray)
  for a, b in zip(host, kept):
    np.testing.assert_array_equal(a, b)
  options = dict(ks=KS, gallery_chunk_size=32, chunk_size=8)
  assert (metrics.evaluate_retrieval(**data, rerank=kept, **options)
          == metrics.evaluate_retrieval(**data, rerank=host, **options))
  chosen = np.array([3, 17, 29])
  for a, b in zip(*(metrics.rank_gallery(data['query_emb'][chosen], data['gallery_emb'], 10,
                                         rerank=r.select(chosen)) for r in (host, kept))):
    np.testing.assert_array_equal(a, b)
  # Rows left on other devices than the metrics' go to theirs.
  two = rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], k1=3, k2=2,
                                   result_on_device=True, devices=jax.devices()[2:])
  options['devices'] = jax.devices()[:2]
  assert (metrics.evaluate_retrieval(**data, rerank=two, **options)
          == metrics.evaluate_retrieval(**data, rerank=host, **options))


def test_rejects_bad_parameters():
  data = reference.clustered(5)
  with pytest.raises(ValueError, match='at least one query'):
    rerank.k_reciprocal_rerank(data['query_emb'][:0], data['gallery_emb'])
  with pytest.raises(ValueError, match='k1 >= 1'):
    rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], k1=0)
  with pytest.raises(ValueError, match='must be'):
    rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'][:, :3])
  broken = data['gallery_emb'].copy()
  broken[[2, 4], 1] = np.nan
  with pytest.raises(ValueError, match='2 of the .* gallery embeddings are not finite'):
    rerank.k_reciprocal_rerank(data['query_emb'], broken)
