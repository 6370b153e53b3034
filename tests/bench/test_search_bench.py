"""The visual search benchmark at toy size: its catalogue generator and its exact and faiss runs."""

import os
import sys

import numpy as np
import pytest

pytest.importorskip('faiss', reason='the faiss backend needs faiss-cpu')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'bench'))
import search_bench  # noqa: E402

ROWS, DIM, QUERIES = 6_000, 96, 40


@pytest.fixture(scope='module')
def catalogue_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('catalogue'))
  search_bench.make_catalogue(folder, ROWS, DIM, QUERIES, seed=3)
  return folder


def test_catalogue_is_deterministic_and_shaped_as_described(catalogue_dir, tmp_path):
  catalogue = search_bench.load_catalogue(catalogue_dir, (ROWS, DIM, QUERIES, 3))
  again = search_bench.make_catalogue(str(tmp_path), ROWS, DIM, QUERIES, seed=3)
  np.testing.assert_array_equal(np.asarray(catalogue.embeddings), np.asarray(again.embeddings))
  np.testing.assert_array_equal(catalogue.queries, again.queries)
  assert search_bench.load_catalogue(catalogue_dir, (ROWS, DIM, QUERIES, 4)) is None
  assert catalogue.embeddings.shape == (ROWS, DIM) and catalogue.embeddings.dtype == np.float16
  np.testing.assert_allclose(np.linalg.norm(catalogue.embeddings.astype(np.float32), axis=1), 1,
                             atol=2e-3)
  per_product = np.bincount(catalogue.row_product)
  assert per_product.min() >= 1 and per_product.max() <= 9
  assert 4.5 < ROWS / len(per_product) < 5.5
  assert np.all(np.diff(catalogue.row_product) >= 0)  # a product's rows are consecutive
  np.testing.assert_array_equal(catalogue.row_category,
                                catalogue.product_category[catalogue.row_product])
  shares = np.bincount(catalogue.row_category, minlength=search_bench.CATEGORIES) / ROWS
  assert shares.min() > 0.05 and shares.max() < 0.15
  # A query is closer to its own product's images than to the rest of the catalogue.
  similarity = catalogue.queries @ catalogue.embeddings.astype(np.float32).T
  best = catalogue.row_product[np.argmax(similarity, axis=1)]
  assert np.mean(best == catalogue.query_product) > 0.5


def test_exact_and_faiss_runs(catalogue_dir, tmp_path):
  figures, found = {}, {}
  for name, settings in (('exact', {}), ('faiss', {'nprobe': 16})):
    directory = str(tmp_path / name)
    figures[name] = search_bench.run_backend(
        {'backend': name, 'rows': ROWS, 'queries': QUERIES, 'catalogue': catalogue_dir,
         'directory': directory, 'settings': settings})
    with np.load(os.path.join(directory, 'found.npz')) as saved:
      found[name] = {mode: saved[mode] for mode in saved.files}
  assert 'IndexIVF' in figures['faiss']['structure']
  assert figures['faiss']['disk_bytes'] > 0 and figures['exact']['disk_bytes'] == 0
  for name in figures:
    assert figures[name]['foreign'] == 0
    assert figures[name]['peak_rss'] > 0 and figures[name]['ms_all'][0] > 0
  for mode in ('all', 'category'):
    assert search_bench.product_recall(found['exact'][mode], found['exact'][mode]) == 1
    assert search_bench.product_recall(found['faiss'][mode], found['exact'][mode]) >= 0.9
  nothing = np.full_like(found['exact']['all'], -1)
  assert search_bench.product_recall(nothing, found['exact']['all']) == 0
