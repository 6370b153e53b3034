"""The search index: a directory holding a catalogue's embeddings and what they mean.

  index.json        format, model (checkpoint, fingerprint, preprocessing), dtype, counts
  embeddings.npy    [N, D] float16 or float32 unit vectors, one row per catalogue image
  items.jsonl       one line per row: image (as given), product_id, category, box, thumb
  thumbs/           a small JPEG of every row's crop: all that the service ever shows
  centroids.npy     optional [P, D] float32: one unit vector per product (mean of its images)

Rows are only ever appended, so adding images never recomputes the old ones.
"""

import csv
import json
import os
import tempfile

import numpy as np
from tqdm import tqdm

from fashion_jax import preprocessing
from fashion_jax.retrieval import centroids as retrieval_centroids
from fashion_jax.search import images as image_io
from fashion_jax.search.images import InputError

FORMAT = 1
_INDEX_FILE = 'index.json'
_EMBED_CHUNK = 256  # images read, resized and embedded at a time
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')


class CatalogueEntry(dict):
  """{'image': path or reference, 'product_id': str, 'category': str, 'box': [x, y, w, h] | None}
  plus, for entries not read from files, 'data': encoded bytes."""


def read_catalogue(path: str, images_root: str | None = None) -> list[CatalogueEntry]:
  """Rows of a CSV (header: image, product_id[, category][, x, y, w, h]) or a JSON list / JSONL of
  {image, product_id, category, box}. Relative image paths are relative to `images_root`,
  by default the catalogue file's folder."""
  root = images_root or os.path.dirname(os.path.abspath(path))
  try:
    with open(path, newline='') as f:
      if path.lower().endswith('.csv'):
        rows = list(csv.DictReader(f))
      else:
        text = f.read()
        rows = (json.loads(text) if text.lstrip().startswith('[')
                else [json.loads(line) for line in text.splitlines() if line.strip()])
  except OSError as e:
    raise InputError(f'{path}: cannot read ({e.strerror or e})') from None
  except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
    raise InputError(f'{path}: not a valid catalogue ({e})') from None
  entries = []
  for number, row in enumerate(rows, start=2 if path.lower().endswith('.csv') else 1):
    if not isinstance(row, dict) or not row.get('image') or row.get('product_id') in (None, ''):
      raise InputError(f'{path}: row {number} needs an image and a product_id')
    image = str(row['image'])
    box = row.get('box')
    if isinstance(box, (list, tuple)):
      box = ','.join(str(v) for v in box)
    if box is None and all(row.get(c) not in (None, '') for c in 'xywh'):
      box = ','.join(str(row[c]) for c in 'xywh')
    entries.append(CatalogueEntry(
        image=image if os.path.isabs(image) else os.path.normpath(os.path.join(root, image)),
        product_id=str(row['product_id']), category=str(row.get('category') or ''),
        box=image_io.parse_box(box)))
  if not entries:
    raise InputError(f'{path}: the catalogue is empty')
  return entries


def read_tfds_catalogue(name: str, split: str, data_dir: str | None = None,
                        domain: str = '') -> list[CatalogueEntry]:
  """Every image of a TFDS split (optionally of one domain, e.g. 'shop') as catalogue entries.

  The encoded bytes are kept and decoded here like any file, so a TFDS catalogue is embedded
  exactly as photos are. Needs TensorFlow Datasets.
  """
  from data_pipelines import datasets  # TensorFlow only on this path
  import tensorflow_datasets as tfds
  builder = datasets.get_builder(name, data_dir)
  features = builder.info.features
  categories = _names(features, 'category')
  domains = _names(features['images'], 'domain')
  if domain and (domains is None or domain not in domains):
    raise InputError(f'{name}: {domain!r} is not a domain of this dataset ({domains})')
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'images': {'image': tfds.decode.SkipDecoding()}})
  entries = []
  for example in tfds.as_numpy(ds):
    category = int(example['category'])
    images = example['images']
    for position in range(len(images['image'])):
      if domain and domains[int(images['domain'][position])] != domain:
        continue
      image_id = images['image_id'][position]
      image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
      entries.append(CatalogueEntry(
          image=f'tfds:{name}/{split}/{image_id}', product_id=str(int(example['item_id'])),
          category=categories[category] if categories else str(category), box=None,
          data=bytes(images['image'][position])))
  if not entries:
    raise InputError(f'{name} split {split!r} has no images')
  return entries


def _names(feature, key):
  try:
    return list(feature[key].names)
  except (KeyError, AttributeError, TypeError):
    return None


def _atomic_write(path: str, write) -> None:
  folder = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def build(index_dir: str, model, entries: list[CatalogueEntry], *, dtype: str = 'float16',
          centroids: bool | None = None, max_pixels: int = image_io.DEFAULT_MAX_PIXELS,
          progress: bool = True) -> dict:
  """Creates `index_dir` or appends `entries` to it; returns {'added', 'skipped', 'count'}.

  Entries already in the index (same image and box) are skipped, not embedded again. The
  index must come from `model` (same fingerprint). All images are read and checked before any
  embedding, so a bad file leaves the index untouched.
  """
  os.makedirs(index_dir, exist_ok=True)
  meta_path = os.path.join(index_dir, _INDEX_FILE)
  if os.path.exists(meta_path):
    existing = SearchIndex(index_dir)
    check_model(existing.meta, model)
    if dtype and existing.meta['dtype'] != dtype:
      dtype = existing.meta['dtype']
    centroids = existing.meta['centroids'] if centroids is None else centroids
    items, embeddings = existing.items, existing.embeddings
  else:
    if dtype not in ('float16', 'float32'):
      raise InputError(f'dtype must be float16 or float32, got {dtype!r}')
    items, embeddings = [], np.zeros((0, model.embedding_dim), dtype)
  seen = {(item['image'], tuple(item['box']) if item['box'] else None) for item in items}
  new = []
  for entry in entries:
    key = (entry['image'], tuple(entry['box']) if entry['box'] else None)
    if key not in seen:
      seen.add(key)
      new.append(entry)
  os.makedirs(os.path.join(index_dir, 'thumbs'), exist_ok=True)
  new_items, new_embeddings, prepared = [], [], []
  bar = tqdm(total=len(new), desc='indexing', unit='img', disable=not progress)
  for number, entry in enumerate(new):
    if 'data' in entry:
      image = image_io.decode(entry['data'], name=entry['image'], max_pixels=max_pixels)
    else:
      image = image_io.read(entry['image'], max_pixels=max_pixels)
    crop = image_io.crop(image, entry['box'], name=entry['image'])
    row = len(items) + number
    thumb = os.path.join('thumbs', f'{row:08d}.jpg')
    with open(os.path.join(index_dir, thumb), 'wb') as f:
      f.write(image_io.thumbnail_bytes(crop))
    prepared.append(model.prepare(crop))
    new_items.append({'image': entry['image'], 'product_id': entry['product_id'],
                      'category': entry['category'],
                      'box': list(entry['box']) if entry['box'] else None, 'thumb': thumb})
    if len(prepared) == _EMBED_CHUNK or number == len(new) - 1:
      new_embeddings.append(model.embed_prepared(np.stack(prepared)).astype(embeddings.dtype))
      bar.update(len(prepared))
      prepared = []
  bar.close()
  # The index files change only now, when every new image has been read and embedded.
  if new_items:
    embeddings = np.concatenate([embeddings] + new_embeddings)
    items = items + new_items
  _atomic_write(os.path.join(index_dir, 'embeddings.npy'), lambda f: np.save(f, embeddings))
  _atomic_write(os.path.join(index_dir, 'items.jsonl'), lambda f: f.write(
      ''.join(json.dumps(item) + '\n' for item in items).encode()))
  if centroids:
    result = retrieval_centroids.gallery_centroids(
        embeddings.astype(np.float32), np.asarray([item['product_id'] for item in items]))
    _atomic_write(os.path.join(index_dir, 'centroids.npy'),
                  lambda f: np.save(f, result['embeddings']))
  meta = {'format': FORMAT, 'model': model.describe(), 'dtype': str(embeddings.dtype),
          'dim': int(embeddings.shape[1]), 'count': len(items),
          'products': len({item['product_id'] for item in items}),
          'categories': sorted({item['category'] for item in items if item['category']}),
          'centroids': bool(centroids)}
  _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
  return {'added': len(new_items), 'skipped': len(entries) - len(new), 'count': len(items)}


def check_model(meta: dict, model) -> None:
  """An index is only searched with the model that built it."""
  if meta['model']['fingerprint'] != model.fingerprint:
    # Name the preprocessing settings that differ (e.g. resize 'stretch' vs 'letterbox'): the
    # same weights with other preprocessing give other embeddings.
    # The resize filter is only recorded when not the default.
    defaults = {'filter': preprocessing.DEFAULT_RESIZE_FILTER}
    built = {**defaults, **meta['model'].get('preprocessing', {})}
    here = {**defaults, **model.preprocessing}
    differing = [f'{key} {built.get(key)!r} in the index, {value!r} here'
                 for key, value in here.items() if built.get(key) != value]
    raise InputError(
        f"index was built by another model ({meta['model']['workdir']} step "
        f"{meta['model']['step']}, fingerprint {meta['model']['fingerprint'][:12]}), not "
        f'{model.workdir} step {model.step} ({model.fingerprint[:12]})' +
        (f"; preprocessing differs: {'; '.join(differing)}" if differing else ''))


class SearchIndex:
  """A loaded index directory (read-only)."""

  def __init__(self, index_dir: str):
    self.directory = os.path.abspath(index_dir)
    meta_path = os.path.join(self.directory, _INDEX_FILE)
    try:
      with open(meta_path) as f:
        self.meta = json.load(f)
    except FileNotFoundError:
      raise InputError(f'{index_dir}: not a search index (no {_INDEX_FILE})') from None
    if self.meta.get('format') != FORMAT:
      raise InputError(f"{index_dir}: index format {self.meta.get('format')} is not {FORMAT}")
    self.embeddings = np.load(os.path.join(self.directory, 'embeddings.npy'))
    with open(os.path.join(self.directory, 'items.jsonl')) as f:
      self.items = [json.loads(line) for line in f if line.strip()]
    if len(self.items) != len(self.embeddings):
      raise InputError(f'{index_dir}: {len(self.items)} items but {len(self.embeddings)} '
                       f'embeddings (damaged index)')
    self.categories = list(self.meta['categories'])
    self.product_ids = list(dict.fromkeys(item['product_id'] for item in self.items))
    product_number = {p: i for i, p in enumerate(self.product_ids)}
    self.row_product = np.asarray([product_number[item['product_id']] for item in self.items],
                                  np.int32)
    category_number = {c: i for i, c in enumerate(self.categories)}
    self.row_category = np.asarray([category_number.get(item['category'], -1)
                                    for item in self.items], np.int32)
    # The category of a product: of its first image.
    first = np.unique(self.row_product, return_index=True)[1]
    self.product_category = self.row_category[first]
    self.centroids = None
    if self.meta.get('centroids'):
      self.centroids = np.load(os.path.join(self.directory, 'centroids.npy'))

  def __len__(self) -> int:
    return len(self.items)

  def thumb_path(self, row: int) -> str:
    """The thumbnail file of `row`, always inside the index directory."""
    path = os.path.realpath(os.path.join(self.directory, self.items[row]['thumb']))
    if os.path.commonpath([path, os.path.realpath(self.directory)]) != os.path.realpath(
        self.directory):
      raise InputError(f'row {row}: thumbnail outside the index')
    return path


def image_files(folder: str) -> list[str]:
  """The image files of a folder (by extension), sorted."""
  return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                if name.lower().endswith(_IMAGE_EXTENSIONS) and
                os.path.isfile(os.path.join(folder, name)))
