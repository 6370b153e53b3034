"""TFDS builder for DeepFashion In-shop Clothes Retrieval, built from the user's download (img/,
Anno/list_bbox_inshop.txt, Eval/list_eval_partition.txt) into train / query / gallery with one
example per item, per the official partition.
"""

import dataclasses
import functools
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import features, item_builds
from data_pipelines.deepfashion_consumer2shop import (
    deepfashion_consumer2shop_dataset_builder as c2s)
from data_pipelines.street2shop import raw_images

# clothes_type codes 1, 2, 3 of list_bbox_inshop.txt, as in Consumer-to-shop.
CATEGORIES = c2s.CATEGORIES
DOMAINS = features.DOMAINS
BBOX_FILE = os.path.join('Anno', 'list_bbox_inshop.txt')
PARTITION_FILE = os.path.join('Eval', 'list_eval_partition.txt')
REPORT_FILE = item_builds.ItemBuilds.REPORT_FILE
SPLITS = ('train', 'query', 'gallery')
# Every In-shop photo is a shop photo. Query images take the street role, because evaluation
# treats the domain as ReID's camera and drops gallery images of the query's item that share
# its camera; train and gallery images are shop images.
SPLIT_DOMAINS = {'train': 'shop', 'query': 'street', 'gallery': 'shop'}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download DeepFashion In-shop Clothes Retrieval
(https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html), unpack Img/img.zip so
that img/ sits next to Anno/ and Eval/, and pass that root:
  <manual_dir>/Anno/list_bbox_inshop.txt
  <manual_dir>/Eval/list_eval_partition.txt
  <manual_dir>/img/<WOMEN|MEN>/<Subcategory>/id_XXXXXXXX/<NN>_<k>_<view>.jpg  (256 x 256)
Missing or broken images are skipped and counted in build_report.json.
"""


@dataclasses.dataclass(eq=False)
class InShopConfig(tfds.core.BuilderConfig):
  """How stored images are bounded, or resized to the training size."""
  max_side: int = 640  # the 256-px images are never enlarged
  # (height, width): every crop is then resized as training resizes it
  # (data_pipelines/stored_size.py); None keeps the crops as cut.
  resized_to: tuple[int, int] | None = None


@dataclasses.dataclass
class _Item:
  split: str  # train, or test for query + gallery (items are disjoint between the two)
  folder: str  # img/<WOMEN|MEN>/<Subcategory>, kept as a string feature
  images: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> split


def read_partition(path: str, faults: raw_images.FaultCounter) -> dict[str, _Item]:
  """item_id -> its images and their splits, from `image_name item_id evaluation_status` rows.

  Rules: rows without 3 fields or with another status are skipped (`partition_row_malformed`);
  an item id that is not `id_<digits>` drops its rows (`item_id_malformed`, once per item);
  an image listed again keeps its first row (`duplicate_annotation`); an item listed under
  train and under query/gallery keeps the side of its first row and drops the other side's
  images (`item_status_conflict`), since train and test items are disjoint.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'DeepFashion In-shop partition file {path} is missing')
  items, seen, malformed = {}, set(), set()
  with open(path) as f:
    for number, line in enumerate(f):
      tokens = line.split()
      if number < 2 or not tokens:
        continue
      if len(tokens) != 3 or tokens[2] not in SPLITS:
        faults['partition_row_malformed'] += 1
        continue
      name, item, split = tokens
      if c2s._item_number(item) is None:  # pylint: disable=protected-access
        faults['item_id_malformed'] += item not in malformed
        malformed.add(item)
        continue
      if name in seen:
        faults['duplicate_annotation'] += 1
        continue
      seen.add(name)
      side = 'train' if split == 'train' else 'test'
      entry = items.setdefault(item, _Item(side, os.path.dirname(os.path.dirname(name))))
      if entry.split != side:
        faults['item_status_conflict'] += 1
        continue
      entry.images[name] = split
  return items


def work_list(split: str, items: dict[str, _Item], boxes: dict) -> list[tuple]:
  """One c2s.item_example element per item with images listed under `split`.

  Images are cropped by Consumer-to-shop's rules (c2s.cropped_image) and stored with the
  split's domain (SPLIT_DOMAINS); items left with no image are dropped
  (`<split>_item_without_images`); train items with one image are kept and counted
  (`train_item_single_image`). A test item with query images but no usable gallery image
  stays in query: evaluation skips queries without a positive.
  """
  work = []
  for item, entry in sorted(items.items()):
    names = sorted(name for name, s in entry.images.items() if s == split)
    if names:
      work.append(c2s.work_element(split, item, entry.folder,
                                   [(name, SPLIT_DOMAINS[split]) for name in names], boxes))
  return work


class Builder(item_builds.ItemBuilds, tfds.core.GeneratorBasedBuilder):
  """DeepFashion In-shop Clothes Retrieval (Liu et al., 2016)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      InShopConfig(name='default', description='Images bounded to 640 px.'),
      InShopConfig(name='resized320', resized_to=(320, 320),
                   description='Crops resized to 320x320 (stretch, triangle filter) as training '
                   'resizes them.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'DeepFashion In-shop. One example per item. train: images of train items; query and '
            'gallery: the query and gallery images of the test items, as listed in '
            'list_eval_partition.txt. Images are cropped to their boxes (bbox = the box in the '
            '256-px image). All photos are shop photos; query images are marked street so '
            'that evaluation keeps the same item\'s gallery images as positives.'),
        features=features.item_features(CATEGORIES, folder=tf.string),
        metadata=tfds.core.MetadataDict(),
        homepage='https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(os.path.join(root, 'img')):
      raise FileNotFoundError(f'DeepFashion In-shop manual_dir {root} has no img/ folder '
                              '(unpack Img/img.zip next to Anno/ and Eval/)')
    bbox_path = os.path.join(root, BBOX_FILE)
    if not os.path.isfile(bbox_path):
      raise FileNotFoundError(f'DeepFashion In-shop bbox file {bbox_path} is missing')
    boxes = c2s.read_boxes(bbox_path, self._faults)
    items = read_partition(os.path.join(root, PARTITION_FILE), self._faults)
    process = functools.partial(c2s.item_example, root=root,
                                max_side=self.builder_config.max_side,
                                resized_to=self.builder_config.resized_to)
    return {split: self._generate_examples(split, work_list(split, items, boxes), process)
            for split in SPLITS}
