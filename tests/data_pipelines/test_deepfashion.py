"""Tests for the DeepFashion Consumer-to-shop builder: a fake download in the real format, with
the real data's faults, is built with TFDS and checked record by record against the protocol,
from the 300-px img/ images and (config highres) from their img_highres/ copies.
"""

import functools
import io
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import built_splits
from data_pipelines import build, datasets
from data_pipelines.deepfashion_consumer2shop import (
    deepfashion_consumer2shop_dataset_builder as c2s)
from data_pipelines.street2shop import raw_images

# item -> (folder, clothes_type, status, consumer names, shop names); the recipe's 4 items plus
# items that exercise the faults.
ITEMS = {
    'id_00000001': ('img/TOPS/T_Shirt', 1, 'train', ['comsumer_01', 'comsumer_02'], ['shop_01']),
    'id_00000002': ('img/DRESSES/Lace_Dress', 3, 'val', ['comsumer_01'], ['shop_01', 'shop_02']),
    'id_00000003': ('img/TROUSERS/Jeans', 2, 'test', ['comsumer_01'], ['shop_01']),
    'id_00000004': ('img/TROUSERS/Jeans', 2, 'test', ['comsumer_01'], ['shop_01', 'shop_02']),
    'id_00000005': ('img/CLOTHING/Summer_Wear', 1, 'train', ['comsumer_01'], ['shop_01']),
}
SIZE = (200, 300)  # width, height: long side 300 like the real img/ images
# img_highres/ copies: (width, height) per item, 2x but for item 3 (1.75x wide, 7/3x high) and
# item 4 (3x). Item 5's folder has the high-res archive's name, CLOTHING/Summer_Suit.
HIGHRES_SIZES = {'id_00000001': (400, 600), 'id_00000002': (400, 600),
                 'id_00000003': (350, 700), 'id_00000004': (600, 900),
                 'id_00000005': (400, 600)}
HIGHRES_MISSING = 'id_00000001/comsumer_02'  # in img/ only
LOWRES_MISSING = 'id_00000005/comsumer_01'  # in img_highres/ only
# In an item folder but in no pair row: counted, not used.
UNLISTED = 'img/TOPS/T_Shirt/id_00000001/shop_02.jpg'
# Corner boxes (x1, y1, x2, y2) written 3-digit zero-padded; faults noted.
BOXES = {
    'id_00000001/comsumer_01': (10, 20, 110, 220),
    'id_00000001/comsumer_02': (0, 0, 200, 300),
    'id_00000001/shop_01': (50.6, 60, 150, 260),  # float: rounded to 51
    'id_00000002/comsumer_01': (1, 1, 50, 50),
    'id_00000002/shop_01': (20, 30, 180, 290),
    'id_00000002/shop_02': (100, 200, 250, 400),  # clipped to the image
    'id_00000003/comsumer_01': (5, 5, 105, 155),
    'id_00000003/shop_01': (40, 40, 140, 240),
    'id_00000004/comsumer_01': (30, 30, 30, 90),  # zero width: image dropped
    # id_00000004/shop_01 has no bbox row: kept whole
    'id_00000004/shop_02': (10, 10, 60, 60),  # its file is a CMYK JPEG
    'id_00000005/comsumer_01': (0, 0, 20, 20),  # its 300-px file is missing
    'id_00000005/shop_01': (0, 0, 20, 20),  # its files are truncated
}


def _pixels(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)


def _highres_path(root: str, folder: str, key: str) -> str:
  folder = folder.replace('img/', 'img_highres/', 1).replace('Summer_Wear', 'Summer_Suit')
  return os.path.join(root, folder, f'{key}.jpg')


def _write_image(path: str, pixels: np.ndarray, key: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(pixels)
  if key == 'id_00000004/shop_02':
    image = image.convert('CMYK')
  image.save(path, format='JPEG', quality=95)
  if key == 'id_00000005/shop_01':
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:len(data) // 3])


def write_raw_tree(root: str) -> None:
  """A consumer-to-shop download in the real layout: img/... and its img_highres/ copy (other
  pixels, so a crop shows which tree it came from), Anno/ and Eval/ list files."""
  bbox_rows, pair_rows = [], []
  for seed, (item, (folder, clothes, status, consumers, shops)) in enumerate(ITEMS.items()):
    names = [(n, 2) for n in consumers] + [(n, 1) for n in shops]
    for index, (name, source) in enumerate(names):
      key = f'{item}/{name}'
      path = f'{folder}/{key}.jpg'
      if key in BOXES:
        coords = '  '.join(f'{v:03d}' if isinstance(v, int) else str(v) for v in BOXES[key])
        bbox_rows.append(f'{path}  {clothes}  {source}  {coords}')
      if key != LOWRES_MISSING:
        _write_image(os.path.join(root, path), _pixels(seed * 10 + index), key)
      if key != HIGHRES_MISSING:
        _write_image(_highres_path(root, folder, key),
                     _pixels(1000 + seed * 10 + index, HIGHRES_SIZES[item]), key)
    for consumer in consumers:
      for shop in shops:
        pair_rows.append(f'{folder}/{item}/{consumer}.jpg  {folder}/{item}/{shop}.jpg  '
                         f'{item}  {status}')
  Image.fromarray(_pixels(99)).save(os.path.join(root, UNLISTED), format='JPEG')
  pair_rows.append(pair_rows[0])  # a repeated pair row changes nothing
  os.makedirs(os.path.join(root, 'Anno'))
  os.makedirs(os.path.join(root, 'Eval'))
  def write_list(name: str, header: str, rows: list[str]) -> None:
    pathlib.Path(root, name).write_text('\n'.join([str(len(rows)), header] + rows) + '\n')

  write_list(c2s.BBOX_FILE, 'image_name  clothes_type  source_type  x_1  y_1  x_2  y_2',
             bbox_rows)
  write_list(c2s.PARTITION_FILE,
             'image_pair_name_1  image_pair_name_2  item_id  evaluation_status', pair_rows)
  pathlib.Path(root, 'Anno', 'list_item_consumer2shop.txt').write_text(
      '\n'.join([str(len(ITEMS))] + list(ITEMS)) + '\n')


@pytest.fixture(scope='module')
def raw_tree(tmp_path_factory) -> pathlib.Path:
  """`<tmp>/raw`, built into `<tmp>/tfds` by the fixtures below (beam_check relies on it)."""
  tmp = tmp_path_factory.mktemp('c2s')
  write_raw_tree(str(tmp / 'raw'))
  return tmp


def _build(raw_tree: pathlib.Path, config: str):
  builder = built_splits.prepare_from_raw(functools.partial(c2s.Builder, config=config),
                                          str(raw_tree / 'raw'), str(raw_tree / 'tfds'))
  return builder, built_splits.items_by_id(builder, ('train', 'query', 'gallery'))


@pytest.fixture(scope='module')
def built(raw_tree):
  return _build(raw_tree, 'default')


@pytest.fixture(scope='module')
def built_highres(raw_tree):
  return _build(raw_tree, 'highres')


def _images(example) -> dict[str, tuple[str, tuple[int, int]]]:
  out = {}
  images = example['images']
  for image_id, domain, jpeg in zip(images['image_id'], images['domain'], images['image']):
    with Image.open(io.BytesIO(jpeg)) as image:
      assert image.mode == 'RGB'
      out[image_id.decode().split('/', 4)[-1]] = (c2s.DOMAINS[domain], image.size)
  return out


def test_protocol_splits(built):
  _, examples = built
  assert set(examples['train']) == {1}  # item 5 lost both images
  assert set(examples['query']) == {3}  # item 4's only consumer box is empty
  assert set(examples['gallery']) == {2, 3, 4}  # val + test shop images


def test_images_crops_and_categories(built):
  _, examples = built
  train = examples['train'][1]
  assert (int(train['category']), train['folder'].decode()) == (0, 'img/TOPS/T_Shirt')
  assert _images(train) == {'comsumer_01.jpg': ('street', (100, 200)),
                            'comsumer_02.jpg': ('street', (200, 300)),
                            'shop_01.jpg': ('shop', (99, 200))}
  assert _images(examples['query'][3]) == {'comsumer_01.jpg': ('street', (100, 150))}
  gallery = examples['gallery']
  assert [int(gallery[i]['category']) for i in (2, 3, 4)] == [2, 1, 1]
  assert _images(gallery[2]) == {'shop_01.jpg': ('shop', (160, 260)),
                                 'shop_02.jpg': ('shop', (100, 100))}
  assert _images(gallery[3]) == {'shop_01.jpg': ('shop', (100, 200))}
  assert _images(gallery[4]) == {'shop_01.jpg': ('shop', (200, 300)),
                                 'shop_02.jpg': ('shop', (50, 50))}
  np.testing.assert_allclose(examples['query'][3]['images']['bbox'][0],
                             [5 / 300, 5 / 200, 155 / 300, 105 / 200], atol=1e-6)


def test_fault_counts(built):
  builder, _ = built
  expected = {'box_float_rounded': 1, 'box_clipped': 1, 'box_empty': 1,
              'box_missing_whole_image': 1, 'converted_CMYK': 1, 'missing_image': 1,
              'corrupt_image': 1, 'train_item_without_images': 1,
              'query_item_without_images': 1, 'image_not_in_pairs': 1}
  assert builder.info.metadata['build_report'] == expected
  with open(os.path.join(builder.data_dir, c2s.REPORT_FILE)) as f:
    assert json.load(f) == expected


# The crops the highres config must store: the boxes in the 300-px frame scaled per axis to
# the high-res copy (2x; item 3 1.75x by 7/3x, rounded down; item 4 3x), in image-id order.
HIGHRES_CROPS = {
    'train': {1: {'comsumer_01': (20, 40, 220, 440), 'shop_01': (102, 120, 300, 520)}},
    'query': {3: {'comsumer_01': (8, 11, 183, 361)}},
    'gallery': {2: {'shop_01': (40, 60, 360, 580), 'shop_02': (200, 400, 400, 600)},  # clipped
                3: {'shop_01': (70, 93, 245, 560)},
                4: {'shop_01': (0, 0, 600, 900), 'shop_02': (30, 30, 180, 180)}},  # whole; CMYK
}


def test_highres_crops_are_the_scaled_boxes_of_the_highres_images(raw_tree, built_highres):
  builder, examples = built_highres
  assert builder.builder_config.max_side == 2048  # the fixture's images are stored whole
  assert {split: set(items) for split, items in examples.items()} == {
      split: set(items) for split, items in HIGHRES_CROPS.items()}
  for split, items in HIGHRES_CROPS.items():
    for number, crops in items.items():
      item = f'id_{number:08d}'
      folder = ITEMS[item][0]
      images = examples[split][number]['images']
      assert [i.decode() for i in images['image_id']] == [
          f'{folder}/{item}/{name}.jpg' for name in crops]
      for jpeg, (name, box) in zip(images['image'], crops.items()):
        with Image.open(_highres_path(str(raw_tree / 'raw'), folder, f'{item}/{name}')) as source:
          expected = source.convert('RGB').crop(box)
        # The stored JPEG is the region re-encoded; the same encoder gives the same bytes.
        assert jpeg == raw_images.encode_bounded(expected, 2048), (split, item, name)
  np.testing.assert_allclose(examples['query'][3]['images']['bbox'][0],
                             [11 / 700, 8 / 350, 361 / 700, 183 / 350], atol=1e-6)


def test_highres_fault_counts(built_highres):
  builder, _ = built_highres
  # The default build's counts, but the missing image is item 1's high-res copy, and item 5's
  # consumer image, found in the renamed high-res folder, has no 300-px file to give its
  # box's frame.
  assert builder.info.metadata['build_report'] == {
      'box_float_rounded': 1, 'box_clipped': 1, 'box_empty': 1, 'box_missing_whole_image': 1,
      'converted_CMYK': 1, 'missing_image': 1, 'lowres_size_unknown': 1, 'corrupt_image': 1,
      'train_item_without_images': 1, 'query_item_without_images': 1,
      'image_not_in_pairs': 1}


def test_highres_without_img_highres_fails_in_one_line(tmp_path):
  write_clean_tree(str(tmp_path / 'raw'), ['train', 'test'])
  with pytest.raises(SystemExit) as raised:
    build.build('deepfashion_consumer2shop/highres', str(tmp_path / 'raw'),
                str(tmp_path / 'tfds'))
  message = str(raised.value)
  assert message == (
      "error: DeepFashion consumer-to-shop config 'highres' crops from img_highres/, and "
      f"manual_dir {tmp_path / 'raw'} has no img_highres/ folder (unpack the high-resolution "
      'image archive next to img/, or build the default config)')
  # The default config needs only img/.
  built = build.build('deepfashion_consumer2shop', str(tmp_path / 'raw'), str(tmp_path / 'tfds'))
  assert built.info.splits['query'].num_examples == 1


def test_registry_and_bad_manual_dir(built, tmp_path):
  builder, _ = built
  loaded = datasets.get_builder('deepfashion_consumer2shop',
                                str(pathlib.Path(builder.data_dir).parents[2]))
  assert loaded.info.splits['query'].num_examples == 1
  (tmp_path / 'raw' / 'Anno').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='has no img/ folder'):
    c2s.Builder(data_dir=str(tmp_path / 'tfds')).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'raw')))


def write_clean_tree(root: str, statuses: list[str]) -> None:
  """A fault-free download for training: one item per status, each with 2 consumer and 2 shop
  images boxed at (4, 4, 36, 36) in 40 x 40 images."""
  bbox_rows, pair_rows = [], []
  for number, status in enumerate(statuses, start=1):
    item, folder = f'id_{number:08d}', ('img/TOPS/T_Shirt', 'img/TROUSERS/Jeans')[number % 2]
    names = ['comsumer_01', 'comsumer_02', 'shop_01', 'shop_02']
    os.makedirs(os.path.join(root, folder, item))
    for name in names:
      path = f'{folder}/{item}/{name}.jpg'
      Image.fromarray(_pixels(number)[:40, :40]).save(os.path.join(root, path), format='JPEG')
      source = 2 if name.startswith('comsumer') else 1
      bbox_rows.append(f'{path}  {number % 2 + 1}  {source}  004  004  036  036')
    pair_rows += [f'{folder}/{item}/{c}.jpg  {folder}/{item}/{s}.jpg  {item}  {status}'
                  for c in names[:2] for s in names[2:]]
  os.makedirs(os.path.join(root, 'Anno'))
  os.makedirs(os.path.join(root, 'Eval'))
  for name, rows in ((c2s.BBOX_FILE, bbox_rows), (c2s.PARTITION_FILE, pair_rows)):
    pathlib.Path(root, name).write_text('\n'.join([str(len(rows)), 'header'] + rows) + '\n')


def test_deepfashion_config_trains_and_evaluates_end_to_end(tmp_path):
  from test_street2shop import _category_column, cross_evaluate, train_tiny
  from test_street2shop import write_clean_tree as write_s2s_tree

  from data_pipelines.street2shop import street2shop_dataset_builder as s2s

  write_clean_tree(str(tmp_path / 'raw'), ['train'] * 16 + ['val'] * 2 + ['test'] * 4)
  data_dir = str(tmp_path / 'tfds')
  built_splits.prepare_from_raw(c2s.Builder, str(tmp_path / 'raw'), data_dir)
  workdir = str(tmp_path / 'run')
  metrics = train_tiny('deepfashion', 'deepfashion_consumer2shop', data_dir, workdir)
  assert metrics['step'] == 2  # 16 identities / P = 8
  assert metrics['num_queries'] == 4 * 2
  for key in ('mAP', 'acc@1', 'acc@20'):
    assert 0.0 <= metrics[key] <= 1.0

  # Cross-domain: the DeepFashion model tested on Street2Shop's query and gallery.
  write_s2s_tree(str(tmp_path / 's2s_raw'), num_train=2, num_test=4, num_distractors=3)
  s2s_dir = str(tmp_path / 's2s_tfds')
  s2s.Builder(data_dir=s2s_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 's2s_raw')))
  cross = cross_evaluate('deepfashion', 'deepfashion_consumer2shop', data_dir, workdir,
                         'street2shop', s2s_dir, cli=True)
  assert cross['num_queries'] == 4 * 2 and cross['num_gallery'] == (4 + 3) * 2
  # Per-category tables name Street2Shop's categories, not DeepFashion's clothes types.
  table = os.path.join(workdir, 'eval', 'street2shop', 'per_category.csv')
  assert _category_column(table) == ['bags', 'tops', 'average over categories']


def test_beam_build_equals_plain_build(built, tmp_path):
  """The same raw tree built on Beam's DirectRunner gives the same records and fault counts."""
  import beam_check
  builder, _ = built
  beam_check.build_on_beam_and_compare(builder, 'deepfashion_consumer2shop', str(tmp_path))


def test_an_image_under_two_items_stays_with_its_first(tmp_path):
  # A shop photo of a training item named again under a test item, and a query photo named as
  # a gallery photo of another item: each would be a right and a wrong answer at once.
  rows = ['img/A/id_00000001/comsumer_01.jpg img/A/id_00000001/shop_01.jpg id_00000001 train',
          'img/A/id_00000006/comsumer_01.jpg img/A/id_00000001/shop_01.jpg id_00000006 test',
          'img/A/id_00000006/comsumer_01.jpg img/A/id_00000006/shop_01.jpg id_00000006 test',
          'img/A/id_00000005/comsumer_01.jpg img/A/id_00000005/shop_01.jpg id_00000005 test',
          'img/A/id_00000007/comsumer_01.jpg img/A/id_00000005/comsumer_01.jpg id_00000007 test']
  path = tmp_path / 'list_eval_partition.txt'
  path.write_text(f'{len(rows)}\nimage_pair_name_1 image_pair_name_2 item_id evaluation_status\n'
                  + '\n'.join(rows) + '\n')
  faults = raw_images.FaultCounter()
  items = c2s.read_items(str(path), faults)
  images = {item: sorted(entry.images.items()) for item, entry in items.items()}
  assert images['id_00000006'] == [('img/A/id_00000006/comsumer_01.jpg', 'street'),
                                   ('img/A/id_00000006/shop_01.jpg', 'shop')]
  assert images['id_00000007'] == [('img/A/id_00000007/comsumer_01.jpg', 'street')]
  assert ('img/A/id_00000005/comsumer_01.jpg', 'street') in images['id_00000005']
  assert dict(faults) == {'image_in_two_items': 2}
