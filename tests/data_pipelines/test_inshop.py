"""Tests for the DeepFashion In-shop builder: a fake download in the public layout, with the real
data's faults, is built with TFDS and checked record by record against the official partition.
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
from data_pipelines.deepfashion_inshop import deepfashion_inshop_dataset_builder as inshop

SIZE = 64  # the real images are 256 x 256
# (image name, item id, status, clothes_type, corner box or None for no bbox row); faults noted.
ROWS = [
    ('img/WOMEN/Dresses/id_00000001/02_1_front.jpg', 'id_00000001', 'train', 3, (4, 2, 60, 62)),
    ('img/WOMEN/Dresses/id_00000001/02_2_side.jpg', 'id_00000001', 'train', 3,
     (10.4, 8, 50, 60)),  # float: rounded to 10
    ('img/WOMEN/Dresses/id_00000001/02_4_full.jpg', 'id_00000001', 'train', 3,
     (20, 30, 80, 64)),  # clipped to the image
    ('img/WOMEN/Blouses_Shirts/id_00000002/01_1_front.jpg', 'id_00000002', 'query', 1,
     (8, 8, 40, 48)),
    ('img/WOMEN/Blouses_Shirts/id_00000002/01_2_side.jpg', 'id_00000002', 'gallery', 1,
     (0, 0, 64, 64)),  # a CMYK JPEG
    ('img/WOMEN/Blouses_Shirts/id_00000002/01_3_back.jpg', 'id_00000002', 'gallery', 1,
     (16, 0, 48, 32)),  # a PNG named .jpg
    ('img/MEN/Tees_Tanks/id_00000003/01_1_front.jpg', 'id_00000003', 'query', 1,
     (30, 10, 30, 40)),  # zero width: dropped, so item 3 has no query
    ('img/MEN/Tees_Tanks/id_00000003/01_2_side.jpg', 'id_00000003', 'gallery', 1,
     None),  # no bbox row: kept whole
    ('img/MEN/Denim/id_00000004/01_1_front.jpg', 'id_00000004', 'train', 2,
     (0, 0, 10, 10)),  # missing file
    ('img/MEN/Denim/id_00000004/01_2_side.jpg', 'id_00000004', 'train', 2,
     (0, 0, 10, 10)),  # truncated JPEG
    ('img/WOMEN/Skirts/id_00000005/01_1_front.jpg', 'id_00000005', 'query', 2, (0, 0, 32, 32)),
    ('img/WOMEN/Skirts/id_00000005/01_2_side.jpg', 'id_00000005', 'gallery', 2,
     (0, 0, 32, 32)),  # missing file: a query without a positive
    ('img/WOMEN/Dresses/id_00000006/01_1_front.jpg', 'id_00000006', 'train', 3,
     (70, 70, 90, 90)),  # box outside the image: dropped
    ('img/WOMEN/Dresses/id_00000006/01_2_side.jpg', 'id_00000006', 'train', 3, (1, 1, 33, 63)),
    ('img/WOMEN/Dresses/id_00000006/01_7_additional.jpg', 'id_00000006', 'query', 3,
     (1, 1, 33, 63)),  # a train item under query too: dropped
]
MISSING = {'img/MEN/Denim/id_00000004/01_1_front.jpg',
           'img/WOMEN/Skirts/id_00000005/01_2_side.jpg'}


def _pixels(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), np.uint8)


def write_raw_tree(root: str) -> None:
  """An In-shop download in the public layout: img/..., Anno/list_bbox_inshop.txt, Eval/."""
  partition, bbox_rows = [], []
  for seed, (name, item, status, clothes, box) in enumerate(ROWS):
    partition.append(f'{name}  {item}  {status}')
    if box is not None:
      coords = '  '.join(f'{v:03d}' if isinstance(v, int) else str(v) for v in box)
      bbox_rows.append(f'{name}  {clothes}  1  {coords}')
    if name in MISSING:
      continue
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(_pixels(seed))
    if name.endswith('id_00000002/01_2_side.jpg'):
      image.convert('CMYK').save(path, format='JPEG')
    elif name.endswith('id_00000002/01_3_back.jpg'):
      image.save(path, format='PNG')
    elif name.endswith('id_00000004/01_2_side.jpg'):
      buffer = io.BytesIO()
      image.save(buffer, format='JPEG')
      pathlib.Path(path).write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 3])
    else:
      image.save(path, format='JPEG', quality=95)
  partition += [partition[0],  # a repeated row changes nothing
                'img/WOMEN/Pants/id_00000007/01_1_front.jpg  id_00000007',  # 2 fields
                'img/WOMEN/Pants/item_8/01_1_front.jpg  item_8  gallery']  # malformed item id
  bbox_rows += [bbox_rows[0], 'img/WOMEN/Pants/id_00000009/01_1_front.jpg  1  1  0  0  x  9']
  for name, header, rows in (
      (inshop.PARTITION_FILE, 'image_name  item_id  evaluation_status', partition),
      (inshop.BBOX_FILE, 'image_name  clothes_type  pose_type  x_1  y_1  x_2  y_2', bbox_rows)):
    os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
    pathlib.Path(root, name).write_text('\n'.join([str(len(rows)), header] + rows) + '\n')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('inshop')
  write_raw_tree(str(tmp / 'raw'))
  builder = built_splits.prepare_from_raw(inshop.Builder, str(tmp / 'raw'), str(tmp / 'tfds'))
  return builder, built_splits.items_by_id(builder, inshop.SPLITS)


def _images(example) -> dict[str, tuple[str, tuple[int, int]]]:
  """file name -> (domain, (width, height)) of one stored item."""
  out = {}
  images = example['images']
  for image_id, domain, jpeg in zip(images['image_id'], images['domain'], images['image']):
    with Image.open(io.BytesIO(jpeg)) as image:
      assert image.format == 'JPEG' and image.mode == 'RGB'
      out[image_id.decode().rsplit('/', 1)[-1]] = (inshop.DOMAINS[domain], image.size)
  return out


def test_partition_splits(built):
  _, examples = built
  assert set(examples['train']) == {1, 6}  # item 4 lost both images
  assert set(examples['query']) == {2, 5}  # item 3's only query box is empty
  assert set(examples['gallery']) == {2, 3}  # item 5's gallery image is missing


def test_images_crops_categories_and_domains(built):
  _, examples = built
  train = examples['train']
  assert (int(train[1]['category']), train[1]['folder'].decode()) == (2, 'img/WOMEN/Dresses')
  assert _images(train[1]) == {'02_1_front.jpg': ('shop', (56, 60)),
                               '02_2_side.jpg': ('shop', (40, 52)),
                               '02_4_full.jpg': ('shop', (44, 34))}
  assert _images(train[6]) == {'01_2_side.jpg': ('shop', (32, 62))}
  assert _images(examples['query'][2]) == {'01_1_front.jpg': ('street', (32, 40))}
  assert _images(examples['query'][5]) == {'01_1_front.jpg': ('street', (32, 32))}
  assert [int(examples['query'][i]['category']) for i in (2, 5)] == [0, 1]
  gallery = examples['gallery']
  assert _images(gallery[2]) == {'01_2_side.jpg': ('shop', (64, 64)),
                                 '01_3_back.jpg': ('shop', (32, 32))}
  assert _images(gallery[3]) == {'01_2_side.jpg': ('shop', (64, 64))}
  assert gallery[3]['folder'].decode() == 'img/MEN/Tees_Tanks'
  np.testing.assert_allclose(examples['query'][2]['images']['bbox'][0],
                             [8 / 64, 8 / 64, 48 / 64, 40 / 64], atol=1e-6)
  # The crop holds the photo's pixels inside the box (up to JPEG loss).
  source = _pixels(3)[8:48, 8:40].astype(np.float32)
  stored = np.asarray(Image.open(io.BytesIO(examples['query'][2]['images']['image'][0])),
                      np.float32)
  assert np.abs(stored.mean(axis=(0, 1)) - source.mean(axis=(0, 1))).max() < 8


def test_fault_counts(built):
  builder, _ = built
  expected = {'box_float_rounded': 1, 'box_clipped': 1, 'box_empty': 1, 'box_outside_image': 1,
              'box_missing_whole_image': 1, 'box_row_malformed': 1, 'converted_CMYK': 1,
              'wrong_extension': 1, 'missing_image': 2, 'corrupt_image': 1,
              'duplicate_annotation': 2, 'item_status_conflict': 1,
              'partition_row_malformed': 1, 'item_id_malformed': 1,
              'train_item_without_images': 1, 'train_item_single_image': 1,
              'query_item_without_images': 1, 'gallery_item_without_images': 1}
  assert builder.info.metadata['build_report'] == expected
  with open(os.path.join(builder.data_dir, inshop.REPORT_FILE)) as f:
    assert json.load(f) == expected


def test_registry_and_bad_manual_dir(built, tmp_path):
  builder, _ = built
  loaded = datasets.get_builder('deepfashion_inshop',
                                str(pathlib.Path(builder.data_dir).parents[2]))
  assert loaded.info.splits['query'].num_examples == 2
  with pytest.raises(datasets.DatasetMissingError,
                     match='python -m data_pipelines.build deepfashion_inshop'):
    datasets.get_builder('deepfashion_inshop', str(tmp_path / 'empty'))
  (tmp_path / 'raw' / 'img').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='list_bbox_inshop.txt is missing'):
    inshop.Builder(data_dir=str(tmp_path / 'tfds')).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'raw')))


def test_beam_build_equals_plain_build(built, tmp_path):
  """The same raw tree built on Beam's DirectRunner gives the same records and fault counts."""
  import beam_check
  builder, _ = built
  beam_check.build_on_beam_and_compare(builder, 'deepfashion_inshop', str(tmp_path))
