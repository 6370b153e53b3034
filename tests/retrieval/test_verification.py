"""TPR at FPR over all query-gallery pairs against a full NumPy sort of every pair's score."""

import numpy as np
import pytest

from fashion_jax.retrieval import verification
import retrieval_reference as reference

FPRS = (1e-3, 1e-2, 0.1, 0.5, 1.0)


def _reference(query_emb, gallery_emb, query_ids, gallery_ids, fprs):
  """Every pair scored in float64 and sorted: v = the (m + 1)-th largest negative score."""
  scores = query_emb.astype(np.float32) @ gallery_emb.astype(np.float32).T
  same = query_ids[:, None] == gallery_ids[None, :]
  negatives = np.sort(scores[~same])[::-1]
  positives = scores[same]
  result = {}
  for f in fprs:
    m = int(np.floor(f * len(negatives)))
    result[f] = 1.0 if m >= len(negatives) else float(np.mean(positives > negatives[m]))
  return result


def test_hand_computed():
  # One query, gallery scores 0.9 (positive), 0.8, 0.7 (negatives), 0.6 (positive), 0.5.
  gallery = np.array([[0.9, 0], [0.8, 0], [0.7, 0], [0.6, 0], [0.5, 0]], np.float32)
  result = verification.verification(np.array([[1.0, 0.0]], np.float32), gallery,
                                     np.array([1]), np.array([1, 2, 3, 1, 4]),
                                     fprs=(0.2, 1 / 3, 0.5, 1.0))
  # 3 negatives. f = 0.2: m = 0, v = 0.8: only 0.9 above -> 1/2. f = 1/3: m = 1, v = 0.7 ->
  # 1/2. f = 0.5: m = 1 -> 1/2. f = 1: m = 3, every negative allowed -> 1.
  assert result['tpr'] == pytest.approx({0.2: 0.5, 1 / 3: 0.5, 0.5: 0.5, 1.0: 1.0})
  assert result['threshold'][0.2] == pytest.approx(0.8)
  assert (result['num_positive_pairs'], result['num_negative_pairs']) == (2, 3)


@pytest.mark.parametrize('seed', [0, 1])
def test_clustered_embeddings_match_a_full_sort(seed):
  data = reference.clustered(seed, num_queries=50, gallery_size=300)
  result = verification.verification(data['query_emb'], data['gallery_emb'], data['query_ids'],
                                     data['gallery_ids'], FPRS, chunk_size=16)
  expected = _reference(data['query_emb'], data['gallery_emb'], data['query_ids'],
                        data['gallery_ids'], FPRS)
  assert result['tpr'] == pytest.approx(expected, abs=1e-12)
  assert 0 < result['tpr'][1e-2] < result['tpr'][0.5] < 1


def test_ties_and_queries_without_positives():
  # Integer coordinates: few distinct scores, so the thresholds sit on ties; three query ids
  # have no gallery image and contribute negatives only.
  rng = np.random.default_rng(3)
  query_emb = rng.integers(-2, 3, size=(40, 3)).astype(np.float32)
  gallery_emb = rng.integers(-2, 3, size=(90, 3)).astype(np.float32)
  query_ids, gallery_ids = rng.integers(0, 12, 40), rng.integers(0, 9, 90)
  fprs = (0.01, 0.05, 0.2, 0.37, 0.8)
  result = verification.verification(query_emb, gallery_emb, query_ids, gallery_ids, fprs,
                                     chunk_size=8)
  assert result['tpr'] == pytest.approx(
      _reference(query_emb, gallery_emb, query_ids, gallery_ids, fprs), abs=1e-12)


def test_negative_and_zero_scores_keep_their_order():
  scores = np.array([-3.5, -1.0, -0.0, 0.0, 1e-30, 2.0, np.inf, -np.inf], np.float32)
  keys = np.asarray(verification.score_keys(scores))
  assert np.all(np.diff(keys[[7, 0, 1, 2, 4, 5, 6]].astype(np.int64)) > 0)
  assert keys[2] == keys[3]
  np.testing.assert_array_equal(verification.key_scores(keys[[0, 1, 3, 4, 5]]),
                                scores[[0, 1, 3, 4, 5]])


def test_roc_curve_ends_at_one_and_rises():
  data = reference.clustered(2)
  fpr, tpr = verification.verification(data['query_emb'], data['gallery_emb'],
                                       data['query_ids'], data['gallery_ids'])['roc']
  assert fpr[-1] == 1.0 and tpr[-1] == 1.0
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
