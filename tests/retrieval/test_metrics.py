"""Tests for fashion_jax/retrieval/metrics.py against hand-computed rankings and the dense per-query

NumPy reference, with many distance ties, cameras, categories and chunks that do not divide Q or G.
"""

import numpy as np
import pytest
import retrieval_reference as reference

from fashion_jax.retrieval import metrics

KS = (1, 2, 5, 10, 100)


def _reference(query_emb, gallery_emb, query_ids, gallery_ids, query_cams=None,
               gallery_cams=None, query_groups=None, gallery_groups=None, ks=KS):
  """Dense distances, then the per-query loop of retrieval_reference."""
  distances = reference.squared_distances(query_emb, gallery_emb)
  arrays = reference.per_query(distances, query_ids, gallery_ids, query_cams, gallery_cams,
                               query_groups, gallery_groups)
  return reference.summary(*arrays, ks), arrays


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
  # INP: 2 positives, the last at rank 3 -> 2/3; 2 positives, the last at rank 4 -> 1/2;
  # mINP = (2/3 + 1/2) / 2 = 7/12.
  queries = np.array([[0, 0], [5.5, 0], [3, 0]], np.float32)
  result = metrics.evaluate_retrieval(queries, HAND_GALLERY, np.array([7, 8, 42]),
                                      HAND_GALLERY_IDS, ks=(1, 2, 100))
  assert result == pytest.approx({'mAP': 2 / 3, 'mINP': 7 / 12, 'acc@1': 0.5, 'acc@2': 1.0,
                                  'acc@100': 1.0, 'num_queries': 2, 'num_skipped': 1})
  ap, first_rank, valid, inp = metrics.per_query_metrics(queries, HAND_GALLERY,
                                                         np.array([7, 8, 42]), HAND_GALLERY_IDS)
  np.testing.assert_allclose(ap, [5 / 6, 1 / 2, 0.0], rtol=1e-6)
  np.testing.assert_allclose(inp, [2 / 3, 1 / 2, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(first_rank, [0, 1, 5])
  np.testing.assert_array_equal(valid, [True, True, False])


def test_hand_computed_cameras():
  # Query id 7, camera 0, at 0. g0 (id 7, camera 0) is dropped, g2 (id 7, camera 1) is kept:
  # ranking g1 g2 g3 g4, matches 0 1 0 0 -> AP = 1/2, first positive at rank 1, INP = 1/2.
  # Query id 9, camera 1, at 0: its only positive g4 has camera 1 -> skipped.
  gallery_cams = np.array([0, 1, 1, 1, 1])
  queries = np.array([[0, 0], [0, 0]], np.float32)
  result = metrics.evaluate_retrieval(queries, HAND_GALLERY, np.array([7, 9]), HAND_GALLERY_IDS,
                                      np.array([0, 1]), gallery_cams, ks=(1, 2))
  assert result == pytest.approx({'mAP': 0.5, 'mINP': 0.5, 'acc@1': 0.0, 'acc@2': 1.0,
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
  _, (expected_ap, expected_first, expected_valid, expected_inp) = _reference(**data)
  ap, first_rank, valid, inp = metrics.per_query_metrics(**data)
  assert 0 < expected_valid.sum() < len(expected_valid)
  np.testing.assert_array_equal(valid, expected_valid)
  np.testing.assert_array_equal(first_rank, expected_first)
  np.testing.assert_allclose(ap, expected_ap, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(inp, expected_inp, rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize('seed,chunk_size,gallery_chunk_size', [
    (0, 256, 4096), (1, 8, 16), (2, 16, 7), (3, 5, 64)])
@pytest.mark.parametrize('num_cams', [None, 2])
def test_clustered_embeddings_match_reference(seed, chunk_size, gallery_chunk_size, num_cams):
  data = reference.clustered(seed, num_cams=num_cams)
  expected, (expected_ap, expected_first, expected_valid, expected_inp) = _reference(**data)
  ap, first_rank, valid, inp = metrics.per_query_metrics(
      **data, chunk_size=chunk_size, gallery_chunk_size=gallery_chunk_size)
  assert 0 < expected_valid.sum() < len(expected_valid)
  np.testing.assert_array_equal(valid, expected_valid)
  np.testing.assert_array_equal(first_rank, expected_first)
  np.testing.assert_allclose(ap, expected_ap, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(inp, expected_inp, rtol=1e-6, atol=1e-7)
  assert metrics.summarize(ap, first_rank, valid, KS, inp=inp) == pytest.approx(expected,
                                                                                rel=1e-6)


def test_category_constrained_retrieval_and_table_match_reference():
  data = reference.clustered(4, num_queries=60, num_cams=2, num_categories=3)
  _, (expected_ap, expected_first, expected_valid, expected_inp) = _reference(**data)
  ap, first_rank, valid, inp = metrics.per_query_metrics(**data, gallery_chunk_size=32)
  np.testing.assert_array_equal(first_rank, expected_first)
  np.testing.assert_allclose(ap, expected_ap, rtol=1e-6, atol=1e-7)
  # The constraint must matter, or this test would not tell it from unconstrained retrieval.
  unconstrained = _reference(data['query_emb'], data['gallery_emb'], data['query_ids'],
                             data['gallery_ids'], data['query_cams'], data['gallery_cams'])[1]
  assert (unconstrained[1] != expected_first).any()

  table, average = metrics.per_category(ap, first_rank, valid, data['query_groups'], KS, inp=inp)
  assert sorted(table) == [0, 1, 2]
  for category, row in table.items():
    rows = data['query_groups'] == category
    expected = reference.summary(expected_ap[rows], expected_first[rows], expected_valid[rows],
                                 expected_inp[rows], KS)
    assert row == pytest.approx(expected, rel=1e-6)
  assert average['mAP'] == pytest.approx(np.mean([row['mAP'] for row in table.values()]))
  assert average['acc@5'] == pytest.approx(np.mean([row['acc@5'] for row in table.values()]))
  assert average['num_categories'] == 3


def test_cmc_curve():
  first_rank = np.array([0, 2, 2, 7, 99])
  valid = np.array([True, True, True, False, True])
  np.testing.assert_allclose(metrics.cmc(first_rank, valid, 4), [0.25, 0.25, 0.75, 0.75])


def test_low_precision_embeddings_rank_like_their_float32_values():
  import jax.numpy as jnp
  data = reference.clustered(5)
  rounded = {key: np.asarray(jnp.asarray(data[key], jnp.bfloat16))
             for key in ('query_emb', 'gallery_emb')}
  as_float32 = {key: value.astype(np.float32) for key, value in rounded.items()}
  ids = dict(query_ids=data['query_ids'], gallery_ids=data['gallery_ids'])
  low = metrics.evaluate_retrieval(**rounded, **ids, ks=KS)
  assert low == pytest.approx(metrics.evaluate_retrieval(**as_float32, **ids, ks=KS), rel=1e-6)


@pytest.mark.parametrize('change,message', [
    (dict(gallery_emb=np.zeros((5, 3), np.float32)), 'must be'),
    (dict(query_ids=np.array([7])), r'query_ids \(1,\)'),
    (dict(query_groups=np.array([0, 0])), 'together'),
    # NaN rows used to be ranked last or first and scored as if the embeddings meant something.
    (dict(query_emb=np.array([[0, 0], [np.nan, 1]], np.float32)), '1 of the 2 query embeddings'),
    (dict(gallery_emb=np.where(HAND_GALLERY > 4, np.inf, HAND_GALLERY)),
     '1 of the 5 gallery embeddings are not finite'),
])
def test_bad_inputs_raise_one_line_errors(change, message):
  arguments = dict(query_emb=np.zeros((2, 2), np.float32), gallery_emb=HAND_GALLERY,
                   query_ids=np.array([7, 8]), gallery_ids=HAND_GALLERY_IDS)
  arguments.update(change)
  with pytest.raises(ValueError, match=message):
    metrics.evaluate_retrieval(**arguments)


def test_rank_gallery_merges_gallery_blocks_in_index_order():
  data = _tied_data(6, num_queries=11, gallery_size=45, num_ids=3)
  indices, _ = metrics.rank_gallery(data['query_emb'], data['gallery_emb'], topk=20,
                                    chunk_size=4, gallery_chunk_size=8)
  distances = reference.squared_distances(data['query_emb'], data['gallery_emb'])
  np.testing.assert_array_equal(indices, np.argsort(distances, axis=1, kind='stable')[:, :20])


def test_gallery_sharded_over_devices_with_empty_padding():
  import jax
  # conftest simulates 4 devices: 9 items give shards of 3, 3, 3 and padding only.
  assert jax.device_count() == 4
  data = _tied_data(8, num_queries=12, gallery_size=9, num_ids=3, num_cams=2)
  expected, _ = _reference(**data)
  assert metrics.evaluate_retrieval(**data, ks=KS, gallery_chunk_size=2) == pytest.approx(
      expected, rel=1e-6)
