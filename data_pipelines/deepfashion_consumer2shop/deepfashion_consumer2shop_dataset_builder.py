"""TFDS builder for DeepFashion Consumer-to-shop, built from the user's download (img/, Anno/,
Eval/, optionally img_highres/) into train / query / gallery with one example per item, per the
official protocol.
"""

import dataclasses
import functools
import os
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import features, item_builds, stored_size
from data_pipelines.street2shop import raw_images

# clothes_type codes 1, 2, 3 of list_bbox_consumer2shop.txt.
CATEGORIES = ('upper_body', 'lower_body', 'full_body')
DOMAINS = features.DOMAINS  # consumer photos play the street role
BBOX_FILE = os.path.join('Anno', 'list_bbox_consumer2shop.txt')
PARTITION_FILE = os.path.join('Eval', 'list_eval_partition.txt')
REPORT_FILE = item_builds.ItemBuilds.REPORT_FILE
IMAGE_DIR, HIGHRES_DIR = 'img', 'img_highres'
# The high-res archive names one folder differently (centroids-reid renames it back).
HIGHRES_RENAMES = (('/CLOTHING/Summer_Wear/', '/CLOTHING/Summer_Suit/'),)
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download DeepFashion Consumer-to-shop (https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html),
unpack the image archive so that img/ sits next to Anno/ and Eval/, and pass that root:
  <manual_dir>/Anno/list_bbox_consumer2shop.txt
  <manual_dir>/Eval/list_eval_partition.txt
  <manual_dir>/img/<CATEGORY>/<Subcategory>/id_XXXXXXXX/{comsumer,shop}_NN.jpg  (300-px images)
The `highres` config also needs the high-resolution archive unpacked next to img/:
  <manual_dir>/img_highres/<CATEGORY>/<Subcategory>/id_XXXXXXXX/{comsumer,shop}_NN.jpg
Missing or broken images are skipped and counted in build_report.json.
"""


@dataclasses.dataclass(eq=False)
class ConsumerToShopConfig(tfds.core.BuilderConfig):
  """Which image tree the crops come from, and how stored images are bounded or resized."""
  max_side: int = 640  # the 300-px images are never enlarged
  # Crop from img_highres/, the boxes (drawn on the 300-px images) scaled to each image.
  highres: bool = False
  # (height, width): every bounded crop is then resized as training resizes it
  # (data_pipelines/stored_size.py); None keeps the crops as cut.
  resized_to: tuple[int, int] | None = None


@dataclasses.dataclass
class _Item:
  status: str
  folder: str  # img/<CATEGORY>/<Subcategory>, kept as a string feature
  images: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> domain


def _data_rows(path: str, what: str) -> Iterator[list[str]]:
  """Whitespace-split records of a DeepFashion list file (line 1 a count, line 2 a header)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'DeepFashion consumer-to-shop {what} file {path} is missing')
  with open(path) as f:
    for number, line in enumerate(f):
      if number >= 2 and line.strip():
        yield line.split()


def read_boxes(path: str, faults: raw_images.FaultCounter) -> dict[str, tuple]:
  """image name -> (clothes_type, (x1, y1, x2, y2)) corner box in the 300-px image.

  Rules: rows with too few tokens or non-numeric values are skipped (`box_row_malformed`);
  non-integral coordinates are rounded (`box_float_rounded`); a repeated image keeps its
  first row (`duplicate_annotation`).
  """
  boxes = {}
  for tokens in _data_rows(path, 'bbox'):
    try:
      clothes_type = int(tokens[1])
      values = [float(v) for v in tokens[-4:]]
      if len(tokens) < 7 or not 1 <= clothes_type <= len(CATEGORIES):
        raise ValueError
      if not all(np.isfinite(values)):
        raise ValueError
    except (ValueError, IndexError):
      faults['box_row_malformed'] += 1
      continue
    if tokens[0] in boxes:
      faults['duplicate_annotation'] += 1
      continue
    if any(v != int(v) for v in values):
      faults['box_float_rounded'] += 1
    boxes[tokens[0]] = (clothes_type - 1, tuple(int(round(v)) for v in values))
  return boxes


def read_items(path: str, faults: raw_images.FaultCounter) -> dict[str, _Item]:
  """item_id -> its status and images, from the consumer/shop pair rows.

  Rules: malformed rows are skipped (`pair_row_malformed`); an item listed under several
  statuses keeps its first (`item_status_conflict`), as items are disjoint across splits; an
  image listed under a second item stays with its first (`image_in_two_items`, once per
  image and item): in both, it would be a right and a wrong answer at once, or cross from
  training into the test.
  """
  items, owner, counted = {}, {}, set()
  for tokens in _data_rows(path, 'partition'):
    if len(tokens) != 4 or tokens[3] not in ('train', 'val', 'test'):
      faults['pair_row_malformed'] += 1
      continue
    consumer, shop, item, status = tokens
    entry = items.setdefault(item, _Item(status, os.path.dirname(os.path.dirname(consumer))))
    if entry.status != status:
      faults['item_status_conflict'] += 1
    for image, domain in ((consumer, 'street'), (shop, 'shop')):
      if owner.setdefault(image, item) != item:
        faults['image_in_two_items'] += (image, item) not in counted
        counted.add((image, item))
        continue
      entry.images.setdefault(image, domain)
  return items


def source_path(root: str, name: str, highres: bool) -> str | None:
  """The file that `name` (`img/...`, as the list files write it) is cropped from, or None if
  there is none: the same relative path under img/ or img_highres/ (or under the high-res
  archive's other name of its folder, HIGHRES_RENAMES)."""
  head, _, rest = name.partition('/')
  if not highres:
    candidates = [os.path.join(root, name)]
  elif head == IMAGE_DIR and rest:
    relative = f'/{rest}'
    candidates = [os.path.join(root, HIGHRES_DIR + relative)] + [
        os.path.join(root, HIGHRES_DIR + relative.replace(old, new))
        for old, new in HIGHRES_RENAMES if old in relative]
  else:
    candidates = []
  return next((path for path in candidates if os.path.isfile(path)), None)


def lowres_size(root: str, name: str, faults: raw_images.FaultCounter) -> tuple[int, int] | None:
  """(width, height) of the 300-px image `name`, the frame its box is drawn in, from the file's
  header; None (`lowres_size_unknown`) if the file is missing or unreadable."""
  try:
    with Image.open(os.path.join(root, name)) as image:
      return image.size
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    faults['lowres_size_unknown'] += 1
    return None


def scaled_box(corners: tuple[int, int, int, int], frame: tuple[int, int],
               size: tuple[int, int]) -> tuple[int, int, int, int]:
  """A corner box drawn on a `frame` (width, height) image, in the same picture at `size`: each
  coordinate times the ratio of the sizes on its axis, rounded down, as the authors'
  preparation (centroids-reid's deep_fashion2reid.py) truncates it."""
  x1, y1, x2, y2 = corners
  (frame_w, frame_h), (width, height) = frame, size
  return (x1 * width // frame_w, y1 * height // frame_h,
          x2 * width // frame_w, y2 * height // frame_h)


def cropped_image(root: str, name: str, domain: str, boxes: dict, faults: raw_images.FaultCounter,
                  max_side: int, highres: bool = False, resized_to: tuple[int, int] | None = None
                  ) -> tuple[dict | None, int | None]:
  """The image feature of `name` cropped to its corner box, and the clothes type of its box row.

  With `highres`, the crop comes from the img_highres/ copy and the box, drawn on the 300-px
  image, is scaled to it (`scaled_box`). With `resized_to`, the bounded crop is stored resized
  to it (`stored_size.resize_stored`).

  Rules: a missing or unreadable file is skipped (`missing_image`, `corrupt_image`, see
  raw_images.load_rgb); an image without a bbox row is kept whole (`box_missing_whole_image`);
  an empty box, or one with nothing inside the image, drops the image (`box_empty`,
  `box_outside_image`); a box reaching outside is clipped (`box_clipped`); with `highres`, an
  image whose 300-px file cannot give the box's frame is dropped (`lowres_size_unknown`). The
  clothes type is returned whenever the image is readable and has a box row.
  """
  path = source_path(root, name, highres)
  if path is None:
    faults['missing_image'] += 1
    return None, None
  photo = raw_images.load_rgb(path, faults)
  if photo is None:
    return None, None
  clothes_type, corners = boxes.get(name, (None, None))
  if corners is None:
    faults['box_missing_whole_image'] += 1
    corners = (0, 0, photo.width, photo.height)
  else:
    x1, y1, x2, y2 = corners
    if x2 <= x1 or y2 <= y1:
      faults['box_empty'] += 1
      return None, clothes_type
    if highres:
      frame = lowres_size(root, name, faults)
      if frame is None:
        return None, clothes_type
      corners = scaled_box(corners, frame, photo.size)
  box = raw_images.clip_box(*corners, photo.width, photo.height)
  if box is None:
    faults['box_outside_image'] += 1
    return None, clothes_type
  if box != corners:
    faults['box_clipped'] += 1
  jpeg = raw_images.encode_bounded(photo.crop(box), max_side)
  if resized_to is not None:
    jpeg = stored_size.resize_stored(jpeg, resized_to)
  return ({'image': jpeg, 'domain': domain,
           'image_id': name, 'bbox': raw_images.normalized_box(box, photo.width, photo.height)},
          clothes_type)


def count_unlisted_images(root: str, items: dict[str, _Item],
                          faults: raw_images.FaultCounter) -> None:
  """Counts the image files in the items' folders of img/ that no pair row names
  (`image_not_in_pairs`): they are not used, where centroids-reid's conversion takes every
  file of an item's folder."""
  listed = {name for entry in items.values() for name in entry.images}
  for folder in sorted({os.path.dirname(name) for name in listed}):
    try:
      files = os.listdir(os.path.join(root, folder))
    except OSError:
      continue  # the images of a missing folder count as missing_image
    faults['image_not_in_pairs'] += sum(
        f'{folder}/{file}' not in listed for file in files
        if file.lower().endswith(_IMAGE_EXTENSIONS))


def _item_number(item: str) -> int | None:
  digits = item.removeprefix('id_')
  return int(digits) if digits.isdigit() else None


def work_element(split: str, item: str, folder: str, images: list[tuple[str, str]],
                 boxes: dict) -> tuple:
  """The item_example input of one item: its (name, domain) images and their bbox rows."""
  return split, item, folder, tuple(images), {name: boxes[name] for name, _ in images
                                              if name in boxes}


def item_example(element: tuple, root: str, max_side: int, highres: bool = False,
                 resized_to: tuple[int, int] | None = None
                 ) -> tuple[tuple[str, dict] | None, raw_images.FaultCounter]:
  """(key, example) of one work_element, or None if nothing of it is written; its faults.

  Rules: an item id that is not `id_<digits>` is skipped (`item_id_malformed`); images are
  cropped by `cropped_image`'s rules; items left with no image are dropped
  (`<split>_item_without_images`); train items with one image, or with no shop image, are
  kept and counted (`train_item_single_image`, `train_item_without_shop_image`). The item's
  clothes type is its images' most common one (they agree in the real data).
  """
  split, item, folder, names, boxes = element
  faults = raw_images.FaultCounter()
  number = _item_number(item)
  if number is None:
    faults['item_id_malformed'] += 1
    return None, faults
  images, categories = [], []
  for name, domain in names:
    image, clothes_type = cropped_image(root, name, domain, boxes, faults, max_side, highres,
                                        resized_to)
    if clothes_type is not None:
      categories.append(clothes_type)
    if image is not None:
      images.append(image)
  if not raw_images.keep_item(split, images, faults):
    return None, faults
  category = int(np.bincount(categories).argmax()) if categories else 0
  return (item, {'item_id': number, 'category': category, 'folder': folder,
                 'images': images}), faults


class Builder(item_builds.ItemBuilds, tfds.core.GeneratorBasedBuilder):
  """DeepFashion Consumer-to-shop Clothes Retrieval (Liu et al., 2016)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # Choose one by name: `deepfashion_consumer2shop` is `.../default`, cropped from the 300-px
  # img/ images; `deepfashion_consumer2shop/highres` crops from img_highres/. Its bound is
  # above the high-res images' size (In-shop's are 750 x 1101), so crops keep their full
  # resolution; it only guards against an outsized file.
  BUILDER_CONFIGS = [
      ConsumerToShopConfig(name='default', description='Images bounded to 640 px.'),
      ConsumerToShopConfig(name='highres', highres=True, max_side=2048,
                           description='Cropped from img_highres/, bounded to 2048 px.'),
      # The default's crops stored resized to 320x320 as training resizes them: training at
      # that size then only decodes.
      ConsumerToShopConfig(name='resized320', resized_to=(320, 320),
                           description='Cropped from img/, resized to 320x320 (stretch, '
                           'triangle filter) as training resizes them.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    crops = ('Images are cropped from img_highres/ to their boxes, scaled from the 300-px '
             'images (bbox = the box in the high-res image).' if self.builder_config.highres
             else 'Images are cropped to their boxes (bbox = the box in the 300-px image).')
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'DeepFashion Consumer-to-shop. One example per item. train: consumer and shop '
            'images of train items; query: consumer images of test items; gallery: shop images '
            f'of val and test items. {crops}'),
        features=features.item_features(CATEGORIES, folder=tf.string),
        metadata=tfds.core.MetadataDict(),
        homepage='https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/Consumer2ShopRetrieval.html',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    root = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(os.path.join(root, IMAGE_DIR)):
      raise FileNotFoundError(f'DeepFashion consumer-to-shop manual_dir {root} has no img/ '
                              'folder (unpack the image archive next to Anno/ and Eval/)')
    # Checked before anything is read: the config is useless without this part of the download.
    if config.highres and not os.path.isdir(os.path.join(root, HIGHRES_DIR)):
      raise FileNotFoundError(
          f'DeepFashion consumer-to-shop config {config.name!r} crops from img_highres/, and '
          f'manual_dir {root} has no img_highres/ folder (unpack the high-resolution image '
          'archive next to img/, or build the default config)')
    boxes = read_boxes(os.path.join(root, BBOX_FILE), self._faults)
    items = read_items(os.path.join(root, PARTITION_FILE), self._faults)
    count_unlisted_images(root, items, self._faults)
    by_status = {status: {k: v for k, v in items.items() if v.status == status}
                 for status in ('train', 'val', 'test')}
    gallery = {**by_status['val'], **by_status['test']}
    process = functools.partial(item_example, root=root, max_side=config.max_side,
                                highres=config.highres, resized_to=config.resized_to)

    def work(split: str, items: dict[str, _Item], domains: tuple[str, ...]) -> list[tuple]:
      return [work_element(split, item, entry.folder,
                           [(name, domain) for name, domain in sorted(entry.images.items())
                            if domain in domains], boxes)
              for item, entry in sorted(items.items())]

    return {
        'train': self._generate_examples(
            'train', work('train', by_status['train'], ('street', 'shop')), process),
        'query': self._generate_examples('query', work('query', by_status['test'], ('street',)),
                                         process),
        'gallery': self._generate_examples('gallery', work('gallery', gallery, ('shop',)),
                                           process),
    }
