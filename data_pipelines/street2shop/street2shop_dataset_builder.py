"""TFDS builder for Exact Street2Shop, built from the user's raw download (meta/json + photos)
into train / query / gallery with one example per (category, product), as centroids-reid does.
"""

import dataclasses
import functools
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import features, item_builds, stored_size
from data_pipelines.street2shop import raw_images

# centroids-reid's order; the index is the category label and part of the item id.
CATEGORIES = ('bags', 'belts', 'dresses', 'eyewear', 'footwear', 'hats', 'leggings',
              'outerwear', 'pants', 'skirts', 'tops')
DOMAINS = features.DOMAINS
# Product ids repeat across categories, so the item id folds the category in.
ITEM_ID_STRIDE = 10**7
# Preferred first: centroids-reid's converted copy, then the raw downloads.
IMAGE_DIRS = ('images_jpg', 'images')
REPORT_FILE = item_builds.ItemBuilds.REPORT_FILE

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download Exact Street2Shop yourself (http://www.tamaraberg.com/street2shop/): unzip meta.zip
and download the photos listed in photos/photos.txt, then pass the root as --manual_dir:
  <manual_dir>/meta/json/{train_pairs,test_pairs,retrieval}_<category>.json  (33 files)
  <manual_dir>/images/<9-digit photo id>.<any extension>   (or images_jpg/)
Missing or broken photos are skipped and counted in build_report.json.
"""


def item_id(category: int, product: int) -> int:
  """One id per (category, product): Street2Shop product ids are per category."""
  return category * ITEM_ID_STRIDE + product


@dataclasses.dataclass(eq=False)
class Street2ShopConfig(tfds.core.BuilderConfig):
  """How stored images are bounded, or resized to the training size."""
  max_side: int = 640  # longest side of a stored image; enough for 480x480 training
  # (height, width): every bounded image is then resized as training resizes it
  # (data_pipelines/stored_size.py); None keeps the crops as cut.
  resized_to: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class _Image:
  """One image of an item: a shop photo (box None) or a street crop (left, top, width, height)."""
  photo: int
  box: tuple[int, int, int, int] | None = None


@dataclasses.dataclass
class _Plan:
  """Images per item, per split, before any photo is opened: {split: {(cat, product): [...]}}."""
  splits: dict[str, dict[tuple[int, int], list[_Image]]]


def _read_json(path: str) -> list[dict]:
  with open(path) as f:
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from e
  if not isinstance(records, list):
    raise ValueError(f'{path} must hold a JSON array of records, got {type(records).__name__}')
  return records


def _meta_dir(manual_dir: str) -> str:
  meta = os.path.join(manual_dir, 'meta', 'json')
  if not os.path.isdir(meta):
    raise FileNotFoundError(f'Street2Shop manual_dir {manual_dir} has no meta/json/ folder '
                            '(unzip meta.zip there)')
  missing = [f'{kind}_{c}.json' for c in CATEGORIES
             for kind in ('train_pairs', 'test_pairs', 'retrieval')
             if not os.path.isfile(os.path.join(meta, f'{kind}_{c}.json'))]
  if missing:
    raise FileNotFoundError(f'Street2Shop {meta} lacks {len(missing)} of the 33 annotation '
                            f'files: {", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')
  return meta


def _parse_box(bbox, faults: raw_images.FaultCounter) -> tuple[int, int, int, int] | None:
  """(left, top, width, height) in whole pixels, or None for a box that cannot be cropped.

  Rules: non-integral values are rounded (`box_float_rounded`); missing or non-numeric fields
  (`box_malformed`) and zero or negative width/height (`box_empty`) drop the annotation.
  """
  try:
    values = [bbox[key] for key in ('left', 'top', 'width', 'height')]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
      raise TypeError
    if not all(np.isfinite(values)):
      raise ValueError
  except (KeyError, TypeError, ValueError):
    faults['box_malformed'] += 1
    return None
  if any(v != int(v) for v in values):
    faults['box_float_rounded'] += 1
  left, top, width, height = (int(round(v)) for v in values)
  if width <= 0 or height <= 0:
    faults['box_empty'] += 1
    return None
  return left, top, width, height


def _parse_id(record: dict, key: str) -> int | None:
  value = record.get(key) if isinstance(record, dict) else None
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    return None
  try:
    number = int(value)
  except ValueError:
    return None
  return number if number >= 0 and number == float(value) else None


def _record_ids(record, faults: raw_images.FaultCounter) -> tuple[int | None, int | None]:
  """(photo id, product id) of a pairs or retrieval record; (None, None), counted, if malformed."""
  photo, product = _parse_id(record, 'photo'), _parse_id(record, 'product')
  if photo is None or product is None:
    faults['record_malformed'] += 1
    return None, None
  if product >= ITEM_ID_STRIDE:  # its item id would be another category's product's
    faults['product_id_too_large'] += 1
    return None, None
  return photo, product


def plan_splits(meta: str, faults: raw_images.FaultCounter) -> _Plan:
  """Reads the 33 JSON files into the protocol's splits (dataset_formats.md 4.2).

  train: street crops of train_pairs products plus their retrieval shop photos; query: street
  crops of test_pairs products; gallery: retrieval shop photos of every product of the category
  that is not a train product (test products and distractors). Exact duplicate annotations
  are kept once (`duplicate_annotation`); records without a valid photo or product id are
  dropped (`record_malformed`); a product in both pairs files is kept and counted
  (`product_in_train_and_test`).
  """
  splits = {'train': {}, 'query': {}, 'gallery': {}}
  for cat, name in enumerate(CATEGORIES):
    def street(kind: str) -> dict[tuple[int, int], list[_Image]]:
      items, seen = {}, set()
      for record in _read_json(os.path.join(meta, f'{kind}_{name}.json')):
        photo, product = _record_ids(record, faults)
        if photo is None:
          continue
        # The product belongs to this split even if its box is unusable, so its shop photos
        # stay in train rather than leaking into the gallery as a distractor.
        images = items.setdefault((cat, product), [])
        box = _parse_box(record.get('bbox'), faults)
        if box is None:
          continue
        if (photo, product, box) in seen:
          faults['duplicate_annotation'] += 1
          continue
        seen.add((photo, product, box))
        images.append(_Image(photo, box))
      return items

    train, test = street('train_pairs'), street('test_pairs')
    # Kept as the protocol has them; evaluation skips their queries (their shop photos are
    # training images, not gallery ones).
    faults['product_in_train_and_test'] += len(train.keys() & test.keys())
    shop, seen = {}, set()
    for record in _read_json(os.path.join(meta, f'retrieval_{name}.json')):
      photo, product = _record_ids(record, faults)
      if photo is None:
        continue
      if (photo, product) in seen:
        faults['duplicate_annotation'] += 1
        continue
      seen.add((photo, product))
      shop.setdefault((cat, product), []).append(_Image(photo))
    for key, images in train.items():
      splits['train'][key] = images + shop.get(key, [])
    splits['query'].update(test)
    for key, images in shop.items():
      if key not in train:
        splits['gallery'][key] = images
  return _Plan(splits)


def index_images(manual_dir: str, faults: raw_images.FaultCounter) -> dict[int, str]:
  """Photo id -> file path, from file names `<9-digit id>.<any extension>`.

  A photo with several files (two extensions, or both folders) uses the first of images_jpg/
  then images/, in name order (`duplicate_image_file`).
  """
  paths = {}
  dirs = [os.path.join(manual_dir, d) for d in IMAGE_DIRS]
  if not any(os.path.isdir(d) for d in dirs):
    raise FileNotFoundError(f'Street2Shop manual_dir {manual_dir} has neither images/ nor '
                            'images_jpg/ (download the photos of photos/photos.txt there)')
  for directory in dirs:
    if not os.path.isdir(directory):
      continue
    for name in sorted(os.listdir(directory)):
      stem = os.path.splitext(name)[0]
      if not stem.isdigit():
        continue
      if int(stem) in paths:
        faults['duplicate_image_file'] += 1
        continue
      paths[int(stem)] = os.path.join(directory, name)
  return paths


@dataclasses.dataclass(frozen=True)
class _Use:
  """One planned image of an item, with what processing it needs and nothing shared."""
  photo: int
  box: tuple[int, int, int, int] | None
  path: str | None  # None: no file for this photo id
  counts_photo: bool  # the photo's first use in the build: its file faults are counted here


def work_list(plan: _Plan, paths: dict[int, str]) -> dict[str, list[tuple]]:
  """Per split, one element (split, category, product, uses) per item, in a fixed order.

  A photo's file faults (missing, corrupt, converted, ...) are counted once per photo however
  many annotations use it: by its first use over the splits in plan order, items sorted, images
  sorted (photo, shop before crops, box).
  """
  work, seen = {}, set()
  for split, items in plan.splits.items():
    work[split] = []
    for (cat, product), planned in sorted(items.items()):
      uses = []
      for entry in sorted(planned, key=lambda e: (e.photo, e.box is not None, e.box or ())):
        uses.append(_Use(entry.photo, entry.box, paths.get(entry.photo),
                         entry.photo not in seen))
        seen.add(entry.photo)
      work[split].append((split, cat, product, tuple(uses)))
  return work


def item_example(element: tuple, max_side: int, resized_to: tuple[int, int] | None = None
                 ) -> tuple[tuple[str, dict] | None, raw_images.FaultCounter]:
  """(key, example) of one work_list element, or None if no usable image is left; its faults.

  Items left with no image are dropped (`<split>_item_without_images`); train items with a
  single image are kept and counted (`train_item_single_image`): the input pipeline leaves
  them out of training, as centroids-reid does. Train items with street crops only are kept
  and counted (`train_item_without_shop_image`).
  """
  split, cat, product, uses = element
  faults = raw_images.FaultCounter()
  images, last = [], (None, None)
  for use in uses:
    if use.path is None:
      faults['missing_image'] += use.counts_photo
      continue
    # One photo can give several crops (boxes) of an item: decode it once.
    if last[0] != use.photo:
      photo_faults = faults if use.counts_photo else raw_images.FaultCounter()
      last = (use.photo, raw_images.load_rgb(use.path, photo_faults))
    photo = last[1]
    if photo is None:
      continue
    images.append(_image(use, photo, faults, max_side, resized_to))
  images = [image for image in images if image is not None]
  if not raw_images.keep_item(split, images, faults):
    return None, faults
  key = item_id(cat, product)
  return (str(key), {'item_id': key, 'product_id': product, 'category': cat,
                     'images': images}), faults


def _encode(image, max_side: int, resized_to: tuple[int, int] | None) -> bytes:
  jpeg = raw_images.encode_bounded(image, max_side)
  return jpeg if resized_to is None else stored_size.resize_stored(jpeg, resized_to)


def _image(use: _Use, photo, faults, max_side: int,
           resized_to: tuple[int, int] | None = None) -> dict | None:
  width, height = photo.size
  if use.box is None:
    return {'image': _encode(photo, max_side, resized_to), 'domain': 'shop',
            'image_id': f'{use.photo:09d}',
            'bbox': np.array([0.0, 0.0, 1.0, 1.0], np.float32)}
  left, top, w, h = use.box
  box = raw_images.clip_box(left, top, left + w, top + h, width, height)
  if box is None:
    faults['box_outside_image'] += 1
    return None
  if box != (left, top, left + w, top + h):
    faults['box_clipped'] += 1
  crop = photo.crop(box)
  return {'image': _encode(crop, max_side, resized_to), 'domain': 'street',
          'image_id': f'{use.photo:09d}@{box[0]},{box[1]},{box[2]},{box[3]}',
          'bbox': raw_images.normalized_box(box, width, height)}


class Builder(item_builds.ItemBuilds, tfds.core.GeneratorBasedBuilder):
  """Exact Street2Shop (Kiapour et al., 2015) in the centroids-reid protocol."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # Choose one by name: `street2shop` is `street2shop/default`; `street2shop/max1024` keeps
  # more of the photos' resolution, for inputs larger than 480x480; `street2shop/resized320`
  # stores the default's images resized to 320x320 as training resizes them, so training at
  # that size decodes a third of the pixels and resizes nothing.
  BUILDER_CONFIGS = [
      Street2ShopConfig(name='default', description='Images bounded to 640 px.'),
      Street2ShopConfig(name='max1024', max_side=1024, description='Images bounded to 1024 px.'),
      Street2ShopConfig(name='resized320', resized_to=(320, 320),
                        description='Images bounded to 640 px, then resized to 320x320 '
                        '(stretch, triangle filter) as training resizes them.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Exact Street2Shop. One example per (category, product). train: street crops and '
            'shop photos of train products; query: street crops of test products; gallery: '
            'shop photos of every non-train product (test products and distractors). Street '
            'photos are cropped to their boxes (bbox = the box in the photo), shop photos are '
            'whole (bbox = [0, 0, 1, 1]).'),
        features=features.item_features(CATEGORIES, product_id=tf.int64),
        metadata=tfds.core.MetadataDict(),
        homepage='http://www.tamaraberg.com/street2shop/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    plan = plan_splits(_meta_dir(manual_dir), self._faults)
    paths = index_images(manual_dir, self._faults)
    process = functools.partial(item_example, max_side=self.builder_config.max_side,
                                resized_to=self.builder_config.resized_to)
    return {split: self._generate_examples(split, work, process)
            for split, work in work_list(plan, paths).items()}
