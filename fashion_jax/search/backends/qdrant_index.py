"""Qdrant search: the rows live in a Qdrant collection as float16 vectors under dot product,
each with its product and category as indexed payload. Needs `pip install qdrant-client`.

Settings: `url` of a Qdrant server or cluster (>= 1.16) with an optional `api_key`, or `path`
of qdrant-client's embedded storage (':memory:' for none; by default <index>/qdrant), which
scans every point and commits every written point to disk, so it suits tests and demos;
`collection`; on a cluster, `shards` and `replicas` (Qdrant's shard_number and
replication_factor for the collections created). A point's id is its row number, and the
server holds the data: `save` writes nothing.

A new index records its collection's name in index.json: by default the index folder's name and
a random suffix, so that two indexes never share one by accident (not even a new index at the
path a moved one had). Creating an index never replaces a collection that exists. A copied or
moved index keeps using its collection; copies then share it.
"""

import contextlib
import hashlib
import os
import re
import uuid
import warnings

import numpy as np

from fashion_jax.search.backends.base import NO_CATEGORY, Backend, BackendError, register

SETTINGS = ('url', 'api_key', 'path', 'collection', 'shards', 'replicas')
_UPLOAD_BATCH = 256
_COLLECTION_NAME = re.compile(r'^[A-Za-z0-9_-]{1,200}$')
# Embedded storage admits one client per folder and process: backends on one folder share it.
_EMBEDDED = {}
# qdrant-client's notices that say nothing to act on: an unreachable server is reported by the
# error that follows, and embedded storage scans whatever the payload indexes.
warnings.filterwarnings('ignore', message='Failed to obtain server version')
warnings.filterwarnings('ignore', message='Payload indexes have no effect in the local Qdrant')


def _qdrant():
  try:
    import qdrant_client
  except ImportError:
    raise ImportError("the 'qdrant' search backend needs qdrant-client: "
                      'pip install qdrant-client') from None
  return qdrant_client


def _where(settings: dict) -> str:
  return f"qdrant at {settings['url']}" if settings.get('url') else 'qdrant'


@contextlib.contextmanager
def _service(settings: dict):
  """Qdrant's refusals and unreachable servers as one-line BackendErrors."""
  exceptions = _qdrant().http.exceptions
  try:
    yield
  except exceptions.ApiException as error:
    reason = ' '.join(str(error).split())[:300] or type(error).__name__
    raise BackendError(f'{_where(settings)}: {reason}') from None
  except RuntimeError as error:  # embedded storage another process holds
    if 'already accessed' not in str(error):
      raise
    raise BackendError(f"{_where(settings)}: {' '.join(str(error).split())} (a running "
                       "`serve` holds it: stop it, or use a Qdrant server)") from None


def _connect(directory: str, settings: dict):
  """(client, collection name) for an index directory and the backend's recorded settings.
  An index recorded before collections were named there uses its folder's name."""
  qdrant_client = _qdrant()
  collection = settings.get('collection') or re.sub(
      r'[^A-Za-z0-9_-]', '_', os.path.basename(os.path.abspath(directory)))
  if settings.get('url'):
    client = qdrant_client.QdrantClient(url=settings['url'], api_key=settings.get('api_key'))
    return client, collection
  path = settings.get('path') or os.path.join(directory, 'qdrant')
  key = path if path == ':memory:' else os.path.realpath(path)
  if key not in _EMBEDDED:
    with _service(settings):
      _EMBEDDED[key] = qdrant_client.QdrantClient(path=path)
  return _EMBEDDED[key], collection


def _existing(index):
  """(client, collection, settings) of an existing index; a BackendError when its collection
  cannot be reached or is gone."""
  settings = index.meta.get('backend_settings') or {}
  client, collection = _connect(index.directory, settings)
  with _service(settings):
    if not client.collection_exists(collection):
      raise BackendError(f'{_where(settings)} has no collection {collection!r} for '
                         f'{index.directory}: index the catalogue again with this backend')
  return client, collection, settings


def _owner(directory: str) -> str:
  return os.path.realpath(directory)


@register
class QdrantBackend(Backend):
  """A client and the collection it searches."""

  name = 'qdrant'
  settings = SETTINGS

  def __init__(self, client, collection: str, settings: dict | None = None):
    self._models = _qdrant().models
    self._client, self._collection = client, collection
    self._settings = dict(settings or {})
    self._layout = {key: self._settings.get(setting) for key, setting in
                    (('shard_number', 'shards'), ('replication_factor', 'replicas'))}

  @classmethod
  def settings_for(cls, directory, settings, *, new):
    """Checks the names and the collection's; `path` made absolute (':memory:' aside). A new
    index gets its collection's name and, where the storage exists already (a server, a
    given path), the server is asked whether that collection belongs to another index."""
    settings = super().settings_for(directory, settings, new=new)
    if settings.get('url') and settings.get('path'):
      raise ValueError('give qdrant a url (a server) or a path (embedded storage), not both')
    if settings.get('path') and settings['path'] != ':memory:':
      settings['path'] = os.path.abspath(settings['path'])
    if 'collection' in settings and not _COLLECTION_NAME.match(str(settings['collection'])):
      raise ValueError(f"qdrant collection name {settings['collection']!r}: use 1-200 letters, "
                       'digits, _ or -')
    if new:
      if 'collection' not in settings:
        folder = re.sub(r'[^A-Za-z0-9_-]', '_', os.path.basename(_owner(directory)))[:150]
        settings['collection'] = f'{folder}-{uuid.uuid4().hex[:8]}'
      if settings.get('url') or settings.get('path'):
        cls(*_connect(directory, settings), settings)._check_free()
    return settings

  @classmethod
  def check_open(cls, index):
    _existing(index)

  def _check_free(self) -> None:
    """A BackendError when the collection exists: a new index never takes one over."""
    with _service(self._settings):
      if not self._client.collection_exists(self._collection):
        return
      metadata = self._client.get_collection(self._collection).config.metadata or {}
    made_for = f"made for {metadata['index']}" if metadata.get('index') else 'not made by an index'
    raise BackendError(
        f'{_where(self._settings)} already has a collection {self._collection!r} ({made_for}): '
        'name another with --collection, or delete that one')

  @classmethod
  def create(cls, directory, dim, dtype, settings):
    """A new, empty collection, which records the index folder it was made for."""
    del dtype  # Qdrant keeps float16 vectors whatever the index holds
    backend = cls(*_connect(directory, settings), settings)
    backend._check_free()
    backend._make(dim, metadata={'index': _owner(directory)})
    return backend

  @classmethod
  def open(cls, index, *, centroids):
    """The index's collection; with `centroids` the '<collection>_centroids' collection of the
    live products, made from `index.centroids` when it is missing or holds other centroids."""
    client, collection, settings = _existing(index)
    with _service(settings):
      size, dim = client.get_collection(collection).config.params.vectors.size, \
          index.embeddings.shape[1]
      if size != dim:
        raise BackendError(f'{_where(settings)}: collection {collection!r} holds {size}-dim '
                           f'vectors, the index {dim} (changed outside this index): index the '
                           'catalogue again')
      if not centroids:
        return cls(client, collection, settings)
      backend = cls(client, f'{collection}_centroids', settings)
      vectors = np.ascontiguousarray(index.centroids, np.float32)  # a removed product's are 0
      digest = hashlib.blake2b(vectors.data, digest_size=16).hexdigest()
      if (not client.collection_exists(backend._collection) or
          (client.get_collection(backend._collection).config.metadata or {}).get('centroids')
          != digest):
        backend._make(vectors.shape[1], metadata={'centroids': digest})
        products = np.flatnonzero(index.product_live)
        backend.add(products, vectors[products], products, index.product_category[products])
    return backend

  def _make(self, dim: int, metadata: dict | None = None) -> None:
    models = self._models
    with _service(self._settings):
      if self._client.collection_exists(self._collection):
        self._client.delete_collection(self._collection)
      self._client.create_collection(
          self._collection, metadata=metadata,
          **{key: value for key, value in self._layout.items() if value is not None},
          vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT,
                                             datatype=models.Datatype.FLOAT16))
      for field in ('product', 'category'):
        self._client.create_payload_index(self._collection, field,
                                          field_schema=models.PayloadSchemaType.INTEGER)

  def __len__(self) -> int:
    with _service(self._settings):
      return self._client.count(self._collection, exact=True).count

  def add(self, rows, vectors, products, categories) -> None:
    payload = [{'product': int(p), 'category': int(c)} for p, c in zip(products, categories)]
    with _service(self._settings):
      self._client.upload_collection(
          self._collection, vectors=np.asarray(vectors, np.float32), payload=payload,
          ids=[int(row) for row in rows], batch_size=_UPLOAD_BATCH, wait=True)

  def remove(self, rows) -> None:
    with _service(self._settings):
      self._client.delete(self._collection, wait=True,
                          points_selector=self._models.PointIdsList(
                              points=[int(row) for row in rows]))

  def search(self, queries, k, category=NO_CATEGORY):
    """Qdrant's grouping search answers products: each group is a product with its best row.
    One group past the k-th is asked for, and more while the last one ties the k-th, so that
    equal scores can rank the lower product number first."""
    models = self._models
    scores = np.full((len(queries), k), -np.inf, np.float32)
    products = np.full((len(queries), k), -1, np.int64)
    if not k:
      return scores, products
    where = None if category < 0 else models.Filter(must=[models.FieldCondition(
        key='category', match=models.MatchValue(value=int(category)))])
    for number, query in enumerate(np.asarray(queries, np.float32)):
      limit = k + 1
      while True:
        with _service(self._settings):
          groups = self._client.query_points_groups(
              self._collection, group_by='product', query=query.tolist(),
              query_filter=where, limit=limit, group_size=1, with_payload=False).groups
        if len(groups) < limit or groups[-1].hits[0].score < groups[k - 1].hits[0].score:
          break
        limit *= 2
      best = sorted((-group.hits[0].score, int(group.id)) for group in groups)[:k]
      scores[number, :len(best)] = [-score for score, _ in best]
      products[number, :len(best)] = [product for _, product in best]
    return scores, products
