"""FAISS search: an inverted file (IVF) of float16 codes, a flat scan for small catalogues, or
any FAISS index_factory string (HNSW, PQ, SQ8). Needs `pip install faiss-cpu`.

Settings (all optional): `factory` (an index_factory string, e.g. 'IVF1024,SQ8',
'IVF1024,PQ64', 'HNSW32,SQfp16'; it replaces the rule below), `codes` (the IVF's codes:
'SQfp16', 'SQ8', 'PQ<m>', 'Flat'), `nprobe` (IVF lists searched), `ef_search` (HNSW),
`rows` (the catalogue size to plan for, when it is larger than the training sample) and
`train_rows` (the training sample).

The default index, for N rows (`rows`, else the rows added before training):
  N < 4,096   Flat: scanning a few thousand rows costs less than any list structure, and is exact
  otherwise   IVF<nlist>,SQfp16 over spherical k-means lists (float16 codes: half of float32,
              lossless for a float16 index); nlist = 4 sqrt(N), clamped to [16, 65,536] and to
              one list per 39 training rows (FAISS's minimum); nprobe = max(16, nlist / 8), which
              keeps product recall@10 >= 0.95 on the clustered test data (tests/search), and a
              category filter that keeps a share s of the rows probes nprobe / s lists.
Training waits for the training sample (`train_rows`, by default what 512 MiB of float32 holds,
capped at N), so a catalogue larger than memory is indexed in chunks: the first chunks fill the
sample, the index is trained on it, and every later chunk goes straight in.
"""

import math
import os

import numpy as np

from fashion_jax.search.backends.base import NO_CATEGORY, Backend, register

INDEX_FILE = 'faiss.index'
ROWS_FILE = 'faiss_rows.npz'  # each row's product, category and whether it is held
SETTINGS = ('factory', 'codes', 'nprobe', 'ef_search', 'rows', 'train_rows')
_FLAT_BELOW = 4096
_MIN_TRAIN_PER_LIST = 39  # FAISS warns and clusters poorly below this many points per list
_TRAIN_BYTES = 512 * 2**20
_ADD_CHUNK = 65536  # rows converted to float32 and added at a time
_EF_SEARCH = 128


def _faiss():
  try:
    import faiss
  except ImportError:
    raise ImportError("the 'faiss' search backend needs FAISS: pip install faiss-cpu") from None
  return faiss


def default_factory(rows: int, train_rows: int, codes: str = 'SQfp16') -> str:
  """The index_factory string for a catalogue of `rows` rows trained on `train_rows` rows."""
  if rows < _FLAT_BELOW:
    return 'Flat'
  nlist = min(max(16, round(4 * math.sqrt(rows))), 65536)
  nlist = max(1, min(nlist, train_rows // _MIN_TRAIN_PER_LIST))
  return f'IVF{nlist},{codes}'


def default_nprobe(nlist: int) -> int:
  return min(nlist, max(16, nlist // 8))


def _collapse(scores, rows, row_product, k):
  """The best k products among fetched rows (scores [F] best first, rows [F], -1 past the end):
  each product keeps its best row; equal scores put the lower product first.

  Returns (scores [<= k] float32, products [<= k] int64), best first.
  """
  found = rows >= 0
  scores, products = scores[found], row_product[rows[found]]
  order = np.lexsort((products, -scores))
  scores, products = scores[order], products[order]
  _, first = np.unique(products, return_index=True)
  first = np.sort(first)[:k]
  return scores[first], products[first]


@register
class FaissBackend(Backend):
  """Row numbers are the FAISS ids: IVF lists hold ids themselves (an IndexIDMap2 over an IVF
  renumbers wrongly after `remove_ids`), every other index sits in an IndexIDMap2. HNSW cannot
  remove vectors; its removed rows stay in the graph and the search's ID selector skips them."""

  name = 'faiss'

  def __init__(self, dim: int, dtype, settings: dict):
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
      raise ValueError(f'unknown faiss settings {unknown}; known: {", ".join(SETTINGS)}')
    self._faiss = _faiss()
    self._dim, self._dtype, self._settings = dim, np.dtype(dtype), dict(settings)
    self._index = None
    self._kind = None  # 'ivf', 'hnsw' or 'flat' once built
    self._mapped = None  # the file the index is memory-mapped from, until it is changed
    self._pending = []  # (rows, vectors) added before training
    self._product = np.zeros(0, np.int64)  # [R] by row number
    self._category = np.zeros(0, np.int32)
    self._held = np.zeros(0, bool)
    self._rows_per_product = None

  @classmethod
  def create(cls, directory, dim, dtype, settings):
    del directory
    return cls(dim, dtype, settings)

  @classmethod
  def open(cls, index, *, centroids):
    settings = index.meta.get('backend_settings') or {}
    if not centroids:
      return cls.load(index.directory, settings)
    # One row per product is small: an exact scan in memory, whatever the images use.
    products = np.flatnonzero(index.product_live)
    backend = cls(index.centroids.shape[1], np.float32, {'factory': 'Flat'})
    backend.add(products, index.centroids[products], products, index.product_category[products])
    return backend

  @classmethod
  def load(cls, directory: str, settings: dict | None = None) -> 'FaissBackend':
    """The index `save` wrote to `directory`, memory-mapped: an IVF's lists as FAISS's
    read-only on-disk lists, other indexes' codes in place. It is read into memory before
    its first change."""
    faiss = _faiss()
    if not os.path.exists(os.path.join(directory, ROWS_FILE)):
      raise FileNotFoundError(f'{directory}: no FAISS index ({ROWS_FILE}): index the catalogue '
                              'again with this backend')
    with np.load(os.path.join(directory, ROWS_FILE)) as saved:
      kind = str(saved['kind'])
      product, category, held = saved['product'], saved['category'], saved['held']
    path = os.path.join(directory, INDEX_FILE)
    # FAISS releases without IO_FLAG_MMAP_IFC read flat and HNSW indexes whole.
    flag = faiss.IO_FLAG_MMAP if kind == 'ivf' else getattr(faiss, 'IO_FLAG_MMAP_IFC', 0)
    index = faiss.read_index(path, flag | faiss.IO_FLAG_READ_ONLY)
    backend = cls(index.d, np.float32, settings or {})
    backend._index, backend._kind, backend._mapped = index, kind, path
    backend._product, backend._category, backend._held = product, category, held
    return backend

  def __len__(self) -> int:
    return int(self._held.sum())

  def add(self, rows, vectors, products, categories) -> None:
    rows = np.asarray(rows, np.int64)
    if not len(rows):
      return
    self._fit(int(rows.max()) + 1)
    self._product[rows] = products
    self._category[rows] = categories
    self._held[rows] = True
    self._rows_per_product = None
    if self._index is None:
      self._pending.append((rows, np.asarray(vectors, self._dtype)))
      if sum(len(r) for r, _ in self._pending) >= self._train_rows():
        self._build()
    else:
      self._insert(rows, vectors)

  def remove(self, rows) -> None:
    rows = np.asarray(rows, np.int64)
    rows = rows[rows < len(self._held)]
    self._held[rows] = False
    self._rows_per_product = None
    if self._index is None:
      kept = []
      for held_rows, vectors in self._pending:
        keep = ~np.isin(held_rows, rows)
        kept.append((held_rows[keep], vectors[keep]))
      self._pending = kept
    elif self._kind != 'hnsw':
      self._writable().remove_ids(self._faiss.IDSelectorBatch(rows))

  def save(self, directory) -> None:
    self._ready()
    # Written beside and renamed over: a backend that maps the old file keeps reading it.
    index_path, rows_path = (os.path.join(directory, name) for name in (INDEX_FILE, ROWS_FILE))
    # A mapped IVF would be written as a reference to its on-disk lists, not as the lists.
    self._faiss.write_index(self._writable(), index_path + '.tmp')
    with open(rows_path + '.tmp', 'wb') as f:
      np.savez(f, kind=np.array(self._kind), product=self._product, category=self._category,
               held=self._held)
    os.replace(index_path + '.tmp', index_path)
    os.replace(rows_path + '.tmp', rows_path)

  def search(self, queries, k, category=NO_CATEGORY):
    """Rows come back from FAISS and collapse to products. The fetch starts at twice k
    products' worth of rows and doubles until k products are known, and no row left unseen
    could tie the k-th, or every allowed row is seen; when the probed lists (or HNSW's
    candidate list) run out first, nprobe (efSearch) doubles too."""
    queries = np.ascontiguousarray(queries, np.float32)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    products = np.full((len(queries), k), -1, np.int64)
    self._ready()
    allowed = self._held if category < 0 else self._held & (self._category == category)
    qualifying = int(allowed.sum())
    if not qualifying or not k:
      return scores, products
    params = {}
    # Rows that HNSW still holds but were removed need the selector even without a category.
    if category >= 0 or self._index.ntotal > qualifying:
      params['sel'] = self._faiss.IDSelectorBitmap(np.packbits(allowed, bitorder='little'))
    reach, most = self._reach()
    # The k-th allowed neighbour lies about as deep as the (k / share)-th of all rows: probe
    # (or explore) as much more as the filter keeps fewer rows.
    reach = min(most, math.ceil(reach * int(self._held.sum()) / qualifying))
    fetch = min(qualifying, math.ceil(2 * k * self._products_spread()))
    pending = np.arange(len(queries))
    while len(pending):
      found_scores, found_rows = self._index.search(
          queries[pending], fetch, params=self._params(reach, params))
      settled, starved = [], False
      for number, query in enumerate(pending):
        seen = int((found_rows[number] >= 0).sum())
        best, found = _collapse(found_scores[number], found_rows[number], self._product, k)
        complete = len(found) == k and found_scores[number, seen - 1] < best[-1]
        if complete or seen == qualifying or (fetch == qualifying and reach == most):
          scores[query, :len(best)], products[query, :len(found)] = best, found
          settled.append(number)
        else:
          starved |= seen < fetch
      pending = np.delete(pending, settled)
      if starved:
        reach = min(2 * reach, most)
      fetch = min(2 * fetch, qualifying)
    return scores, products

  def _params(self, reach, params):
    if self._kind == 'ivf':
      return self._faiss.SearchParametersIVF(nprobe=reach, **params)
    if self._kind == 'hnsw':
      return self._faiss.SearchParametersHNSW(efSearch=reach, **params)
    return self._faiss.SearchParameters(**params) if params else None

  def _reach(self):
    """(the nprobe or efSearch to start from, the most it grows to); 1 and 1 for a scan."""
    if self._kind == 'ivf':
      nlist = self._faiss.extract_index_ivf(self._index).nlist
      return min(nlist, self._settings.get('nprobe') or default_nprobe(nlist)), nlist
    if self._kind == 'hnsw':
      most = max(self._index.ntotal, 1)
      return min(most, self._settings.get('ef_search') or _EF_SEARCH), most
    return 1, 1

  def _products_spread(self) -> float:
    """Rows per product held, to size the first fetch."""
    if self._rows_per_product is None:
      held = self._product[self._held]
      self._rows_per_product = len(held) / max(1, len(np.unique(held)))
    return self._rows_per_product

  def _fit(self, size):
    grow = size - len(self._held)
    if grow > 0:
      self._product = np.concatenate([self._product, np.full(grow, -1, np.int64)])
      self._category = np.concatenate([self._category, np.full(grow, NO_CATEGORY, np.int32)])
      self._held = np.concatenate([self._held, np.zeros(grow, bool)])

  def _train_rows(self) -> int:
    budget = self._settings.get('train_rows') or _TRAIN_BYTES // (4 * self._dim)
    return max(1, min(budget, self._settings.get('rows') or budget))

  def _ready(self):
    if self._index is None:
      self._build()

  def _build(self):
    """Makes the index from the rows added so far, trains it on them (a fixed random sample
    of `train_rows` when there are more) and adds them."""
    faiss = self._faiss
    rows = np.concatenate([r for r, _ in self._pending] or [np.zeros(0, np.int64)])
    vectors = np.concatenate([v for _, v in self._pending] or [np.zeros((0, self._dim))])
    self._pending = []
    factory = self._settings.get('factory') or default_factory(
        max(self._settings.get('rows') or 0, len(rows)), min(len(rows), self._train_rows()),
        self._settings.get('codes') or 'SQfp16')
    if factory.startswith('IDMap'):
      raise ValueError(f'faiss factory {factory!r}: leave out IDMap, the backend adds ids itself')
    index = faiss.index_factory(self._dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
      ivf.cp.spherical = True  # unit vectors: list centres on the sphere suit inner products
      ivf = faiss.downcast_index(ivf)
      if (isinstance(ivf, faiss.IndexIVFScalarQuantizer) and
          ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16):
        # float16 codes of the vectors themselves (not of their offsets from the list centre)
        # hold a float16 index exactly.
        ivf.by_residual = False
      self._kind = 'ivf'
    else:
      self._kind = 'hnsw' if isinstance(index, faiss.IndexHNSW) else 'flat'
      index = faiss.IndexIDMap2(index)
    if not index.is_trained:
      sample = vectors
      if len(rows) > self._train_rows():
        picked = np.random.default_rng(0).choice(len(rows), self._train_rows(), replace=False)
        sample = vectors[np.sort(picked)]
      index.train(np.ascontiguousarray(sample, np.float32))
    self._index = index
    self._insert(rows, vectors)

  def _insert(self, rows, vectors):
    index = self._writable()
    for start in range(0, len(rows), _ADD_CHUNK):
      part = slice(start, start + _ADD_CHUNK)
      index.add_with_ids(np.ascontiguousarray(vectors[part], np.float32), rows[part])

  def _writable(self):
    """The index, read into memory first if it is mapped: FAISS aborts the process when a
    mapped index is changed."""
    if self._mapped is not None:
      self._index = self._faiss.read_index(self._mapped)
      self._mapped = None
    return self._index
