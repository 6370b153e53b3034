"""Every search backend through the same cases, against the exact backend's answers."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fashion_jax.search import backends
from fashion_jax.search.backends import NO_CATEGORY, faiss_index

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIM = 32
# Embedded Qdrant commits every point to disk (tens of ms each here), so the shared cases keep
# it in memory; test_save_and_open uses the default storage, inside the index directory.
CASES = {
    'exact': ('exact', {}),
    # Every query in one call, as on accelerators (on CPU the exact backend runs one per call).
    'exact-batched': ('exact', {}),
    'faiss': ('faiss', {}),  # a flat index at this size
    'faiss-ivf': ('faiss', {'factory': 'IVF3,SQfp16', 'nprobe': 3}),
    'faiss-hnsw': ('faiss', {'factory': 'HNSW16,SQfp16'}),
    # The default for large catalogues: PQ fast-scan lists of a rotation, re-scored candidates.
    'faiss-refined': ('faiss', {'factory': 'PCAR16,IVF3,PQ8x4fs,Refine(SQfp16)', 'nprobe': 3,
                                'refine': 64}),
    'qdrant': ('qdrant', {'path': ':memory:'}),
}
pytestmark = pytest.mark.filterwarnings('ignore:Payload indexes have no effect:UserWarning')


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Catalogue:
  """60 products of 1-4 rows each in 3 categories: rows near their product's random direction
  (far from every other product's), queries near some products'."""

  def __init__(self, seed=0, num_products=60, dim=DIM):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((num_products, dim)))
    row_product = rng.permutation(np.repeat(np.arange(num_products),
                                            rng.integers(1, 5, num_products)))
    self.embeddings = _unit(centres[row_product] + 0.05 * rng.standard_normal(
        (len(row_product), dim))).astype(np.float16)
    self.row_product = row_product.astype(np.int32)
    self.product_category = rng.integers(0, 3, num_products).astype(np.int32)
    self.row_category = self.product_category[row_product]
    # float16 values: the exact backend rounds queries to its float16 rows' type, and float16
    # values keep every backend's scores equal up to summation order.
    self.queries = _unit(centres[::5] + 0.2 * rng.standard_normal(
        (len(centres[::5]), dim))).astype(np.float16).astype(np.float32)
    self.centroids = _unit(centres).astype(np.float32)

  def rows(self, rows):
    """The add() arguments of `rows`."""
    return rows, self.embeddings[rows], self.row_product[rows], self.row_category[rows]


class FakeIndex:
  """What `open` reads of a `search.index.SearchIndex`, whose product `removed` was removed."""

  def __init__(self, directory, catalogue, name, settings, removed):
    self.directory = self.backend_directory = str(directory)
    self.meta = {'backend': name, 'backend_settings': settings}
    self.embeddings, self.row_product = catalogue.embeddings, catalogue.row_product
    self.row_category, self.product_category = catalogue.row_category, catalogue.product_category
    self.live = catalogue.row_product != removed
    self.product_live = np.arange(len(catalogue.centroids)) != removed
    self.centroids = np.where(self.product_live[:, None], catalogue.centroids, 0)

  def __len__(self):
    return len(self.embeddings)


def make(case, directory, dim=DIM, settings=None):
  name, default = CASES[case]
  backend = backends.get(name).create(str(directory), dim, 'float16',
                                      default if settings is None else settings)
  if case == 'exact-batched':
    backend.one_query_per_call = False
  return backend


def reference(catalogue, rows):
  exact = backends.get('exact').create(None, DIM, 'float16', {})
  exact.add(*catalogue.rows(rows))
  return exact


def assert_same(got, want):
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], atol=2e-3)


@pytest.fixture(scope='module')
def catalogue():
  return Catalogue()


@pytest.mark.parametrize('case', CASES)
def test_search_matches_exact_with_and_without_category(case, catalogue, tmp_path):
  rows = np.arange(len(catalogue.embeddings))
  backend, exact = make(case, tmp_path), reference(catalogue, rows)
  backend.add(*catalogue.rows(rows))
  assert len(backend) == len(rows)
  for category in (NO_CATEGORY, 0, 2):
    got = backend.search(catalogue.queries, 5, category)
    assert_same(got, exact.search(catalogue.queries, 5, category))
    if category >= 0:
      assert (catalogue.product_category[got[1]] == category).all()


@pytest.mark.parametrize('case', CASES)
def test_removed_rows_never_return_and_rows_added_later_do(case, catalogue, tmp_path):
  rows = np.arange(len(catalogue.embeddings))
  backend = make(case, tmp_path)
  backend.add(*catalogue.rows(rows))
  # Products 0 and 5 lose every row, product 10 (with several rows) all but one.
  gone = np.flatnonzero(np.isin(catalogue.row_product, [0, 5]))
  gone = np.concatenate([gone, np.flatnonzero(catalogue.row_product == 10)[1:]])
  assert len(gone) > 2
  backend.remove(gone)
  kept = np.setdiff1d(rows, gone)
  assert len(backend) == len(kept)
  for category in (NO_CATEGORY, int(catalogue.product_category[0])):
    got = backend.search(catalogue.queries, 20, category)
    assert not np.isin(got[1], [0, 5]).any()
    assert (got[1] == 10).any() or category >= 0
    assert_same(got, reference(catalogue, kept).search(catalogue.queries, 20, category))
  # Product 0's vectors come back under new row numbers, as an appended image would.
  catalogue_rows = np.flatnonzero(catalogue.row_product == 0)
  new_rows = len(rows) + np.arange(len(catalogue_rows))
  backend.add(new_rows, catalogue.embeddings[catalogue_rows], np.zeros(len(new_rows)),
              catalogue.row_category[catalogue_rows])
  got = backend.search(catalogue.queries, 20)
  assert got[1][0, 0] == 0  # the first query is near product 0
  assert_same(got, reference(catalogue, np.concatenate([kept, catalogue_rows])).search(
      catalogue.queries, 20))


@pytest.mark.parametrize('case', CASES)
def test_k_beyond_the_products_pads(case, catalogue, tmp_path):
  rows = np.arange(len(catalogue.embeddings))
  backend, exact = make(case, tmp_path), reference(catalogue, rows)
  backend.add(*catalogue.rows(rows))
  for category in (NO_CATEGORY, 1):
    scores, products = backend.search(catalogue.queries[:2], 80, category)
    count = 60 if category < 0 else int((catalogue.product_category == category).sum())
    assert (products[:, :count] >= 0).all() and (products[:, count:] == -1).all()
    assert np.isfinite(scores[:, :count]).all() and (scores[:, count:] == -np.inf).all()
    assert_same((scores, products), exact.search(catalogue.queries[:2], 80, category))


@pytest.mark.parametrize('case', CASES)
def test_ties_rank_the_lower_product_first(case, catalogue, tmp_path):
  rows = np.arange(len(catalogue.embeddings))
  backend = make(case, tmp_path)
  backend.add(*catalogue.rows(rows))
  # Eight products gain one identical image each: more ties than a first fetch of rows or
  # groups holds, whichever end of the rows a backend lists ties from.
  twins = np.asarray([40, 7, 33, 21, 58, 12, 3, 9])
  twin = _unit(np.random.default_rng(1).standard_normal(DIM)).astype(np.float16)
  backend.add(len(rows) + np.arange(len(twins)), np.tile(twin, (len(twins), 1)), twins,
              np.full(len(twins), 2))
  query = twin[None].astype(np.float32)
  for k in (1, 3):
    scores, products = backend.search(query, k)
    assert list(products[0]) == [3, 7, 9][:k]
    assert scores[0, 0] == scores[0, k - 1]
  assert list(backend.search(query, 1, 2)[1][0]) == [3]


@pytest.mark.parametrize('case', CASES)
def test_save_and_open(case, catalogue, tmp_path):
  name, settings = CASES[case]
  settings = {key: value for key, value in settings.items() if key != 'path'}
  rows = np.flatnonzero(catalogue.row_product != 0)  # product 0 was removed
  backend = make(case, tmp_path, settings=settings)
  backend.add(*catalogue.rows(rows))
  before = backend.search(catalogue.queries, 5, 1)
  backend.save(str(tmp_path))
  index = FakeIndex(tmp_path, catalogue, name, settings, removed=0)
  opened = backends.get(name).open(index, centroids=False)
  assert len(opened) == len(rows)
  assert_same(opened.search(catalogue.queries, 5, 1), before)
  exact = backends.get('exact').open(index, centroids=True)
  centroids = backends.get(name).open(index, centroids=True)
  assert len(centroids) == len(catalogue.centroids) - 1
  for category in (NO_CATEGORY, int(catalogue.product_category[0])):
    got = centroids.search(catalogue.queries, 5, category)
    assert not (got[1] == 0).any()
    assert_same(got, exact.search(catalogue.queries, 5, category))


@pytest.mark.parametrize('case', ['faiss', 'faiss-ivf', 'faiss-hnsw', 'faiss-refined'])
def test_faiss_changes_a_mapped_index_and_saves_it_again(case, catalogue, tmp_path):
  rows = np.arange(len(catalogue.embeddings))
  backend = make(case, tmp_path)
  backend.add(*catalogue.rows(rows))
  backend.save(str(tmp_path))
  mapped = faiss_index.FaissBackend.load(str(tmp_path), CASES[case][1])
  gone = np.flatnonzero(catalogue.row_product == 0)
  mapped.remove(gone)
  mapped.save(str(tmp_path))
  kept = np.setdiff1d(rows, gone)
  want = reference(catalogue, kept).search(catalogue.queries, 5)
  assert_same(mapped.search(catalogue.queries, 5), want)
  assert_same(faiss_index.FaissBackend.load(str(tmp_path)).search(catalogue.queries, 5), want)


def test_faiss_default_index_follows_the_catalogue_size():
  assert faiss_index.default_factory(4000, 4000, 64) == 'Flat'
  # 4 sqrt(N) lists, but no fewer than 39 training rows each.
  assert faiss_index.default_factory(5000, 5000, 64) == 'IVF128,SQfp16'
  assert faiss_index.default_factory(200_000, 65536, 2048) == 'IVF1680,SQfp16'
  # From 2^18 rows: 4-bit PQ codes of a 256-dim rotation, candidates re-scored on float16.
  assert (faiss_index.default_factory(10**6, 65536, 2048) ==
          'PCAR256,IVF1680,PQ128x4fs,Refine(SQfp16)')
  assert faiss_index.default_factory(10**6, 10**6, 128) == 'IVF4000,PQ64x4fs,Refine(SQfp16)'
  assert faiss_index.default_factory(10**10, 10**7, 2048) == (
      'PCAR256,IVF65536,PQ128x4fs,Refine(SQfp16)')
  # Named codes ask for an IVF of them.
  assert faiss_index.default_factory(10**6, 10**6, 2048, 'SQ8') == 'IVF4000,SQ8'
  assert [faiss_index.default_nprobe(n) for n in (16, 128, 4000)] == [16, 16, 500]


@pytest.mark.parametrize('factory, fewest', [
    ('IVF8,Flat', 8), ('IVF2,PQ4x5', 32), ('IVF2,PQ8x4fs', 16), ('PQ4x6', 64),
    ('HNSW8,PQ4x5', 32), ('IVF4,Flat,Refine(PQ4x5)', 32), ('OPQ8,IVF2,SQ8', 256),
    ('PCAR16,IVF40,PQ8x4fs,Refine(SQfp16)', 40), ('HNSW8,SQfp16', 1)])
def test_faiss_check_refuses_exactly_the_factories_too_few_rows_cannot_train(factory, fewest):
  # What FAISS itself accepts: training on `fewest` rows works, on one fewer it fails.
  faiss = pytest.importorskip('faiss')
  rng = np.random.default_rng(0)
  for rows in {max(1, fewest - 1), fewest}:
    refused = None
    try:
      faiss_index.FaissBackend.check(32, rows, {'factory': factory})
    except ValueError as error:
      refused = str(error)
    index = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)
    try:
      index.train(rng.standard_normal((rows, 32)).astype(np.float32))
      trained = True
    except RuntimeError:
      trained = False
    assert trained == (rows >= fewest) and (refused is None) == trained, (rows, refused)
    if refused:
      assert f"faiss factory '{factory}' has {fewest} " in refused and '\n' not in refused


def test_unknown_settings_are_refused(tmp_path):
  for name in ('exact', 'faiss', 'qdrant'):
    with pytest.raises(ValueError, match=f"the {name} backend has no setting 'nprobes'"):
      backends.get(name).settings_for(str(tmp_path), {'nprobes': 4}, new=True)
  with pytest.raises(ValueError, match='nprobes'):  # FAISS's own check, when made directly
    backends.get('faiss').create(str(tmp_path), DIM, 'float16', {'nprobes': 4})


def test_backends_import_without_their_libraries():
  code = ("import sys; sys.modules['faiss'] = sys.modules['qdrant_client'] = None\n"
          'from fashion_jax.search import backends\n'
          "for name, package in (('faiss', 'faiss-cpu'), ('qdrant', 'qdrant-client')):\n"
          '  try:\n'
          "    backends.get(name).create('.', 4, 'float16', {})\n"
          '  except ImportError as e:\n'
          "    assert f'pip install {package}' in str(e) and '\\n' not in str(e), e\n"
          '  else:\n'
          '    raise AssertionError(name)\n')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


def clustered(num_rows=5000, dim=64, num_products=1500, seed=0):
  """Rows of products that lie near an 8-dimensional subspace, so that many products are
  close: (catalogue rows as add() takes them, queries [100, dim])."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.standard_normal((dim, 8)))[0]
  centres = _unit(rng.standard_normal((num_products, 8)) @ basis.T +
                  0.1 * rng.standard_normal((num_products, dim)))
  row_product = np.concatenate([np.arange(num_products),
                                rng.integers(0, num_products, num_rows - num_products)])
  vectors = _unit(centres[row_product] + 0.35 / np.sqrt(dim) * rng.standard_normal(
      (num_rows, dim))).astype(np.float16)
  row_category = rng.integers(0, 3, num_products)[row_product]
  queries = _unit(centres[rng.integers(0, num_products, 100)] +
                  0.25 / np.sqrt(dim) * rng.standard_normal((100, dim)))
  return (np.arange(num_rows), vectors, row_product, row_category), queries.astype(np.float32)


@pytest.mark.parametrize('name,settings,chunk,queries', [
    ('faiss', {}, 1000, 100),
    ('faiss', {'rows': 5000, 'train_rows': 2000}, 1000, 100),  # trained on the first 2 chunks
    ('faiss', {'train_rows': 2000}, 5000, 100),  # trained on a sample of the one chunk
    ('qdrant', {'path': ':memory:'}, 1000, 20),  # embedded Qdrant scans: checks the grouping
])
def test_ann_recall_at_10(name, settings, chunk, queries, tmp_path):
  rows, query = clustered()
  query = query[:queries]
  exact = backends.get('exact').create(None, 64, 'float16', {})
  exact.add(*rows)
  backend = backends.get(name).create(str(tmp_path), 64, 'float16', settings)
  for start in range(0, len(rows[0]), chunk):
    backend.add(*(part[start:start + chunk] for part in rows))
  for category in (NO_CATEGORY, 1):
    got = backend.search(query, 10, category)[1]
    want = exact.search(query, 10, category)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    print(f'{name} {settings} category {category}: product recall@10 {recall:.3f}')
    assert recall >= 0.95


def test_faiss_probes_more_lists_until_k_products_qualify():
  rows, query = clustered()
  backend = faiss_index.FaissBackend.create(None, 64, 'float16',
                                            {'factory': 'IVF64,SQfp16', 'nprobe': 1})
  backend.add(*rows)
  products = backend.search(query[:10], 300, 1)[1]
  assert (products >= 0).all()
  category_of = dict(zip(rows[2], rows[3]))
  assert all(category_of[p] == 1 for p in products.ravel())


@pytest.mark.parametrize('batched', [False, True])
def test_exact_compiles_a_few_sizes_for_a_catalogue_growing_row_by_row(batched):
  """A served index changes one product at a time: the exact backend pads its rows and products
  to a few sizes, so it does not compile (and keep) a search for every count, and its answers
  are a scan's, padding left out."""
  from fashion_jax.search.backends import exact as exact_module
  catalogue = Catalogue(seed=1, num_products=1000)
  backend = backends.get('exact').create(None, DIM, 'float16', {})
  backend.one_query_per_call = not batched
  queries = catalogue.queries[:4].astype(np.float16)
  before = exact_module._best_products._cache_size()
  first = 2000
  for count in range(first, first + 40):
    backend.add(*catalogue.rows(np.arange(first) if count == first else np.asarray([count - 1])))
    for category in (NO_CATEGORY, 2):
      scores, products = backend.search(queries, 3, category)
      rows = np.arange(count)
      if category >= 0:
        rows = rows[catalogue.row_category[rows] == category]
      similarity = queries.astype(np.float32) @ catalogue.embeddings[rows].astype(np.float32).T
      best = np.full((len(queries), catalogue.row_product.max() + 1), -np.inf, np.float32)
      np.maximum.at(best.T, catalogue.row_product[rows], similarity.T)
      want = np.argsort(-best, axis=1, kind='stable')[:, :3]
      np.testing.assert_array_equal(products, want)
      np.testing.assert_allclose(scores, np.take_along_axis(best, want, 1), atol=2e-3)
  compiled = exact_module._best_products._cache_size() - before
  # 40 row counts, 2000 ... 2039, all round to 2048 rows and one product count; padded only to
  # the devices' multiple they are 5 sizes, each with its product counts.
  assert compiled <= 1, compiled
