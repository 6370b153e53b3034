"""Tests for fashion_jax/retrieval/metrics.py against hand-computed rankings and a per-query

NumPy reference, with many distance ties, cameras and chunk sizes that do not divide Q.
"""

import numpy as np
import pytest

from fashion_jax.retrieval import metrics

KS = (1, 2, 5, 10, 100)


def _reference(query_emb, gallery_emb, query_ids, gallery_ids, query_cams=None,
               gallery_cams=None, ks=KS):
  """One query at a time: stable argsort, drop same id + camera, cumulative precision."""
  aps, first_ranks, valid = [], [], []
  for q in range(len(query_ids)):
    distances = np.sqrt(((gallery_emb.astype(np.float64) - query_emb[q]) ** 2).sum(axis=1))
    order = np.argsort(distances, kind='stable')
    if query_cams is not None:
      junk = (gallery_ids == query_ids[q]) & (gallery_cams == query_cams[q])
      order = order[~junk[order]]
    match = gallery_ids[order] == query_ids[q]
    valid.append(match.any())
    if not match.any():
      aps.append(0.0)
      first_ranks.append(len(gallery_ids))
      continue
    precision = np.cumsum(match) / np.arange(1, len(match) + 1)
    aps.append(precision[match].mean())
    first_ranks.append(np.flatnonzero(match)[0])
  aps, first_ranks, valid = np.array(aps), np.array(first_ranks), np.array(valid)
  summary = {'mAP': aps[valid].mean()}
  summary.update({f'acc@{k}': (first_ranks[valid] < k).mean() for k in ks})
  summary.update(num_queries=int(valid.sum()), num_skipped=int((~valid).sum()))
  return summary, (aps, first_ranks, valid)


def _tied_data(seed, num_queries, gallery_size, num_ids, num_cams=None):
  # Integer coordinates in {-1, 0, 1}^3: only a handful of distinct distances, so most of the
  # ranking is decided by the tie rule, and float32 computes every distance exactly.
  rng = np.random.default_rng(seed)
  data = {
      'query_emb': rng.integers(-1, 2, size=(num_queries, 3)).astype(np.float32),
      'gallery_emb': rng.integers(-1, 2, size=(gallery_size, 3)).astype(np.float32),
      'query_ids': rng.integers(0, num_ids, size=num_queries),
      'gallery_ids': rng.integers(0, num_ids, size=gallery_size),
  }
  if num_cams is not None:
    data['query_cams'] = rng.integers(0, num_cams, size=num_queries)
    data['gallery_cams'] = rng.integers(0, num_cams, size=gallery_size)
  return data


# Gallery on the x axis at 1..5 with ids [7, 8, 7, 8, 9].
HAND_GALLERY = np.array([[1, 0], [2, 0], [3, 0], [4, 0], [5, 0]], np.float32)
HAND_GALLERY_IDS = np.array([7, 8, 7, 8, 9])


def test_hand_computed_example():
  # Query id 7 at 0: ranking g0 g1 g2 g3 g4, matches 1 0 1 0 0 -> AP = (1/1 + 2/3) / 2 = 5/6,
  #   first positive at rank 0.
  # Query id 8 at 5.5: ranking g4 g3 g2 g1 g0, matches 0 1 0 1 0 -> AP = (1/2 + 2/4) / 2 = 1/2,
  #   first positive at rank 1.
  # Query id 42: no positive, skipped.
  # mAP = (5/6 + 1/2) / 2 = 2/3; Acc@1 = 1/2; Acc@2 = 1; Acc@100 (k > G) = 1.
  queries = np.array([[0, 0], [5.5, 0], [3, 0]], np.float32)
  result = metrics.evaluate_retrieval(queries, HAND_GALLERY, np.array([7, 8, 42]),
                                      HAND_GALLERY_IDS, ks=(1, 2, 100))
  assert result == pytest.approx({'mAP': 2 / 3, 'acc@1': 0.5, 'acc@2': 1.0, 'acc@100': 1.0,
                                  'num_queries': 2, 'num_skipped': 1})
  ap, first_rank, valid = metrics.per_query_metrics(queries, HAND_GALLERY, np.array([7, 8, 42]),
                                                    HAND_GALLERY_IDS)
  np.testing.assert_allclose(ap, [5 / 6, 1 / 2, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(first_rank, [0, 1, 5])
  np.testing.assert_array_equal(valid, [True, True, False])


def test_hand_computed_cameras():
  # Query id 7, camera 0, at 0. g0 (id 7, camera 0) is dropped, g2 (id 7, camera 1) is kept:
  # ranking g1 g2 g3 g4, matches 0 1 0 0 -> AP = 1/2, first positive at rank 1.
  # Query id 9, camera 1, at 0: its only positive g4 has camera 1 -> skipped.
  gallery_cams = np.array([0, 1, 1, 1, 1])
  queries = np.array([[0, 0], [0, 0]], np.float32)
  result = metrics.evaluate_retrieval(queries, HAND_GALLERY, np.array([7, 9]), HAND_GALLERY_IDS,
                                      np.array([0, 1]), gallery_cams, ks=(1, 2))
  assert result == pytest.approx({'mAP': 0.5, 'acc@1': 0.0, 'acc@2': 1.0,
                                  'num_queries': 1, 'num_skipped': 1})


def test_ties_are_broken_by_gallery_index():
  # g0 (wrong id) and g1 (right id) are both at distance 1: g0 ranks first, so AP = 1/2.
  gallery = np.array([[1, 0], [0, 1], [5, 5]], np.float32)
  result = metrics.evaluate_retrieval(np.zeros((1, 2), np.float32), gallery, np.array([3]),
                                      np.array([4, 3, 3]), ks=(1,))
  assert result['mAP'] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert result['acc@1'] == 0.0


@pytest.mark.parametrize('chunk_size', [1, 7, 16, 1024])
@pytest.mark.parametrize('with_cams', [False, True])
def test_matches_reference_with_ties(chunk_size, with_cams):
  data = _tied_data(0, num_queries=37, gallery_size=53, num_ids=6,
                    num_cams=2 if with_cams else None)
  expected, _ = _reference(**data)
  result = metrics.evaluate_retrieval(**data, ks=KS, chunk_size=chunk_size)
  assert result.keys() == expected.keys()
  assert result == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_per_query_arrays_match_reference(seed):
  # 12 ids over 20 gallery items: several queries have no positive, some only same-camera ones.
  data = _tied_data(seed, num_queries=30, gallery_size=20, num_ids=12, num_cams=2)
  _, (expected_ap, expected_first, expected_valid) = _reference(**data)
  ap, first_rank, valid = metrics.per_query_metrics(**data)
  assert 0 < expected_valid.sum() < len(expected_valid)
  np.testing.assert_array_equal(valid, expected_valid)
  np.testing.assert_array_equal(first_rank, expected_first)
  np.testing.assert_allclose(ap, expected_ap, rtol=1e-6, atol=1e-7)


def test_matches_reference_on_continuous_embeddings():
  rng = np.random.default_rng(4)
  emb = rng.normal(size=(70, 16)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  ids = rng.integers(0, 10, size=70)
  data = dict(query_emb=emb[:25], gallery_emb=emb[25:], query_ids=ids[:25], gallery_ids=ids[25:])
  expected, _ = _reference(**data)
  assert metrics.evaluate_retrieval(**data, ks=KS, chunk_size=8) == pytest.approx(expected)


def test_rank_gallery_matches_stable_argsort():
  data = _tied_data(5, num_queries=9, gallery_size=40, num_ids=3)
  indices, distances = metrics.rank_gallery(data['query_emb'], data['gallery_emb'], topk=12)
  expected_distances = np.sqrt(
      ((data['query_emb'][:, None, :] - data['gallery_emb'][None]) ** 2).sum(-1))
  expected_indices = np.argsort(expected_distances, axis=1, kind='stable')[:, :12]
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_allclose(
      distances, np.take_along_axis(expected_distances, expected_indices, axis=1), rtol=1e-6)


def test_rank_gallery_clips_topk_to_gallery_size():
  indices, distances = metrics.rank_gallery(np.zeros((2, 2), np.float32), HAND_GALLERY, topk=50)
  assert indices.shape == distances.shape == (2, 5)
  np.testing.assert_array_equal(indices[0], [0, 1, 2, 3, 4])


def test_no_query_with_a_positive_gives_nan_metrics():
  result = metrics.evaluate_retrieval(np.zeros((2, 2), np.float32), HAND_GALLERY,
                                      np.array([1, 2]), HAND_GALLERY_IDS, ks=(1,))
  assert np.isnan(result['mAP']) and np.isnan(result['acc@1'])
  assert (result['num_queries'], result['num_skipped']) == (0, 2)


def test_cameras_must_come_in_pairs():
  with pytest.raises(ValueError, match='together'):
    metrics.evaluate_retrieval(np.zeros((1, 2), np.float32), HAND_GALLERY, np.array([7]),
                               HAND_GALLERY_IDS, query_cams=np.array([0]))
