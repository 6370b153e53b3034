"""Qdrant search: the rows live in a Qdrant collection as float16 vectors under dot product,
each with its product and category as indexed payload. Needs `pip install qdrant-client`.

Settings: `url` of a Qdrant server or cluster (>= 1.16) with an optional `api_key`, or `path`
of qdrant-client's embedded storage (':memory:' for none; by default <index>/qdrant), which
scans every point and commits every written point to disk, so it suits tests and demos;
`collection`, by default the index directory's name; on a cluster, `shards` and `replicas`
(Qdrant's shard_number and replication_factor for the collections created). A point's id is its
row number, and the server holds the data: `save` writes nothing.
"""

import hashlib
import os
import re

import numpy as np

from fashion_jax.search.backends.base import NO_CATEGORY, Backend, register

SETTINGS = ('url', 'api_key', 'path', 'collection', 'shards', 'replicas')
_UPLOAD_BATCH = 256
# Embedded storage admits one client per folder and process: backends on one folder share it.
_EMBEDDED = {}


def _qdrant():
  try:
    import qdrant_client
  except ImportError:
    raise ImportError("the 'qdrant' search backend needs qdrant-client: "
                      'pip install qdrant-client') from None
  return qdrant_client


def _connect(directory: str, settings: dict):
  """(client, collection name) for an index directory and the backend's settings."""
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    raise ValueError(f'unknown qdrant settings {unknown}; known: {", ".join(SETTINGS)}')
  qdrant_client = _qdrant()
  name = os.path.basename(os.path.abspath(directory))
  collection = settings.get('collection') or re.sub(r'[^A-Za-z0-9_-]', '_', name)
  if settings.get('url'):
    client = qdrant_client.QdrantClient(url=settings['url'], api_key=settings.get('api_key'))
    return client, collection
  path = settings.get('path') or os.path.join(directory, 'qdrant')
  key = path if path == ':memory:' else os.path.realpath(path)
  if key not in _EMBEDDED:
    _EMBEDDED[key] = qdrant_client.QdrantClient(path=path)
  return _EMBEDDED[key], collection


@register
class QdrantBackend(Backend):
  """A client and the collection it searches."""

  name = 'qdrant'

  def __init__(self, client, collection: str, settings: dict | None = None):
    self._models = _qdrant().models
    self._client, self._collection = client, collection
    self._layout = {key: (settings or {}).get(setting) for key, setting in
                    (('shard_number', 'shards'), ('replication_factor', 'replicas'))}

  @classmethod
  def create(cls, directory, dim, dtype, settings):
    """A new, empty collection: one of the same name that is already there is replaced."""
    del dtype  # Qdrant keeps float16 vectors whatever the index holds
    backend = cls(*_connect(directory, settings), settings)
    backend._make(dim)
    return backend

  @classmethod
  def open(cls, index, *, centroids):
    """The index's collection; with `centroids` the '<collection>_centroids' collection of the
    live products, made from `index.centroids` when it is missing or holds other centroids."""
    settings = index.meta.get('backend_settings') or {}
    client, collection = _connect(index.directory, settings)
    if not centroids:
      if not client.collection_exists(collection):
        raise ValueError(f'qdrant has no collection {collection!r} for {index.directory}: '
                         'index the catalogue again with this backend')
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
    return self._client.count(self._collection, exact=True).count

  def add(self, rows, vectors, products, categories) -> None:
    payload = [{'product': int(p), 'category': int(c)} for p, c in zip(products, categories)]
    self._client.upload_collection(
        self._collection, vectors=np.asarray(vectors, np.float32), payload=payload,
        ids=[int(row) for row in rows], batch_size=_UPLOAD_BATCH, wait=True)

  def remove(self, rows) -> None:
    self._client.delete(self._collection, wait=True, points_selector=self._models.PointIdsList(
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
        groups = self._client.query_points_groups(
            self._collection, group_by='product', query=query.tolist(), query_filter=where,
            limit=limit, group_size=1, with_payload=False).groups
        if len(groups) < limit or groups[-1].hits[0].score < groups[k - 1].hits[0].score:
          break
        limit *= 2
      best = sorted((-group.hits[0].score, int(group.id)) for group in groups)[:k]
      scores[number, :len(best)] = [-score for score, _ in best]
      products[number, :len(best)] = [product for _, product in best]
    return scores, products
