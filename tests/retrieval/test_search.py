"""Tests for fashion_jax/retrieval/search.py: exact top-k against stable argsorts, the same
results on one and on four (simulated) devices, low-precision embeddings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import retrieval_reference as reference

from fashion_jax.retrieval import metrics, rerank, search


def test_grouped_merge_matches_stable_argsort():
  # 2,048 columns take the group-minima path of _merge_top_k; integer distances tie a lot.
  rng = np.random.default_rng(0)
  held = np.sort(rng.integers(0, 4, size=(6, 5)).astype(np.float32), axis=1)
  held_index = np.tile(np.arange(5, dtype=np.int32), (6, 1))
  block = rng.integers(0, 4, size=(6, 2048)).astype(np.float32)
  block[:, :64] = 9.0  # whole groups that cannot win
  merged_d, merged_i = jax.jit(search._merge_top_k, static_argnums=4)(
      held, held_index, block, jnp.int32(100), 5)
  both = np.concatenate([held, block], axis=1)
  index = np.concatenate([held_index, np.tile(100 + np.arange(2048), (6, 1))], axis=1)
  order, expected_d = reference.stable_top(both, 5)
  np.testing.assert_array_equal(merged_i, np.take_along_axis(index, order, axis=1))
  np.testing.assert_array_equal(merged_d, expected_d)


def test_top_k_sharded_equals_single_device():
  assert jax.device_count() == 4
  queries, gallery = reference.integer_grid(1, 21), reference.integer_grid(2, 45)
  one = search.top_k(queries, gallery, 12, chunk_size=8, gallery_chunk_size=4,
                     devices=jax.devices()[:1])
  four = search.top_k(queries, gallery, 12, chunk_size=8, gallery_chunk_size=4)
  for a, b in zip(one, four):
    np.testing.assert_array_equal(a, b)
  distances = reference.squared_distances(queries, gallery)
  order, _ = reference.stable_top(distances, 12)
  np.testing.assert_array_equal(four[0], order)
  np.testing.assert_array_equal(four[2], distances.max(axis=1))


@pytest.mark.parametrize('spec', [(), (search.GALLERY_AXIS,)])
@pytest.mark.parametrize('block_bytes', [8 * 3 * 8, 1 << 26])
def test_placed_rows_stacks_and_pads_on_the_devices(monkeypatch, spec, block_bytes):
  # 18 rows in 20, blocks of 8 rows: one across the two parts, one inside a part, and a last
  # one that runs into the padding and past the end; or all rows in one block.
  # int64 rows arrive as int32 (x64 is off).
  monkeypatch.setattr(search, '_PLACED_BLOCK_BYTES', block_bytes)
  rng = np.random.default_rng(0)
  parts = [rng.integers(-9, 9, size=(n, 3)) for n in (6, 0, 12)]
  mesh = search.gallery_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  placed = search.placed_rows(parts, 20, sharding)
  expected = np.concatenate([*parts, np.zeros((2, 3), np.int64)])
  assert placed.sharding == sharding and placed.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(placed), expected)
  for shard in placed.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
  with pytest.raises(ValueError, match='cannot place rows'):
    search.placed_rows(parts, 17, sharding)
  # Parts of several dtypes are promoted together, as jnp.concatenate would.
  mixed = search.placed_rows([parts[0].astype(np.float32), parts[2].astype(np.float64)], 20,
                             sharding)
  assert mixed.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(mixed), expected.astype(np.float32))


def test_gallery_on_the_devices_ranks_like_the_host_gallery():
  # 45 rows in blocks of 4 per device: the device array is padded on the devices.
  queries, gallery = reference.integer_grid(1, 21), reference.integer_grid(2, 45)
  ids = dict(query_ids=np.arange(21) % 5, gallery_ids=np.arange(45) % 5)
  on_devices = jnp.asarray(gallery)
  elsewhere = jax.device_put(gallery, jax.devices()[1])  # not the mesh's devices: via the host
  for host, device in zip(search.top_k(queries, gallery, 12, chunk_size=8, gallery_chunk_size=4,
                                       devices=jax.devices()[:1]),
                          search.top_k(queries, elsewhere, 12, chunk_size=8, gallery_chunk_size=4,
                                       devices=jax.devices()[:1])):
    np.testing.assert_array_equal(host, device)
  for host, device in zip(search.top_k(queries, gallery, 12, chunk_size=8, gallery_chunk_size=4),
                          search.top_k(queries, on_devices, 12, chunk_size=8,
                                       gallery_chunk_size=4)):
    np.testing.assert_array_equal(host, device)
  for host, device in zip(metrics.per_query_metrics(queries, gallery, **ids, gallery_chunk_size=4),
                          metrics.per_query_metrics(queries, on_devices, **ids,
                                                    gallery_chunk_size=4)):
    np.testing.assert_array_equal(host, device)


@pytest.fixture(scope='module')
def reranked_data():
  data = reference.clustered(6, num_queries=25, gallery_size=70, num_ids=10, num_cams=2)
  return data, rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], chunk_size=16)


def test_rerank_and_metrics_sharded_equal_single_device(reranked_data):
  data, sharded = reranked_data
  one_device = jax.devices()[:1]
  single = rerank.k_reciprocal_rerank(data['query_emb'], data['gallery_emb'], chunk_size=16,
                                      devices=one_device)
  for a, b in zip(single, sharded):
    np.testing.assert_array_equal(a, b)
  expected = metrics.per_query_metrics(**data, rerank=sharded, gallery_chunk_size=8,
                                       devices=one_device)
  found = metrics.per_query_metrics(**data, rerank=sharded, gallery_chunk_size=8)
  for a, b in zip(expected, found):
    np.testing.assert_array_equal(a, b)


def test_reranked_rows_of_chosen_queries(reranked_data):
  data, reranked = reranked_data
  # One chunk shape for all three calls.
  everything, _ = metrics.rank_gallery(data['query_emb'], data['gallery_emb'], 10,
                                       rerank=reranked, chunk_size=4)
  plain, _ = metrics.rank_gallery(data['query_emb'], data['gallery_emb'], 10, chunk_size=4)
  assert (everything != plain).any()
  chosen = np.array([13, 2, 7, 24])
  indices, _ = metrics.rank_gallery(data['query_emb'][chosen], data['gallery_emb'], 10,
                                    rerank=reranked.select(chosen), chunk_size=4)
  np.testing.assert_array_equal(indices, everything[chosen])


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_embeddings_rank_like_float32(dtype):
  # Exactly representable embeddings: every product accumulates in float32 either way, so
  # rankings and metrics must agree exactly, ties included.
  query_emb, gallery_emb = (reference.integer_grid(seed, n, dim=6, low=-3, high=4)
                            for seed, n in ((8, 30), (9, 80)))
  rng = np.random.default_rng(10)
  ids = dict(query_ids=rng.integers(0, 12, size=30), gallery_ids=rng.integers(0, 12, size=80))
  low_q, low_g = (np.asarray(jnp.asarray(x, dtype)) for x in (query_emb, gallery_emb))
  assert low_q.dtype == dtype
  for full, low in zip(search.top_k(query_emb, gallery_emb, 15),
                       search.top_k(low_q, low_g, 15)):
    np.testing.assert_array_equal(full, low)
  for full, low in zip(metrics.per_query_metrics(query_emb, gallery_emb, **ids),
                       metrics.per_query_metrics(low_q, low_g, **ids)):
    np.testing.assert_array_equal(full, low)


def test_bfloat16_rerank_matches_float32():
  # The shapes and parameters of reranked_data, so the float32 programs are compiled once.
  query_emb, gallery_emb = (reference.integer_grid(seed, n, dim=8, low=-3, high=4)
                            for seed, n in ((11, 25), (12, 70)))
  low_q, low_g = (np.asarray(jnp.asarray(x, jnp.bfloat16)) for x in (query_emb, gallery_emb))
  full = rerank.k_reciprocal_rerank(query_emb, gallery_emb, chunk_size=16)
  low = rerank.k_reciprocal_rerank(low_q, low_g, chunk_size=16)
  np.testing.assert_array_equal(full.jaccard_index, low.jaccard_index)
  np.testing.assert_allclose(full.jaccard, low.jaccard, atol=1e-6)
  np.testing.assert_allclose(full.scale, low.scale, rtol=1e-6)
