"""Tests for fashion_jax/retrieval/centroids.py: per-item means, renormalised, evaluated exactly."""

import numpy as np
import pytest
import retrieval_reference as reference

from fashion_jax.retrieval import centroids, metrics


def test_hand_computed_centroids():
  embeddings = np.array([[1, 0], [0, 1], [1, 0], [3, 4], [0, 1]], np.float32)
  ids = np.array([5, 2, 5, 9, 5])
  result = centroids.gallery_centroids(embeddings, ids, category=np.array([1, 2, 1, 3, 1]))
  # Item 5: mean of (1,0), (1,0), (0,1) = (2/3, 1/3), renormalised to (2, 1) / sqrt(5).
  np.testing.assert_allclose(result['embeddings'],
                             [[2 / 5 ** 0.5, 1 / 5 ** 0.5], [0, 1], [0.6, 0.8]], rtol=1e-6)
  np.testing.assert_array_equal(result['ids'], [5, 2, 9])
  np.testing.assert_array_equal(result['count'], [3, 1, 1])
  np.testing.assert_array_equal(result['category'], [1, 2, 3])


def test_cameras_get_separate_centroids():
  embeddings = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
  result = centroids.gallery_centroids(embeddings, np.array([5, 5, 5]), np.array([0, 1, 0]))
  np.testing.assert_array_equal(result['cams'], [0, 1])
  np.testing.assert_array_equal(result['count'], [2, 1])


def test_centroid_retrieval_matches_reference():
  data = reference.clustered(6, num_cams=None)
  result = centroids.gallery_centroids(data['gallery_emb'], data['gallery_ids'])
  assert len(result['ids']) < len(data['gallery_ids'])
  expected_emb = np.stack([data['gallery_emb'][data['gallery_ids'] == i].mean(axis=0)
                           for i in result['ids']])
  expected_emb /= np.linalg.norm(expected_emb, axis=1, keepdims=True)
  distances = reference.squared_distances(data['query_emb'], expected_emb)
  expected = reference.summary(*reference.per_query(distances, data['query_ids'],
                                                    result['ids']), (1, 5))
  assert metrics.evaluate_retrieval(data['query_emb'], result['embeddings'], data['query_ids'],
                                    result['ids'], ks=(1, 5)) == pytest.approx(expected, rel=1e-6)


def test_mismatched_ids_raise():
  with pytest.raises(ValueError, match='gallery_ids'):
    centroids.gallery_centroids(np.zeros((3, 2), np.float32), np.array([1, 2]))
