"""Searching an index: photos -> embeddings -> the best products, and the result pictures.

Products, not images, are ranked: a product scores the best similarity of its images (or of its
centroid when the index has them), so several images of one product appear once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageDraw

from fashion_jax.search import images as image_io
from fashion_jax.search import index as search_index
from fashion_jax.search.images import InputError


@functools.partial(jax.jit, static_argnames=('k', 'num_products'))
def _best_products(queries, gallery, row_product, row_category, category, *, k, num_products):
  """Top-k products of each query by cosine similarity (unit vectors: the same order as
  Euclidean distance); rows outside `category` (when >= 0) are left out.

  Returns (scores [Q, k] float32, -inf where fewer products qualify; products [Q, k] int32).
  """
  similarity = jnp.matmul(queries.astype(gallery.dtype), gallery.T,
                          preferred_element_type=jnp.float32)
  allowed = (category < 0) | (row_category == category)
  similarity = jnp.where(allowed[None, :], similarity, -jnp.inf)
  # Padding rows belong to an extra product, dropped here.
  per_product = jax.ops.segment_max(similarity.T, row_product, num_segments=num_products + 1,
                                    indices_are_sorted=False).T[:, :num_products]
  return jax.lax.top_k(per_product, k)


class Searcher:
  """An index and the model that built it, ready to answer queries (thread-safe)."""

  def __init__(self, index: search_index.SearchIndex, model, *, use_centroids: bool | None = None,
               max_pixels: int = image_io.DEFAULT_MAX_PIXELS):
    search_index.check_model(index.meta, model)
    self.index, self.model, self.max_pixels = index, model, max_pixels
    self.use_centroids = index.centroids is not None if use_centroids is None else use_centroids
    if self.use_centroids and index.centroids is None:
      raise InputError(f'{index.directory}: index has no centroids (build it with --centroids)')
    num_products = len(index.product_ids)
    if self.use_centroids:
      gallery = index.centroids.astype(index.embeddings.dtype)
      row_product = np.arange(num_products, dtype=np.int32)
      row_category = index.product_category
    else:
      gallery, row_product, row_category = index.embeddings, index.row_product, index.row_category
    # Rows are spread over every device (each CPU core, see use_every_cpu_core), which search
    # their share at once; padding rows go to a product that is never reported.
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ('rows',))
    padding = -len(gallery) % len(devices)
    gallery = np.concatenate([gallery, np.zeros((padding, gallery.shape[1]), gallery.dtype)])
    row_product = np.concatenate([row_product, np.full(padding, num_products, np.int32)])
    row_category = np.concatenate([row_category, np.full(padding, -2, np.int32)])
    sharded, replicated = NamedSharding(mesh, P('rows')), NamedSharding(mesh, P())
    self._gallery = jax.device_put(gallery, sharded)
    self._row_product = jax.device_put(row_product, sharded)
    self._row_category = jax.device_put(row_category, sharded)
    self._replicated = replicated
    self.num_products = num_products
    # The rows of each product, for naming the image that matched best.
    order = np.argsort(index.row_product, kind='stable')
    bounds = np.searchsorted(index.row_product[order], np.arange(num_products + 1))
    self._product_rows = [order[bounds[p]:bounds[p + 1]] for p in range(num_products)]

  def category_number(self, category: str | None) -> int:
    if category is None or category == '':
      return -1
    if category not in self.index.categories:
      known = ', '.join(self.index.categories[:20]) or 'none'
      raise InputError(f'unknown category {category!r} (this index has: {known})')
    return self.index.categories.index(category)

  def warm_up(self) -> None:
    """Compiles the model and the search for a single query, so a first request does not wait."""
    height, width = self.model.image_size
    self.search_crops([np.zeros((height, width, 3), np.uint8)], k=1)

  def crop_of(self, data: bytes, box=None, *, name: str = 'upload') -> np.ndarray:
    return image_io.crop(image_io.decode(data, name=name, max_pixels=self.max_pixels), box,
                         name=name)

  def search_embeddings(self, embeddings: np.ndarray, *, k: int = 10,
                        category: str | None = None) -> list[list[dict]]:
    """[Q, D] unit vectors -> per query, up to k {'product_id', 'category', 'score', 'row',
    'image', 'thumb'}, best first."""
    if k < 1:
      raise InputError(f'k must be at least 1, got {k}')
    number = self.category_number(category)
    # One compiled kernel serves every k up to 100 (top-100 costs little more than top-10).
    kernel_k = min(self.num_products, max(k, 100))
    results = []
    # One query per call: XLA's CPU matrix-vector product reads a float16 index at memory
    # speed, while a [Q > 1, D] x [D, N] float16 product takes a path 20x slower per query.
    for query in np.asarray(embeddings, np.float32):
      scores, products = jax.device_get(_best_products(
          jax.device_put(query[None], self._replicated), self._gallery, self._row_product,
          self._row_category, np.int32(number), k=kernel_k, num_products=self.num_products))
      results.append(self._describe(query, scores[0][:k], products[0][:k]))
    return results

  def _describe(self, query, scores, products) -> list[dict]:
    out = []
    for score, product in zip(scores, products):
      if not np.isfinite(score):
        break
      rows = self._product_rows[product]
      # The product's image that is closest to the query (the one that scored, without
      # centroids).
      row = int(rows[np.argmax(self.index.embeddings[rows].astype(np.float32) @ query)])
      item = self.index.items[row]
      out.append({'product_id': item['product_id'], 'category': item['category'],
                  'score': round(float(score), 6), 'row': row, 'image': item['image'],
                  'thumb': item['thumb']})
    return out

  def search_crops(self, crops: list[np.ndarray], **kwargs) -> list[list[dict]]:
    return self.search_embeddings(self.model.embed_crops(crops), **kwargs)


def result_picture(crop: np.ndarray, results: list[dict], index: search_index.SearchIndex,
                   *, tile: int = 128) -> Image.Image:
  """The query crop, then each result's thumbnail with its rank, product id and score."""
  columns = 1 + len(results)
  canvas = Image.new('RGB', (columns * (tile + 8) + 8, tile + 48), 'white')
  draw = ImageDraw.Draw(canvas)

  def paste(picture, column, caption, colour):
    picture = picture.copy()
    picture.thumbnail((tile, tile))
    x = 8 + column * (tile + 8)
    canvas.paste(picture, (x + (tile - picture.width) // 2, 8 + (tile - picture.height) // 2))
    draw.rectangle([x - 2, 6, x + tile + 1, tile + 9], outline=colour, width=2)
    for line, text in enumerate(caption):
      draw.text((x, tile + 14 + 14 * line), text, fill='black')

  paste(Image.fromarray(crop), 0, ['query'], 'blue')
  for rank, result in enumerate(results, start=1):
    with Image.open(index.thumb_path(result['row'])) as thumb:
      paste(thumb.convert('RGB'), rank, [f"{rank}. {result['product_id']}"[:20],
                                         f"{result['score']:.3f}"], 'gray')
  return canvas
