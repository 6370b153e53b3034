"""Searching an index: photos -> embeddings -> the best products, and the result pictures.

Products, not images, are ranked: a product scores the best similarity of its images (or of its
centroid when the index has them), so several images of one product appear once.
"""

import os
import sys
import threading
import time

import numpy as np
from PIL import Image, ImageDraw

from fashion_jax.search import backends
from fashion_jax.search import images as image_io
from fashion_jax.search import index as search_index
from fashion_jax.search.images import InputError


class Searcher:
  """An index, its search backend and the model that built it, ready to answer queries.

  Not thread-safe: one thread owns the devices (the service's batcher, or the command line).
  """

  def __init__(self, index: search_index.SearchIndex, model, *, use_centroids: bool | None = None,
               max_pixels: int = image_io.DEFAULT_MAX_PIXELS):
    self.model, self.max_pixels = model, max_pixels
    self.use_centroids = index.centroids is not None if use_centroids is None else use_centroids
    for attempt in range(3):
      try:
        self.__dict__.update(self._loaded(index))
        break
      except InputError:
        # A change committed since `index` was read deletes the backend files it names: the
        # new generation is then read instead.
        latest = search_index.SearchIndex(index.directory)
        if attempt == 2 or latest.generation == index.generation:
          raise
        index = latest
    self._pending, self._pending_lock = None, threading.Lock()

  def _loaded(self, index: search_index.SearchIndex) -> dict:
    """What searching `index` needs: the index, its backend opened, and each product's rows
    (for naming the image that matched best)."""
    search_index.check_model(index.meta, self.model)
    if self.use_centroids and index.centroids is None:
      raise InputError(f'{index.directory}: index has no centroids (build it with --centroids)')
    num_products = len(index.product_ids)
    live = np.flatnonzero(index.live)
    order = live[np.argsort(index.row_product[live], kind='stable')]
    bounds = np.searchsorted(index.row_product[order], np.arange(num_products + 1))
    return {'index': index, 'num_products': num_products,
            'backend': search_index.open_backend(index, centroids=self.use_centroids),
            '_product_rows': [order[bounds[p]:bounds[p + 1]] for p in range(num_products)]}

  def follow(self, interval: float = 2.0) -> None:
    """Follows the index's changes (index, update, remove by other commands): a daemon thread
    looks at index.json every `interval` seconds and loads a new generation beside the one in
    use, which the next search then takes up, so searches never wait for a load. A generation
    that cannot be used (built by another model, damaged) is reported on stderr, and the one in
    use goes on serving."""
    threading.Thread(target=self._watch, args=(interval,), daemon=True,
                     name='index-follower').start()

  def _watch(self, interval: float) -> None:
    directory = self.index.directory
    path = os.path.join(directory, 'index.json')
    seen = _stamp(path)
    while True:
      time.sleep(interval)
      stamp = _stamp(path)
      if stamp == seen or stamp is None:
        continue
      seen = stamp
      try:
        loaded = self._loaded(search_index.SearchIndex(directory))
      except (InputError, OSError) as error:
        _note(f'warning: {directory}: the index changed but cannot be loaded, so the previous '
              f'one goes on serving: {image_io.one_line(error)}')
        continue
      with self._pending_lock:
        self._pending = loaded
      index = loaded['index']
      _note(f'{directory}: loaded generation {index.generation} ({index.num_live} images, '
            f'{int(index.product_live.sum())} products)')

  @property
  def latest_index(self) -> search_index.SearchIndex:
    """The newest generation loaded: the one in use, or one the follower loaded that the next
    search takes up (for what the service reports; rows keep their numbers across
    generations)."""
    pending = self._pending
    return self.index if pending is None else pending['index']

  def _take_up_changes(self) -> None:
    """Swaps in a generation the follower loaded (in the thread that searches)."""
    if self._pending is not None:
      with self._pending_lock:
        loaded, self._pending = self._pending, None
      self.__dict__.update(loaded)

  def category_number(self, category: str | None) -> int:
    if category is None or category == '':
      return backends.NO_CATEGORY
    categories = self.index.categories
    pending = self._pending
    if category not in categories and pending is not None:
      # A generation loaded but not yet taken up (the search that uses this number takes it
      # up first; categories are only ever appended, so numbers agree).
      categories = pending['index'].categories
    if category not in categories:
      known = ', '.join(categories[:20]) or 'none'
      raise InputError(f'unknown category {category!r} (this index has: {known})')
    return categories.index(category)

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
    self._take_up_changes()
    number = self.category_number(category)
    queries = np.asarray(embeddings, np.float32)
    scores, products = self.backend.search(queries, k, number)
    return [self._describe(query, s, p) for query, s, p in zip(queries, scores, products)]

  def _describe(self, query, scores, products) -> list[dict]:
    out = []
    for score, product in zip(scores, products):
      if product < 0 or not np.isfinite(score):
        break
      if product >= self.num_products or not len(self._product_rows[product]):
        # A shared backend (a Qdrant collection) ahead of, or behind, this generation of the
        # index: a change another process is making. What the index does not list is skipped.
        continue
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

  def answer_crops(self, requests: list[dict]) -> list[dict]:
    """Several queries at once: requests [{'crop', 'k', 'category'}] -> per request
    {'results', 'timing_ms': {'resize', 'embed', 'search'}} (milliseconds; embed and search
    for the whole batch, resize too where it ran here).
    The crops are resized one by one and embedded in one call. A request that carries its
    model input already ('prepared', from model.prepare_on_host in the caller's thread, and
    'resize_ms', what that took) is not resized again and reports its own resize time."""
    start = time.perf_counter()
    prepared = np.stack([self.model.prepare(r['crop']) if r.get('prepared') is None
                         else r['prepared'] for r in requests])
    resized = time.perf_counter()
    embeddings = self.model.embed_prepared(prepared)
    embedded = time.perf_counter()
    # One backend search for the requests that ask the same (k, category).
    groups = {}
    for number, request in enumerate(requests):
      groups.setdefault((request['k'], request['category']), []).append(number)
    answers = [None] * len(requests)
    for (k, category), numbers in groups.items():
      before = time.perf_counter()
      results = self.search_embeddings(embeddings[numbers], k=k, category=category)
      searched = round(1e3 * (time.perf_counter() - before), 2)
      for number, result in zip(numbers, results):
        resize_ms = requests[number].get('resize_ms', 1e3 * (resized - start))
        answers[number] = {'results': result, 'timing_ms': {
            'resize': round(resize_ms, 2),
            'embed': round(1e3 * (embedded - resized), 2), 'search': searched}}
    return answers

  def answer(self, data: bytes, *, box=None, category: str | None = None, k: int = 10) -> dict:
    """One photo's answer: {'results', 'box', 'category', 'crop_size', 'timing_ms'}."""
    self.category_number(category)  # an unknown category fails before any work
    start = time.perf_counter()
    crop = self.crop_of(data, box)
    decoded = time.perf_counter()
    answer = self.answer_crops([{'crop': crop, 'k': k, 'category': category}])[0]
    return {'results': answer['results'], 'box': list(box) if box else None,
            'category': category, 'crop_size': [int(crop.shape[1]), int(crop.shape[0])],
            'timing_ms': {'decode': round(1e3 * (decoded - start), 2), **answer['timing_ms']}}


def _note(line: str) -> None:
  """A line on stderr for the service's log; the follower goes on if stderr is gone."""
  try:
    print(line, file=sys.stderr, flush=True)
  except (OSError, ValueError):
    pass


def _stamp(path: str):
  """What changes when index.json is replaced: its inode, time and size (None while missing)."""
  try:
    status = os.stat(path)
  except OSError:
    return None
  return status.st_ino, status.st_mtime_ns, status.st_size


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
    try:
      with Image.open(index.thumb_path(result['row'])) as thumb:
        picture = thumb.convert('RGB')
    except (OSError, InputError):  # a thumbnail missing or damaged: the result stays, greyed
      picture = Image.new('RGB', (tile, tile), (200, 200, 200))
    paste(picture, rank, [f"{rank}. {result['product_id']}"[:20], f"{result['score']:.3f}"],
          'gray')
  return canvas
