"""The search index: a directory holding a catalogue's embeddings and what they mean.

  index.json          format, model (checkpoint, fingerprint, preprocessing), dtype, counts,
                      the generation's files below by name, and each one's size and sha256
  embeddings-G.npy    [N, D] float16 or float32 unit vectors, one row per catalogue image
  items-G.jsonl       one line per row: image (as given), product_id, category, box, thumb,
                      and 'removed': true once its product was removed
  thumbs/             a small JPEG of every row's crop: all that the service ever shows
  centroids-G.npy     optional [P, D] float32: one unit vector per live product (its images'
                      mean)
  backend-G/          whatever the search backend named in index.json keeps (none for 'exact')
  .resume/            while a change embeds: what it has embedded so far (resume.py)

Rows are only ever appended, so adding images never recomputes the old ones; removing a
product marks its rows and takes them out of the backend, keeping their files.

A change writes the next generation's files beside the current ones, then replaces index.json,
which names them, in one rename: a crash, a full disk or a kill at any moment leaves the index
as it was or as it became, never between. The superseded files are deleted after. Commands
that change an index hold its lock file (`.lock`), so a second writer waits for the first
instead of overwriting it. Indexes written before generations (embeddings.npy, items.jsonl,
centroids.npy, the backend's files at the top) are read as they are and converted by their
next change.
"""

import collections
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fashion_jax import console, preprocessing
from fashion_jax.search import backends, catalogue, resume
from fashion_jax.search import images as image_io
from fashion_jax.search.images import InputError

FORMAT = 1
_INDEX_FILE = 'index.json'
_EMBED_CHUNK = 256  # images read, resized and embedded at a time
# Size limits of files read whole: far above any real one, far below what hurts to read.
_MAX_META_BYTES = 64 << 20      # index.json: settings and category names
_MAX_ITEM_BYTES = 1 << 20       # one items.jsonl line: a few paths and names


# Files of an index written before generations, by their role in index.json's 'files'.
_UNVERSIONED = {'embeddings': 'embeddings.npy', 'items': 'items.jsonl',
                'centroids': 'centroids.npy'}
_FILE_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*$')  # a plain name inside the index
# A generation's file or folder, by its name: (role, generation, suffix).
GENERATION_FILE = re.compile(r'^(embeddings|items|centroids|backend)-(\d+)(\.npy|\.jsonl)?$')
_LOCK_FILE = '.lock'
_DIGEST_BLOCK = 16 << 20


def _atomic_write(path: str, write) -> None:
  """Writes `path` through a temporary file renamed over it, flushed to disk first, with the
  permissions a new file gets under the umask (mkstemp's are the owner's alone)."""
  folder = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-')
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def digest(path: str) -> dict:
  """{'bytes', 'sha256'} of a file, read in blocks."""
  hasher, size = hashlib.sha256(), 0
  with open(path, 'rb') as f:
    while block := f.read(_DIGEST_BLOCK):
      hasher.update(block)
      size += len(block)
  return {'bytes': size, 'sha256': hasher.hexdigest()}


def meta_digest(meta: dict) -> str:
  """sha256 of index.json's fields but this one, as `verify` checks them."""
  fields = {key: value for key, value in meta.items() if key != 'meta_sha256'}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _sync(path: str) -> None:
  """Flushes a file's data, or a folder's entries (its renames), to the disk."""
  descriptor = os.open(path, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


@contextlib.contextmanager
def writer_lock(index_dir: str):
  """Held while a command changes `index_dir`: a second writer waits (saying so on stderr)
  until the first is done, then reads the index as the first left it. The lock goes with the
  process that holds it, however that ends."""
  os.makedirs(index_dir, exist_ok=True)
  # Read-only is enough to lock: a .lock another user made still serves.
  descriptor = os.open(os.path.join(index_dir, _LOCK_FILE), os.O_RDONLY | os.O_CREAT, 0o666)
  with os.fdopen(descriptor, 'rb') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'{index_dir}: another command is changing this index; waiting for it to finish',
            file=sys.stderr, flush=True)
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def build(index_dir: str, model, entries: list[catalogue.CatalogueEntry], *,
          dtype: str | None = None,
          centroids: bool | None = None, max_pixels: int = image_io.DEFAULT_MAX_PIXELS,
          progress: bool = True, backend: str | None = None,
          backend_settings: dict | None = None, replace: bool = False) -> dict:
  """Creates `index_dir` or appends `entries` to it; returns {'added', 'skipped', 'count'}.

  Entries already in the index (same image, box and product, not removed) are skipped, not
  again. The index must come from `model` (same fingerprint). Missing image files are named
  before anything is embedded; an image that does not decode stops the run. Either way the
  index is left untouched (the vectors embedded so far are kept for the next run: resume.py).
  `dtype` (default float16),
  `backend` (default 'exact') and its settings are chosen when the index is created and kept
  after: asking an existing index for others is an InputError, not silently ignored. With
  `replace`, the products of `entries` lose their old images in the same write (an update:
  re-embedded from the new list); the result then also has 'replaced' (old images taken out).
  """
  if not os.path.exists(os.path.join(index_dir, _INDEX_FILE)):
    _check_files(entries)  # before the folder is made
  with writer_lock(index_dir):
    return _build(index_dir, model, entries, dtype=dtype, centroids=centroids,
                  max_pixels=max_pixels, progress=progress, backend=backend,
                  backend_settings=backend_settings, replace=replace)


def _build(index_dir, model, entries, *, dtype, centroids, max_pixels, progress, backend,
           backend_settings, replace) -> dict:
  meta_path = os.path.join(index_dir, _INDEX_FILE)
  existing = None
  if os.path.exists(meta_path):
    existing = SearchIndex(index_dir)
    check_model(existing.meta, model)
    if dtype and existing.meta['dtype'] != dtype:
      raise InputError(f"{index_dir}: the index stores {existing.meta['dtype']} embeddings, not "
                       f'{dtype} (the dtype is chosen when an index is created)')
    dtype = existing.meta['dtype']
    centroids = existing.meta['centroids'] if centroids is None else centroids
    recorded = existing.meta.get('backend', 'exact')
    if backend and backend != recorded:
      raise InputError(f'{index_dir}: the index uses the {recorded!r} backend, not {backend!r} '
                       '(a backend is chosen when an index is created)')
    kept = existing.meta.get('backend_settings', {})
    try:
      given = backends.get(recorded).settings_for(index_dir, backend_settings or {}, new=False)
      backends.get(recorded).check_open(existing)  # before any image is read
    except (ImportError, ValueError) as error:
      raise InputError(f'{index_dir}: {error}') from None
    for key, value in given.items():
      if kept.get(key) != value:
        raise InputError(f'{index_dir}: the index was created with {key} {kept.get(key)!r}, not '
                         f'{value!r} (its settings are chosen when it is created)')
    backend, backend_settings = recorded, kept
    items, embeddings = existing.items, existing.embeddings
  else:
    dtype = dtype or 'float16'
    if dtype not in ('float16', 'float32'):
      raise InputError(f'dtype must be float16 or float32, got {dtype!r}')
    backend, backend_settings = backend or 'exact', dict(backend_settings or {})
    items, embeddings = [], np.zeros((0, model.embedding_dim), dtype)
  try:
    backend_class = backends.get(backend)
  except ValueError as error:
    raise InputError(str(error)) from None
  if existing is None:  # before any image is read: a mistake here costs no embedding
    try:
      backend_settings = backend_class.settings_for(index_dir, backend_settings, new=True)
      backend_class.check(model.embedding_dim, len(entries), backend_settings)
    except (ImportError, ValueError) as error:
      raise InputError(f'{index_dir}: {error}') from None
  replaced = {entry['product_id'] for entry in entries} if replace else set()
  seen = {(item['image'], tuple(item['box']) if item['box'] else None, item['product_id'])
          for item in items if not item.get('removed') and item['product_id'] not in replaced}
  new = []
  for entry in entries:
    key = (entry['image'], tuple(entry['box']) if entry['box'] else None, entry['product_id'])
    if key not in seen:
      seen.add(key)
      new.append(entry)
  _check_files(new)
  os.makedirs(os.path.join(index_dir, 'thumbs'), exist_ok=True)
  first_new = len(items)
  # Vectors an interrupted run embedded (same entry, row and thumbnail) are reused.
  cache = resume.ResumeCache(index_dir, fingerprint=model.fingerprint, dtype=str(embeddings.dtype),
                             dim=int(embeddings.shape[1]))
  keys = [resume.entry_key(entry) for entry in new]
  reused = [cache.reusable(key, first_new + number,
                           os.path.join(index_dir, _thumb(first_new + number)),
                           lambda entry=entry: _entry_bytes(entry, max_pixels))
            if len(cache) else None for number, (key, entry) in enumerate(zip(keys, new))]
  # Per new row: its vector and its thumbnail's digest, once known.
  vectors = [found and found[0] for found in reused]
  thumbs = [found and found[1] for found in reused]
  to_read = [number for number, found in enumerate(reused) if found is None]
  if progress and len(to_read) < len(new):
    print(f'{index_dir}: {len(new) - len(to_read)} of the {len(new)} new images were embedded by '
          'an interrupted run; embedding the rest', file=sys.stderr, flush=True)

  def read(number: int):
    """Reads, crops and thumbnails one new image in a worker thread, and resizes it where that
    needs no device: (the crop or None, its model input or None, the resume cache's record
    of it)."""
    data = _entry_bytes(new[number], max_pixels)
    crop = _read_crop(new[number], max_pixels, data)
    thumbnail = image_io.thumbnail_bytes(crop)
    with open(os.path.join(index_dir, _thumb(first_new + number)), 'wb') as f:
      f.write(thumbnail)
    ready = model.prepare_on_host(crop)
    # A box's crop is copied: the view would keep its whole photo alive while it waits.
    crop = np.ascontiguousarray(crop) if ready is None else None
    return crop, ready, {'key': keys[number], 'content': resume.digest(data),
                         'row': first_new + number, 'thumb': resume.digest(thumbnail)}

  # Decoding, thumbnails and the host resize release the GIL: images are read side by side, a
  # few ahead, and taken in order by this thread, which owns the devices. Where this thread
  # resizes (in JAX), the waiting results are whole crops: then only two are read ahead.
  readers = _readers()
  look_ahead = 2 * readers if model.host_resize else 2
  ahead, prepared, waiting = collections.deque(), [], []
  bar = console.bar(total=len(new), initial=len(new) - len(to_read), desc='indexing', unit='img',
                    enabled=progress)
  pool = ThreadPoolExecutor(max_workers=readers)
  try:
    for position, number in enumerate(to_read):
      while len(ahead) < look_ahead and position + len(ahead) < len(to_read):
        ahead.append(pool.submit(read, to_read[position + len(ahead)]))
      crop, ready, record = ahead.popleft().result()
      prepared.append(model.prepare(crop) if ready is None else ready)
      waiting.append(record)
      if len(prepared) == _EMBED_CHUNK or position == len(to_read) - 1:
        embedded = model.embed_prepared(np.stack(prepared)).astype(embeddings.dtype)
        cache.append(waiting, embedded)
        for record, vector in zip(waiting, embedded):
          vectors[record['row'] - first_new] = vector
          thumbs[record['row'] - first_new] = record['thumb']
        bar.update(len(prepared))
        prepared, waiting = [], []
  except BaseException:
    bar.leave = False  # erased, so the error is the one line a failed run leaves on stderr
    bar.close()
    raise
  finally:
    # After an error (or Ctrl-C) the reads not yet started are dropped.
    pool.shutdown(wait=True, cancel_futures=True)
  bar.close()
  new_items = [{'image': entry['image'], 'product_id': entry['product_id'],
                'category': entry['category'], 'box': list(entry['box']) if entry['box'] else None,
                'thumb': _thumb(first_new + number), 'thumb_digest': thumbs[number]}
               for number, entry in enumerate(new)]
  # The index files change only now, when every new image has been read and embedded.
  old = {row for row, item in enumerate(items)
         if not item.get('removed') and item['product_id'] in replaced}
  items = [dict(item, removed=True) if row in old else item for row, item in enumerate(items)]
  old_rows = np.asarray(sorted(old), np.int64)
  if (existing is not None and not new_items and not len(old_rows)
      and bool(centroids) == existing.meta['centroids']):
    cache.discard()  # nothing to change: no new generation
    result = {'added': 0, 'skipped': len(entries), 'count': existing.num_live}
    return {**result, 'replaced': 0} if replace else result
  if new_items:
    embeddings = np.concatenate([embeddings, np.stack(vectors).astype(embeddings.dtype)])
    items = items + new_items
  # Category numbers never change: new categories are appended (backends store the numbers).
  categories = list(existing.categories) if existing else []
  categories += sorted({item['category'] for item in new_items if item['category']}
                       - set(categories))
  meta = {'format': FORMAT, 'model': model.describe(), 'dtype': str(embeddings.dtype),
          'dim': int(embeddings.shape[1]), 'centroids': bool(centroids), 'backend': backend,
          'backend_settings': backend_settings, 'categories': categories}
  # The backend as it was, plus the new rows; index.json, written last, then lists them.
  if existing is None:
    try:
      search_backend = backend_class.create(index_dir, embeddings.shape[1],
                                            str(embeddings.dtype), backend_settings)
    except (ImportError, OSError, ValueError) as error:
      raise InputError(f'{index_dir}: {error}') from None
  else:
    search_backend = open_backend(existing)
  if new_items:
    _, row_product = product_numbers(items)
    number = {c: i for i, c in enumerate(categories)}
    rows = np.arange(first_new, len(items))
    search_backend.add(rows, embeddings[rows], row_product[rows],
                       np.asarray([number.get(items[r]['category'], -1) for r in rows], np.int32))
  if len(old_rows):
    search_backend.remove(old_rows)
  _commit(index_dir, meta, items, embeddings, search_backend,
          existing.meta if existing else None, embeddings_changed=bool(new_items))
  cache.discard()
  result = {'added': len(new_items), 'skipped': len(entries) - len(new),
            'count': sum(not item.get('removed') for item in items)}
  return {**result, 'replaced': len(old_rows)} if replace else result


def _thumb(row: int) -> str:
  return os.path.join('thumbs', f'{row:08d}.jpg')


def _readers() -> int:
  """Threads reading catalogue images: one per core this process may use, at most 16."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cores = os.cpu_count() or 1
  return max(1, min(cores, 16))


def _check_files(entries: list[catalogue.CatalogueEntry]) -> None:
  """An InputError naming the entries whose image file is missing or not a plain file, before
  anything is embedded (a damaged image is found when it is decoded)."""
  bad = []
  for entry in entries:
    if 'data' in entry:
      continue
    try:
      if not stat.S_ISREG(os.stat(entry['image']).st_mode):
        bad.append(f"{entry['image']} (not a regular file)")
    except OSError as error:
      bad.append(f"{entry['image']} ({error.strerror or error})")
  if bad:
    named = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3 else '')
    raise InputError(' '.join(f'{len(bad)} of the {len(entries)} images to index cannot be read: '
                              f'{named}; nothing was embedded'.split()))


def _entry_bytes(entry: catalogue.CatalogueEntry, max_pixels: int) -> bytes:
  """The encoded image of a catalogue entry: its bytes, or its file's."""
  if 'data' in entry:
    return entry['data']
  return image_io.read_file(entry['image'], image_io.default_max_bytes(max_pixels))


def _read_crop(entry: catalogue.CatalogueEntry, max_pixels: int, data: bytes) -> np.ndarray:
  image = image_io.decode(data, name=entry['image'], max_pixels=max_pixels)
  return image_io.crop(image, entry['box'], name=entry['image'])


def _commit(index_dir: str, meta: dict, items: list[dict], embeddings: np.ndarray,
            search_backend: backends.Backend, previous: dict | None, *,
            embeddings_changed: bool = True) -> None:
  """Writes the next generation: its embeddings (unless unchanged), items, centroids (when the
  index keeps them) and backend files under new names, then index.json naming them and the
  counts of the live (not removed) rows, then deletes what no generation names."""
  generation = (previous or {}).get('generation', 0) + 1
  files = {}
  kept = _files(previous) if previous and not embeddings_changed else {}
  if 'embeddings' in kept:
    files['embeddings'] = kept['embeddings']
  else:
    files['embeddings'] = f'embeddings-{generation}.npy'
    _atomic_write(os.path.join(index_dir, files['embeddings']), lambda f: np.save(f, embeddings))
  files['items'] = f'items-{generation}.jsonl'
  _atomic_write(os.path.join(index_dir, files['items']), lambda f: f.write(
      ''.join(json.dumps(item) + '\n' for item in items).encode()))
  live = [row for row, item in enumerate(items) if not item.get('removed')]
  if meta['centroids']:
    centroids = product_centroids(embeddings, items)
    files['centroids'] = f'centroids-{generation}.npy'
    _atomic_write(os.path.join(index_dir, files['centroids']), lambda f: np.save(f, centroids))
  backend_dir = os.path.join(index_dir, f'backend-{generation}')
  shutil.rmtree(backend_dir, ignore_errors=True)  # a crashed write's
  os.makedirs(backend_dir)
  search_backend.save(backend_dir)
  backend_files = []  # relative to the index
  for folder, _, names in os.walk(backend_dir, topdown=False):
    for name in names:
      _sync(os.path.join(folder, name))
      backend_files.append(os.path.relpath(os.path.join(folder, name), index_dir))
    _sync(folder)
  if backend_files:
    files['backend'] = os.path.basename(backend_dir)
  else:
    shutil.rmtree(backend_dir)  # nothing of its own (empty folders at most)
  # On disk before index.json names them, so that a power cut leaves the old index or the
  # new one (the thumbnails are not synced: a lost one greys its tile).
  _sync(index_dir)
  # What `verify` checks the files against (a file kept from the previous generation keeps
  # its record).
  recorded = (previous or {}).get('checksums', {})
  checksums = {}
  for role, name in files.items():
    for path in sorted(backend_files) if role == 'backend' else [name]:
      checksums[path] = (recorded[path] if kept.get(role) == name and path in recorded
                         else digest(os.path.join(index_dir, path)))
  meta = {**meta, 'generation': generation, 'files': files, 'checksums': checksums,
          'count': len(live), 'rows': len(items),
          'products': len({items[row]['product_id'] for row in live})}
  meta['meta_sha256'] = meta_digest(meta)
  _atomic_write(os.path.join(index_dir, _INDEX_FILE),
                lambda f: f.write(json.dumps(meta, indent=2).encode()))
  _sync(index_dir)
  _remove_unnamed(index_dir, files, generation)


def _files(meta: dict) -> dict:
  """The files of the generation `meta` describes, by role; an index written before
  generations has the fixed names (and its backend's files at the top, no 'backend')."""
  if 'files' in meta:
    return dict(meta['files'])
  return {role: name for role, name in _UNVERSIONED.items()
          if role != 'centroids' or meta.get('centroids')}


def _remove_unnamed(index_dir: str, files: dict, generation: int) -> None:
  """Deletes the files of earlier generations (and of writes that crashed before their
  commit, whose generation is at most this one): a reader that mapped them keeps them until
  it is done. Best effort: whatever is left is deleted by the next change."""
  named = set(files.values())
  # The FAISS backend's files, at the top before generations.
  old_backend = {backends.faiss_index.INDEX_FILE, backends.faiss_index.ROWS_FILE}
  for name in os.listdir(index_dir):
    generated = GENERATION_FILE.match(name)
    if generated and int(generated[2]) > generation:
      continue  # not one this index wrote (yet): someone else's file
    if name in named or not (generated or name in _UNVERSIONED.values() or name in old_backend
                             or name.startswith('.tmp-')):
      continue
    path = os.path.join(index_dir, name)
    try:
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.unlink(path)
    except OSError:
      pass


def product_numbers(items: list[dict]) -> tuple[list[str], np.ndarray]:
  """Products in order of first appearance over all rows, removed ones included, so a
  product's number never changes; and each row's product number [N] int32."""
  product_ids = list(dict.fromkeys(item['product_id'] for item in items))
  number = {p: i for i, p in enumerate(product_ids)}
  return product_ids, np.asarray([number[item['product_id']] for item in items], np.int32)


def product_centroids(embeddings: np.ndarray, items: list[dict]) -> np.ndarray:
  """[P, D] float32: each product's unit-length mean of its live images (zeros for a product
  whose images were all removed), in product-number order."""
  product_ids, row_product = product_numbers(items)
  live = np.asarray([not item.get('removed') for item in items], bool)
  sums = np.zeros((len(product_ids), embeddings.shape[1]), np.float64)
  np.add.at(sums, row_product[live], np.asarray(embeddings)[live].astype(np.float64))
  norms = np.linalg.norm(sums, axis=1, keepdims=True)
  return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def remove_products(index_dir: str, product_ids: list[str]) -> dict:
  """Takes every image of `product_ids` out of the index and its backend; returns
  {'removed' (images), 'products', 'count' (images left)}. An id that is not in the index
  stops everything before any change."""
  SearchIndex(index_dir)  # not an index: refused before the lock file is made
  with writer_lock(index_dir):
    return _remove_products(index_dir, product_ids)


def _remove_products(index_dir: str, product_ids: list[str]) -> dict:
  index = SearchIndex(index_dir)
  wanted = list(dict.fromkeys(str(p) for p in product_ids))
  if not wanted:
    raise InputError('no product ids given')
  live_ids = {p for p, live in zip(index.product_ids, index.product_live) if live}
  unknown = [p for p in wanted if p not in live_ids]
  if unknown:
    shown = ', '.join(repr(p) for p in unknown[:10]) + (' ...' if len(unknown) > 10 else '')
    raise InputError(f'{index_dir}: not in the index: {shown} (nothing removed)')
  wanted_set = set(wanted)
  rows = [row for row, item in enumerate(index.items)
          if not item.get('removed') and item['product_id'] in wanted_set]
  removed = set(rows)
  items = [dict(item, removed=True) if row in removed else item
           for row, item in enumerate(index.items)]
  rows = np.asarray(rows, np.int64)
  search_backend = open_backend(index)
  search_backend.remove(rows)
  _commit(index_dir, index.meta, items, index.embeddings, search_backend, index.meta,
          embeddings_changed=False)
  return {'removed': len(rows), 'products': len(wanted),
          'count': int(sum(not item.get('removed') for item in items))}


def open_backend(index: 'SearchIndex', *, centroids: bool = False) -> backends.Backend:
  """The search backend recorded in the index, opened; its problems as one-line InputErrors
  (a library not installed, a missing backend file, a server that refuses)."""
  try:
    return backends.get(index.meta.get('backend', 'exact')).open(index, centroids=centroids)
  except (ImportError, OSError, ValueError) as error:
    raise InputError(f'{index.directory}: {error}') from None


def check_model(meta: dict, model) -> None:
  """An index is only searched with the model that built it."""
  if meta['model']['fingerprint'] != model.fingerprint:
    # Name the preprocessing settings that differ (e.g. resize 'stretch' vs 'letterbox'): the
    # same weights with other preprocessing give other embeddings.
    # The resize filter is only recorded when not the default, the test-time flip when on.
    defaults = {'filter': preprocessing.DEFAULT_RESIZE_FILTER, 'flip': False}
    built = {**defaults, **meta['model'].get('preprocessing', {})}
    here = {**defaults, **model.preprocessing}
    differing = [f'{key} {built.get(key)!r} in the index, {value!r} here'
                 for key, value in here.items() if built.get(key) != value]
    # One line, whatever the recorded names hold.
    raise image_io.one_line_error(
        f"index was built by another model ({meta['model']['workdir']} step "
        f"{meta['model']['step']}, fingerprint {meta['model']['fingerprint'][:12]}), not "
        f'{model.workdir} step {model.step} ({model.fingerprint[:12]})' +
        (f"; preprocessing differs: {'; '.join(differing)}" if differing else ''))


class SearchIndex:
  """A loaded index directory (read-only)."""

  def __init__(self, index_dir: str, *, check_digest: bool = True):
    """`check_digest`: refuse an index.json whose fields are not those its recorded sha256
    was computed from (changed by hand or damaged); `verify` reports that itself."""
    self.directory = os.path.abspath(index_dir)
    if not os.path.lexists(os.path.join(self.directory, _INDEX_FILE)):
      raise InputError(f'{index_dir}: not a search index (no {_INDEX_FILE})')
    # A change committed while this reads may delete the files the index.json read first
    # names: then the new index.json names the new ones.
    for attempt in range(3):
      self.meta = _check_meta(_read_json(index_dir, _INDEX_FILE, _MAX_META_BYTES), index_dir)
      if check_digest and self.meta.get('meta_sha256', meta_digest(self.meta)) != meta_digest(
          self.meta):
        raise InputError(f'{index_dir}: {_INDEX_FILE} was changed after it was written (its '
                         'fields do not match the sha256 it records; damaged index)')
      self.files = _files(self.meta)
      try:
        self._read_files(index_dir)
        break
      except InputError:
        current = _read_json(index_dir, _INDEX_FILE, _MAX_META_BYTES)
        if attempt == 2 or not isinstance(current, dict) or current.get(
            'generation') == self.meta.get('generation'):
          raise
    # The backend's files: its generation's folder (the top, before generations).
    self.backend_directory = os.path.join(self.directory, self.files.get('backend', ''))
    self.generation = int(self.meta.get('generation', 0))
    self.categories = list(self.meta['categories'])
    # Live rows: those of products not removed. A removed row keeps its number and files.
    self.live = np.asarray([not item.get('removed') for item in self.items], bool)
    self.num_live = int(self.live.sum())
    self.product_ids, self.row_product = product_numbers(self.items)
    self.product_live = np.zeros(len(self.product_ids), bool)
    self.product_live[self.row_product[self.live]] = True
    category_number = {c: i for i, c in enumerate(self.categories)}
    self.row_category = np.asarray([category_number.get(item['category'], -1)
                                    for item in self.items], np.int32)
    # The category of a product: of its first live image (its first image once removed).
    order = np.lexsort((np.arange(len(self.items)), ~self.live, self.row_product))
    first = order[np.searchsorted(self.row_product[order], np.arange(len(self.product_ids)))]
    self.product_category = self.row_category[first]
    if self.centroids is not None and len(self.centroids) != len(self.product_ids):
      raise InputError(f'{index_dir}: {len(self.centroids)} centroids but '
                       f'{len(self.product_ids)} products (damaged index)')

  def _read_files(self, index_dir: str) -> None:
    """The embeddings (memory-mapped: a catalogue's vectors are read as searched, not all at
    start), the items and the centroids that index.json names."""
    checksums = self.meta.get('checksums', {})
    self.embeddings = _load_array(index_dir, self.files['embeddings'], self.meta['dtype'],
                                  self.meta['dim'], checksums)
    name = self.files['items']
    text = image_io.read_text(_regular_file(index_dir, name, checksums),
                              (len(self.embeddings) + 1) * _MAX_ITEM_BYTES)
    self.items = []
    for number, line in enumerate(text.split('\n'), start=1):
      if line.strip():
        self.items.append(_check_item(_parse_json(line, index_dir, f'{name} line {number}'),
                                      index_dir, number))
    if len(self.items) != len(self.embeddings):
      raise InputError(f'{index_dir}: {len(self.items)} items but {len(self.embeddings)} '
                       f'embeddings (damaged index)')
    self.centroids = None
    if self.meta['centroids']:
      if 'centroids' not in self.files:
        raise InputError(f'{index_dir}: {_INDEX_FILE} names no centroids file (damaged index)')
      self.centroids = np.array(_load_array(index_dir, self.files['centroids'], 'float32',
                                            self.meta['dim'], checksums))

  def __len__(self) -> int:
    return len(self.items)

  def thumb_path(self, row: int) -> str:
    """The thumbnail file of `row`, always inside the index directory."""
    path = os.path.realpath(os.path.join(self.directory, self.items[row]['thumb']))
    if os.path.commonpath([path, os.path.realpath(self.directory)]) != os.path.realpath(
        self.directory):
      raise InputError(f'row {row}: thumbnail outside the index')
    return path


# What the code reads from index.json and each items.jsonl line, and the type it must have.
_META_FIELDS = {'format': int, 'dtype': str, 'dim': int, 'centroids': bool, 'categories': list,
                'model': dict}
_MODEL_FIELDS = {'workdir': str, 'step': int, 'fingerprint': str, 'backbone': str}
_OPTIONAL_META_FIELDS = {'backend': str, 'backend_settings': dict, 'generation': int,
                         'files': dict, 'checksums': dict, 'meta_sha256': str}
_ITEM_FIELDS = {'image': str, 'product_id': str, 'category': str, 'thumb': str}


def _has_type(value, kind) -> bool:
  return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _wrong_fields(record: dict, fields: dict, optional: dict | None = None) -> list[str]:
  wrong = [f'{key} (not {kind.__name__})' if key in record else f'{key} (missing)'
           for key, kind in fields.items() if not _has_type(record.get(key), kind)]
  return wrong + [f'{key} (not {kind.__name__})' for key, kind in (optional or {}).items()
                  if key in record and not _has_type(record[key], kind)]


def _check_meta(meta, index_dir: str) -> dict:
  """index.json's fields checked for what the code does with them; InputError otherwise."""
  if not isinstance(meta, dict):
    raise InputError(f'{index_dir}: {_INDEX_FILE} is not a JSON object (damaged index)')
  if meta.get('format') != FORMAT:
    raise InputError(f"{index_dir}: index format {json.dumps(meta.get('format'))[:40]} is not "
                     f'{FORMAT}')
  wrong = _wrong_fields(meta, _META_FIELDS, _OPTIONAL_META_FIELDS)
  if isinstance(meta.get('model'), dict):
    wrong += [f'model.{problem}' for problem in _wrong_fields(meta['model'], _MODEL_FIELDS)]
  if not wrong and meta['dtype'] not in ('float16', 'float32'):
    wrong.append('dtype (not float16 or float32)')
  if not wrong and meta['dim'] < 1:
    wrong.append('dim (not positive)')
  if not wrong and not all(isinstance(c, str) for c in meta['categories']):
    wrong.append('categories (not all strings)')
  if not wrong and not isinstance(meta['model'].get('preprocessing', {}), dict):
    wrong.append('model.preprocessing (not a dict)')
  if not wrong and 'files' in meta:
    files = meta['files']
    if not {'embeddings', 'items'} <= set(files) or not all(
        isinstance(name, str) and _FILE_NAME.match(name) for name in files.values()):
      wrong.append('files (not plain names of the embeddings and items)')
  if not wrong and not all(
      isinstance(record, dict) and _has_type(record.get('bytes'), int)
      and isinstance(record.get('sha256'), str) for record in meta.get('checksums', {}).values()):
    wrong.append('checksums (not a size and a sha256 for each file)')
  if not wrong and not all(all(_FILE_NAME.match(part) for part in name.split('/'))
                           for name in meta.get('checksums', {})):
    wrong.append('checksums (not files inside the index)')
  if wrong:
    raise InputError(f"{index_dir}: {_INDEX_FILE} has bad fields: {', '.join(wrong)} "
                     '(damaged index)')
  return meta


def _check_item(item, index_dir: str, number: int) -> dict:
  """One items.jsonl row checked for what the code does with it; InputError otherwise."""
  wrong = (_wrong_fields(item, _ITEM_FIELDS, {'removed': bool, 'thumb_digest': str})
           if isinstance(item, dict) else ['not a JSON object'])
  if not wrong:
    box = item.get('box')
    if box is not None and not (isinstance(box, list) and len(box) == 4 and all(
        _has_type(v, (int, float)) and math.isfinite(v) for v in box)):
      wrong.append('box (not null or four numbers)')
  if wrong:
    raise InputError(f"{index_dir}: items.jsonl line {number} has bad fields: "
                     f"{', '.join(wrong)} (damaged index)")
  return item


def _parse_json(text: str, index_dir: str, what: str):
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as e:  # also json's digit limit on huge integers
    raise InputError(f'{index_dir}: {what} is not valid JSON ({image_io.one_line(e)}) '
                     '(damaged index)') from None


def _read_json(index_dir: str, name: str, max_bytes: int):
  return _parse_json(image_io.read_text(_regular_file(index_dir, name), max_bytes), index_dir,
                     name)


def _regular_file(index_dir: str, name: str, checksums: dict | None = None) -> str:
  """The path of the index's file `name`; InputError when it is missing, not a plain file
  (a FIFO or device would block or never end) or not of the size `checksums` records."""
  path = os.path.join(index_dir, name)
  try:
    status = os.stat(path)
  except OSError as e:
    raise InputError(f'{index_dir}: {name} cannot be read ({e.strerror or e}) '
                     '(damaged index)') from None
  if not stat.S_ISREG(status.st_mode):
    raise InputError(f'{index_dir}: {name} is not a regular file (damaged index)')
  recorded = (checksums or {}).get(name)
  if recorded is not None and status.st_size != recorded['bytes']:
    raise InputError(f"{index_dir}: {name} has {status.st_size} bytes, not the "
                     f"{recorded['bytes']} {_INDEX_FILE} records (damaged index)")
  return path


def _load_array(index_dir: str, name: str, dtype: str, dim: int,
                checksums: dict | None = None) -> np.ndarray:
  """The index's [N, dim] array `name`, memory-mapped; InputError unless it is one of `dtype`."""
  path = _regular_file(index_dir, name, checksums)
  try:
    array = np.load(path, mmap_mode='r', allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    # numpy parses a damaged .npy header in several ways (ast, tokenize, dtype), each with its
    # own errors: SyntaxError, tokenize.TokenError, TypeError, ValueError, EOFError.
    raise InputError(f'{index_dir}: {name} cannot be read ({image_io.one_line(e)}) '
                     '(damaged index)') from None
  if array.dtype != np.dtype(dtype) or array.ndim != 2 or array.shape[1] != dim:
    raise InputError(f'{index_dir}: {name} holds {array.dtype} {list(array.shape)}, not '
                     f'{dtype} [N, {dim}] as {_INDEX_FILE} says (damaged index)')
  return array
