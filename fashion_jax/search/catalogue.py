"""Catalogue files: what a shop gives to index (a CSV, a JSON list or JSON lines, or a TFDS
split) read into entries, and the image files of a folder. Every file is checked for type and
size before it is read, and every malformed row is one line naming it.
"""

import csv
import difflib
import io
import json
import os

from fashion_jax.search import images as image_io
from fashion_jax.search.images import InputError

_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')
_BOX_COLUMNS = ('x', 'y', 'w', 'h')
MAX_CATALOGUE_BYTES = 1 << 30   # ten million rows of 100 bytes


class CatalogueEntry(dict):
  """{'image': path or reference, 'product_id': str, 'category': str, 'box': [x, y, w, h] | None}
  plus, for entries not read from files, 'data': encoded bytes."""


MAX_FIELD_CHARS = 65_536  # of an image path, a product id or a category


def read_catalogue(path: str, images_root: str | None = None) -> list[CatalogueEntry]:
  """Rows of a CSV (header: image, product_id[, category][, x, y, w, h]) or a JSON list / JSONL of
  {image, product_id, category, box}. Relative image paths are relative to `images_root`,
  by default the catalogue file's folder."""
  root = images_root or os.path.dirname(os.path.abspath(path))
  if path.lower().endswith('.csv'):
    rows = read_csv(path, ('image', 'product_id'), optional=('category',))
  else:
    text = image_io.read_text(path, MAX_CATALOGUE_BYTES)
    try:
      rows = (json.loads(text) if text.lstrip().startswith('[')
              else [json.loads(line) for line in text.splitlines() if line.strip()])
    except (ValueError, RecursionError) as e:  # also json's digit limit on huge integers
      raise InputError(f'{path}: not a valid catalogue ({image_io.one_line(e)})') from None
  entries = []
  for number, row in enumerate(rows, start=2 if path.lower().endswith('.csv') else 1):
    if not isinstance(row, dict) or not row.get('image') or row.get('product_id') in (None, ''):
      raise InputError(f'{path}: row {number} needs an image and a product_id')
    for field in ('image', 'product_id', 'category'):
      size = len(str(row.get(field) or ''))
      if size > MAX_FIELD_CHARS:  # an index line must stay readable (index._MAX_ITEM_BYTES)
        raise InputError(f'{path}: row {number}: {field} is {size:,} characters, more than '
                         f'{MAX_FIELD_CHARS:,}')
    image = str(row['image'])
    box = row.get('box')
    if isinstance(box, (list, tuple)):
      box = ','.join(str(v) for v in box)
    if box is None:
      box = row_box(row, path, number)
    entries.append(CatalogueEntry(
        image=image if os.path.isabs(image) else os.path.normpath(os.path.join(root, image)),
        product_id=str(row['product_id']), category=str(row.get('category') or ''),
        box=image_io.parse_box(box)))
  if not entries:
    raise InputError(f'{path}: the catalogue is empty')
  return entries


def row_box(row: dict, path: str, number: int) -> str | None:
  """The box 'x,y,w,h' of a row's x, y, w and h fields; None when all are empty. A row that
  gives some of them is an InputError, not a search of the whole image."""
  given = [row.get(column) not in (None, '') for column in _BOX_COLUMNS]
  if any(given) and not all(given):
    raise InputError(f'{path}: row {number} gives part of a box: x, y, w and h, all or none')
  return ','.join(str(row[column]) for column in _BOX_COLUMNS) if all(given) else None


def read_csv(path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
  """The rows of a CSV file with a header naming `required` and all or none of the box columns
  x, y, w, h. An empty or binary file, a row with more fields than the header, and a column
  whose name is close to one of the `optional` or box columns the header lacks (a misspelt
  'categroy') are InputErrors: nothing in the file is silently left out. Column names are
  matched whatever their case. Other columns (a shop's titles, prices) are ignored."""
  text = image_io.read_text(path, MAX_CATALOGUE_BYTES)
  try:
    reader = csv.DictReader(io.StringIO(text, newline=''))
    header, rows = reader.fieldnames, list(reader)
  except csv.Error as e:
    raise InputError(f'{path}: not a valid CSV file ({image_io.one_line(e)})') from None
  if not header:
    raise InputError(f'{path}: the file is empty (no header line)')
  # The columns this reads are matched whatever their case and surrounding spaces ('Image',
  # ' product_id' from a spreadsheet).
  known = {*required, *optional, *_BOX_COLUMNS}
  renamed = {column: column.strip().lower() for column in header
             if column.strip().lower() in known and column != column.strip().lower()}
  if renamed:
    header = [renamed.get(column, column) for column in header]
    twice = sorted({column for column in header if header.count(column) > 1} & known)
    if twice:
      raise InputError(f'{path}: the header names the column {twice[0]!r} twice')
    rows = [{renamed.get(key, key): value for key, value in row.items()} for row in rows]
  missing = [column for column in required if column not in header]
  partial_box = 0 < sum(column in header for column in _BOX_COLUMNS) < len(_BOX_COLUMNS)
  if partial_box:
    missing += [column for column in _BOX_COLUMNS if column not in header]
  if missing:
    raise InputError(f"{path}: the header lacks the column(s) {', '.join(missing)}" +
                     (' (a box needs all of x, y, w, h)' if partial_box else ''))
  absent = [column for column in (*optional, *_BOX_COLUMNS) if column not in header]
  for column in header:
    close = difflib.get_close_matches(column.strip().lower(), absent, n=1, cutoff=0.75)
    if close:
      raise InputError(f'{path}: column {column!r} is not one this reads; did you mean '
                       f'{close[0]!r}?')
  for number, row in enumerate(rows, start=2):
    if None in row:  # DictReader's key for the fields past the header's
      raise InputError(f'{path}: row {number} has more fields than the header')
  if not rows:
    raise InputError(f'{path}: the file is empty (a header and no rows)')
  return rows


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


def image_files(folder: str) -> list[str]:
  """The image files of a folder (by extension), sorted."""
  return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                if name.lower().endswith(_IMAGE_EXTENSIONS) and
                os.path.isfile(os.path.join(folder, name)))
