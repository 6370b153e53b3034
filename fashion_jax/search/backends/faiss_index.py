"""FAISS search: an inverted file (IVF) over float16 codes, or over 4-bit PQ codes whose candidates
are re-scored on float16 copies, a flat scan for small catalogues, or any FAISS index_factory
string (HNSW, PQ, SQ8, OPQ, RFlat). Needs `pip install faiss-cpu`.

Settings (all optional): `factory` (an index_factory string, e.g. 'IVF1024,SQ8',
'IVF1024,PQ64', 'HNSW32,SQfp16'; it replaces the rule below), `codes` (the IVF's codes:
'SQfp16', 'SQ8', 'PQ<m>', 'Flat'; an IVF of them replaces the rule's re-scored index),
`nprobe` (IVF lists searched), `ef_search` (HNSW), `refine` (candidates fetched and re-scored
per result wanted, for a factory ending in Refine or RFlat), `rows` (the catalogue size to plan
for, when it is larger than the training sample) and `train_rows` (the training sample).

The default index, for N rows of D dims (`rows`, else the rows added before training):
  N < 4,096   Flat: scanning a few thousand rows costs less than any list structure, and is exact
  N < 2^18    IVF<nlist>,SQfp16 over spherical k-means lists (float16 codes: half of float32,
              lossless for a float16 index)
  otherwise   PCAR<d>,IVF<nlist>,PQ<d/2>x4fs,Refine(SQfp16): the lists hold 4-bit PQ codes of a
              d = min(D, 256)-dim PCA rotation (d/4 bytes a row, scanned with SIMD lookups, ~30x
              less to read than float16 codes at D = 2,048), and the best `refine` (8) times as
              many candidates as results are re-scored exactly on float16 copies of the rows
nlist = 4 sqrt(N), clamped to [16, 65,536] and to one list per 39 training rows (FAISS's
minimum); nprobe = max(16, nlist / 8), which keeps product recall@10 >= 0.95 on the clustered
test data (tests/search) and on the 1M-row benchmark (bench/search_bench.py); a category
filter that keeps a share s of the rows probes nprobe / s lists, and the filter is a FAISS ID
selector applied inside the scan.
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
SETTINGS = ('factory', 'codes', 'nprobe', 'ef_search', 'refine', 'rows', 'train_rows')
_FLAT_BELOW = 4096
_REFINED_FROM = 1 << 18  # rows: below, scanning float16 codes of nlist / 8 lists is fast enough
_REDUCED_DIM = 256  # of the PCA rotation whose PQ codes the lists hold
_REFINE = 8
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


def default_factory(rows: int, train_rows: int, dim: int, codes: str | None = None) -> str:
  """The index_factory string for a catalogue of `rows` rows of `dim` dims trained on
  `train_rows` rows (see the module docstring); `codes` asks for an IVF of those codes."""
  if rows < _FLAT_BELOW:
    return 'Flat'
  nlist = min(max(16, round(4 * math.sqrt(rows))), 65536)
  nlist = max(1, min(nlist, train_rows // _MIN_TRAIN_PER_LIST))
  reduced = min(dim, _REDUCED_DIM) // 2 * 2  # two dims per 4-bit sub-quantizer
  if codes is not None or rows < _REFINED_FROM or reduced < 8:
    return f'IVF{nlist},{codes or "SQfp16"}'
  rotation = f'PCAR{reduced},' if reduced < dim else ''
  return f'{rotation}IVF{nlist},PQ{reduced // 2}x4fs,Refine(SQfp16)'


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


def _reason(error: Exception) -> str:
  """An error's message in one line; FAISS's last line says why, after its C++ location."""
  lines = str(error).strip().splitlines()
  return (lines[-1].rsplit('Error: ', 1)[-1].strip() if lines else '') or type(error).__name__


def _check_names(settings: dict) -> None:
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    raise ValueError(f'unknown faiss settings {unknown}; known: {", ".join(SETTINGS)}')


def _train_rows(settings: dict, dim: int) -> int:
  """The most rows an index is trained on: `train_rows`, or what _TRAIN_BYTES holds, and no
  more than the catalogue's planned `rows`."""
  budget = settings.get('train_rows') or _TRAIN_BYTES // (4 * dim)
  return max(1, min(budget, settings.get('rows') or budget))


@register
class FaissBackend(Backend):
  """Row numbers are the FAISS ids: IVF lists hold ids themselves (an IndexIDMap2 over an IVF
  renumbers wrongly after `remove_ids`), every other index sits in an IndexIDMap2. HNSW and
  re-scored (Refine) indexes cannot remove vectors; their removed rows stay in the index and
  the search's ID selector skips them."""

  name = 'faiss'
  settings = SETTINGS

  def __init__(self, dim: int, dtype, settings: dict):
    _check_names(settings)
    self._faiss = _faiss()
    self._dim, self._dtype, self._settings = dim, np.dtype(dtype), dict(settings)
    self._index = None
    self._kind = None  # the search structure once built: 'ivf', 'hnsw' or 'flat'
    self._refined = False  # candidates re-scored by an IndexRefine
    self._mapped = None  # the file the index is memory-mapped from, until it is changed
    self._pending = []  # (rows, vectors) added before training
    self._product = np.zeros(0, np.int64)  # [R] by row number
    self._category = np.zeros(0, np.int32)
    self._held = np.zeros(0, bool)
    self._rows_per_product = None
    self._selectors = {}  # category -> (rows allowed, their ID selector), until rows change

  @classmethod
  def create(cls, directory, dim, dtype, settings):
    del directory
    return cls(dim, dtype, settings)

  @classmethod
  def check(cls, dim, rows, settings):
    """FAISS is installed, the settings' names are known, FAISS parses the factory string (a
    given one, or the rule's with the `codes` setting) for `dim` dims, and the rows it would be
    trained on are enough: one per IVF list, and 2^bits per PQ code book."""
    faiss = _faiss()
    _check_names(settings)
    given = settings.get('factory')
    if given and given.startswith('IDMap'):
      raise ValueError(f'faiss factory {given!r}: leave out IDMap, the backend adds ids itself')
    train = min(rows, _train_rows(settings, dim))  # as _build samples the rows first added
    factory = given or default_factory(max(settings.get('rows') or 0, rows), train, dim,
                                       settings.get('codes'))
    try:
      index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:  # FAISS's message: its C++ function and line, then why
      reason = str(error).strip().splitlines()[0].rsplit(': ', 1)[-1]
      what = f'faiss factory {factory!r}' if given else f'faiss codes {settings.get("codes")!r}'
      raise ValueError(f'{what} for {dim} dims: {reason}') from None
    needed, part = _min_train_rows(faiss, index)
    if train < needed:
      fix = 'fewer lists (IVF<n>)' if part == 'lists' else 'fewer bits per code (PQ<m>x4)'
      raise ValueError(f'faiss factory {factory!r} has {needed} {part}, more than the {train} '
                       f'rows it would be trained on; choose {fix} or index more images')

  @classmethod
  def open(cls, index, *, centroids):
    settings = index.meta.get('backend_settings') or {}
    if not centroids:
      return cls.load(index.backend_directory, settings)
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
    try:
      with np.load(os.path.join(directory, ROWS_FILE), allow_pickle=False) as saved:
        mapped_lists = str(saved['kind']) == 'ivf'  # an IVF holding its ids: lists mmap
        product, category, held = saved['product'], saved['category'], saved['held']
    except Exception as error:  # noqa: BLE001 (zipfile, EOF, key and value errors)
      raise ValueError(f'{ROWS_FILE} cannot be read ({_reason(error)}) (damaged index)') from None
    path = os.path.join(directory, INDEX_FILE)
    # FAISS releases without IO_FLAG_MMAP_IFC read flat and HNSW indexes whole.
    flag = faiss.IO_FLAG_MMAP if mapped_lists else getattr(faiss, 'IO_FLAG_MMAP_IFC', 0)
    try:
      index = faiss.read_index(path, flag | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as error:
      raise ValueError(f'{INDEX_FILE} cannot be read ({_reason(error)}) (damaged index)') from None
    if not (len(product) == len(category) == len(held)) or index.d < 1:
      raise ValueError(f'{ROWS_FILE} and {INDEX_FILE} do not agree (damaged index)')
    backend = cls(index.d, np.float32, settings or {})
    backend._index, backend._mapped = index, path
    backend._kind, backend._refined = _structure(faiss, index)
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
    self._changed()
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
    self._changed()
    if self._index is None:
      kept = []
      for held_rows, vectors in self._pending:
        keep = ~np.isin(held_rows, rows)
        kept.append((held_rows[keep], vectors[keep]))
      self._pending = kept
    elif self._kind != 'hnsw' and not self._refined:
      self._writable().remove_ids(self._faiss.IDSelectorBatch(rows))

  def save(self, directory) -> None:
    self._ready()
    # Written beside and renamed over: a backend that maps the old file keeps reading it.
    index_path, rows_path = (os.path.join(directory, name) for name in (INDEX_FILE, ROWS_FILE))
    # A mapped IVF would be written as a reference to its on-disk lists, not as the lists.
    self._faiss.write_index(self._writable(), index_path + '.tmp')
    with open(rows_path + '.tmp', 'wb') as f:
      np.savez(f, kind=np.array('refine' if self._refined else self._kind),
               product=self._product, category=self._category, held=self._held)
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
    qualifying, selector = self._selector(category)
    if not qualifying or not k:
      return scores, products
    params = {} if selector is None else {'sel': selector}
    reach, most = self._reach()
    # The k-th allowed neighbour lies about as deep as the (k / share)-th of all rows: probe
    # (or explore) as much more as the filter keeps fewer rows.
    reach = min(most, math.ceil(reach * self._selector(NO_CATEGORY)[0] / qualifying))
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

  def describe(self) -> str:
    """The index's layers and search settings, e.g. 'IndexIDMap2 > IndexRefine >
    IndexPreTransform > IndexIVFPQFastScan; nlist 1680, nprobe 210, refine 8'."""
    self._ready()
    names = ' > '.join(type(layer).__name__ for layer in _layers(self._faiss, self._index))
    reach, most = self._reach()
    settings = {'ivf': f'nlist {most}, nprobe {reach}', 'hnsw': f'efSearch {reach}'}.get(
        self._kind)
    if self._refined:
      refine = f"refine {self._settings.get('refine') or _REFINE:g}"
      settings = f'{settings}, {refine}' if settings else refine
    return f'{names}; {settings}' if settings else names

  def _selector(self, category):
    """(rows allowed, the ID selector that keeps them, or None when every row FAISS holds
    is): the query's category among the rows held. Packing a bitmap of a large catalogue
    costs about what a search does, so each category's is kept until the rows change."""
    if category not in self._selectors:
      allowed = self._held if category < 0 else self._held & (self._category == category)
      qualifying = int(allowed.sum())
      # Rows that HNSW (or a Refine index) still holds but were removed need the selector even
      # without a category.
      selector = None
      if category >= 0 or (self._index is not None and self._index.ntotal > qualifying):
        if self._refined:
          # The selector reaches the Refine's base index unchanged, where ids are positions
          # in the IndexIDMap2, not rows (the IDMap translates only its own parameters').
          allowed = allowed[self._faiss.vector_to_array(self._index.id_map)]
        selector = self._faiss.IDSelectorBitmap(np.packbits(allowed, bitorder='little'))
      self._selectors[category] = (qualifying, selector)
    return self._selectors[category]

  def _changed(self):
    self._rows_per_product = None
    self._selectors = {}

  def _params(self, reach, params):
    if self._kind == 'ivf':
      base = self._faiss.SearchParametersIVF(nprobe=reach, **params)
    elif self._kind == 'hnsw':
      base = self._faiss.SearchParametersHNSW(efSearch=reach, **params)
    else:
      base = self._faiss.SearchParameters(**params) if params else None
    if not self._refined:
      return base
    refine = self._faiss.IndexRefineSearchParameters(
        k_factor=float(self._settings.get('refine') or _REFINE))
    if base is not None:
      refine.base_index_params = base
    return refine

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
    return _train_rows(self._settings, self._dim)

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
        self._dim, self._settings.get('codes'))
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
    self._kind, self._refined = _structure(faiss, index)
    # Only an IVF (bare or behind a rotation) keeps the ids it is given, and removes rows.
    if self._kind != 'ivf' or self._refined:
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


def _layers(faiss, index) -> list:
  """The index and those it wraps, outermost first (an IndexRefine's base, not its copies)."""
  layers = []
  while index is not None:
    index = faiss.downcast_index(index)
    layers.append(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
      index = index.index
    elif isinstance(index, faiss.IndexRefine):
      index = index.base_index
    else:
      index = None
  return layers


def _min_train_rows(faiss, index) -> tuple[int, str]:
  """(the fewest training rows FAISS accepts for `index`, what needs them: 'lists' or 'PQ
  centroids'): an IVF's list count, and 2^bits for each product quantizer's code book, whether
  in the index, its re-scoring index, its HNSW storage or an OPQ rotation (8 bits)."""
  needs = [(1, 'lists')]
  stack = [index]
  while stack:
    layer = faiss.downcast_index(stack.pop())
    if isinstance(layer, faiss.IndexIVF):
      needs.append((layer.nlist, 'lists'))
    if getattr(layer, 'pq', None) is not None:
      needs.append((layer.pq.ksub, 'PQ centroids'))
    if isinstance(layer, faiss.IndexPreTransform):
      for position in range(layer.chain.size()):
        transform = faiss.downcast_VectorTransform(layer.chain.at(position))
        if isinstance(transform, faiss.OPQMatrix):
          needs.append((transform.pq.ksub if transform.pq else 256, 'PQ centroids'))
    for inner in ('index', 'base_index', 'refine_index', 'storage'):
      if isinstance(layer, (faiss.IndexPreTransform, faiss.IndexRefine, faiss.IndexHNSW,
                            faiss.IndexIDMap, faiss.IndexIDMap2)) and getattr(layer, inner, None):
        stack.append(getattr(layer, inner))
  return max(needs)


def _structure(faiss, index) -> tuple[str, bool]:
  """(the search structure: 'ivf', 'hnsw' or 'flat'; whether an IndexRefine re-scores its
  candidates) of an index and the indexes it wraps."""
  layers = _layers(faiss, index)
  kind = ('ivf' if any(isinstance(layer, faiss.IndexIVF) for layer in layers) else
          'hnsw' if any(isinstance(layer, faiss.IndexHNSW) for layer in layers) else 'flat')
  return kind, any(isinstance(layer, faiss.IndexRefine) for layer in layers)
