"""Tests for fashion_jax/retrieval/knn.py: the all-pairs kNN of re-ranking against stable
argsorts, on one and four devices, with float32 products and with bfloat16 ones re-scored.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import retrieval_reference as reference

from fashion_jax.retrieval import knn, rerank, search


def _knn(points, k, block, devices=None, **options):
  mesh = search.gallery_mesh(devices)
  placed = knn.placed_points([points[:7], points[7:]], mesh, block)
  return knn.all_pairs_top_k(placed, len(points), k, block=block, mesh=mesh, **options)


@pytest.mark.parametrize('num_points,block', [(150, 16), (1100, 512)])
def test_all_pairs_top_k_matches_argsort_on_one_and_four_devices(num_points, block):
  # 150 points in blocks of 16: 55 block pairs dealt unevenly over 4 devices; blocks of 512
  # take the group-minima path for rows and columns, with ties everywhere.
  points = reference.integer_grid(3, num_points)
  distances = reference.squared_distances(points, points)
  order, expected_d = reference.stable_top(distances, 9)
  for devices in (jax.devices()[:1], None):
    index, found_d, row_max = _knn(points, 9, block, devices)
    np.testing.assert_array_equal(index, order)
    np.testing.assert_array_equal(found_d, expected_d)
    np.testing.assert_array_equal(row_max, distances.max(axis=1))


def test_bfloat16_candidates_certified_or_searched_again_give_exact_lists(monkeypatch):
  # Coordinates exact in bfloat16: only the accumulation bound is left, so rows whose list ends
  # in a tie with the candidates after it are not certified and go through the fallback.
  # Re-scoring 4 rows per device at once: its rows are padded otherwise than the kNN blocks.
  monkeypatch.setattr(knn, '_RESCORE_BYTES', 4 * 15 * 6 * 4)
  points = reference.integer_grid(4, 300, dim=6, low=-6, high=7)
  distances = reference.squared_distances(points, points)
  order, expected_d = reference.stable_top(distances, 9)
  certified = []
  index, found_d, row_max = _knn(
      points, 9, 64, precision='bfloat16', candidates=12, far=3,
      progress=lambda stage, done, total: certified.append(done) if stage == 'kNN certified'
      else None)
  assert 0 < certified[0] < len(points)
  np.testing.assert_array_equal(index, order)
  np.testing.assert_array_equal(found_d, expected_d)
  np.testing.assert_array_equal(row_max, distances.max(axis=1))


def test_bfloat16_candidates_match_float32_on_rounded_data():
  points = np.random.default_rng(5).standard_normal((400, 24)).astype(np.float32)
  exact = _knn(points, 7, 64)
  certified = []
  low = _knn(points, 7, 64, precision='bfloat16',
             progress=lambda stage, done, total: certified.append(done)
             if stage == 'kNN certified' else None)
  assert certified[0] > len(points) // 2
  np.testing.assert_array_equal(low[0], exact[0])
  # The same float32 expansion |x|^2 + |y|^2 - 2 x.y, its products summed in another order:
  # a few ulps of the squared norms (~24) apart.
  np.testing.assert_allclose(low[1], exact[1], rtol=1e-6, atol=2e-5)
  np.testing.assert_allclose(low[2], exact[2], rtol=1e-6)


def test_rounding_bound_holds_for_every_pair():
  rng = np.random.default_rng(6)
  points = (rng.standard_normal((200, 64)) * rng.uniform(0.1, 10, size=(200, 1))).astype(
      np.float32)
  exact = reference.squared_distances(points, points)
  low = points.astype(jnp.bfloat16).astype(np.float64)
  norms = (points.astype(np.float64) ** 2).sum(axis=1)
  approx = norms[:, None] + norms[None] - 2.0 * low @ low.T
  bound = np.asarray(knn.rounding_bound(jnp.asarray(points), jnp.bfloat16))
  assert (np.abs(approx - exact) <= bound[:, None]).all()
  # Not vacuous: the bound is within a small factor of the largest error seen.
  assert bound.max() < 20 * np.abs(approx - exact).max()


def test_rerank_with_bfloat16_knn_equals_float32():
  data = reference.clustered(7, num_queries=25, gallery_size=70, num_ids=10)
  full = rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], chunk_size=16)
  low = rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], chunk_size=16,
                                   knn_precision='bfloat16')
  np.testing.assert_array_equal(full.jaccard_index, low.jaccard_index)
  np.testing.assert_allclose(full.jaccard, low.jaccard, atol=1e-6)
  np.testing.assert_allclose(full.scale, low.scale, rtol=1e-6)


def test_rejects_unknown_precision():
  data = reference.clustered(8)
  with pytest.raises(ValueError, match='precision'):
    rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], knn_precision='int8')


def test_empty_lists_made_on_the_devices_equal_the_ones_sent_from_the_host(monkeypatch):
  # Accelerators make constant arrays with a program, CPUs send small ones from the host; a
  # zero byte limit takes the accelerators' way on CPU.
  sharded = jax.sharding.NamedSharding(search.gallery_mesh(),
                                       jax.sharding.PartitionSpec(search.GALLERY_AXIS))
  for far in (0, 3):
    sent = knn._empty_lists(8, 5, far, sharded)
    with monkeypatch.context() as patch:
      patch.setattr(search, '_PLACED_BLOCK_BYTES', 0)
      made = knn._empty_lists(8, 5, far, sharded)
    assert len(sent) == len(made) == (4 if far else 3)
    for a, b in zip(sent, made):
      assert a.dtype == b.dtype and a.sharding == b.sharding
      np.testing.assert_array_equal(a, b)
