"""Tests for the DeepFashion Consumer-to-shop builder: a fake download in the real format, with
the real data's faults, is built with TFDS and checked record by record against the protocol.
"""

import io
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import built_splits
from data_pipelines import datasets
from data_pipelines.deepfashion_consumer2shop import (
    deepfashion_consumer2shop_dataset_builder as c2s)

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
    'id_00000005/comsumer_01': (0, 0, 20, 20),  # its file is missing
    'id_00000005/shop_01': (0, 0, 20, 20),  # its file is truncated
}


def _pixels(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (SIZE[1], SIZE[0], 3), np.uint8)


def write_raw_tree(root: str) -> None:
  """A consumer-to-shop download in the real layout: img/..., Anno/ and Eval/ list files."""
  bbox_rows, pair_rows = [], []
  for seed, (item, (folder, clothes, status, consumers, shops)) in enumerate(ITEMS.items()):
    names = [(n, 2) for n in consumers] + [(n, 1) for n in shops]
    for index, (name, source) in enumerate(names):
      key = f'{item}/{name}'
      path = f'{folder}/{key}.jpg'
      if key in BOXES:
        coords = '  '.join(f'{v:03d}' if isinstance(v, int) else str(v) for v in BOXES[key])
        bbox_rows.append(f'{path}  {clothes}  {source}  {coords}')
      if key == 'id_00000005/comsumer_01':
        continue
      os.makedirs(os.path.join(root, folder, item), exist_ok=True)
      image = Image.fromarray(_pixels(seed * 10 + index))
      if key == 'id_00000004/shop_02':
        image = image.convert('CMYK')
      image.save(os.path.join(root, path), format='JPEG', quality=95)
      if key == 'id_00000005/shop_01':
        data = pathlib.Path(root, path).read_bytes()
        pathlib.Path(root, path).write_bytes(data[:len(data) // 3])
    for consumer in consumers:
      for shop in shops:
        pair_rows.append(f'{folder}/{item}/{consumer}.jpg  {folder}/{item}/{shop}.jpg  '
                         f'{item}  {status}')
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
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('c2s')
  write_raw_tree(str(tmp / 'raw'))
  builder = built_splits.prepare_from_raw(c2s.Builder, str(tmp / 'raw'), str(tmp / 'tfds'))
  return builder, built_splits.items_by_id(builder, ('train', 'query', 'gallery'))


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
              'query_item_without_images': 1}
  assert builder.info.metadata['build_report'] == expected
  with open(os.path.join(builder.data_dir, c2s.REPORT_FILE)) as f:
    assert json.load(f) == expected


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
