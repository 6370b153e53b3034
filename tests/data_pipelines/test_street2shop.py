"""Tests for the Street2Shop builder: a fake raw download in the real format, with each known
fault of the real data, is built with TFDS and checked record by record against the protocol.
"""

import io
import json
import os
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import built_splits
from data_pipelines import build, datasets
from data_pipelines.street2shop import raw_images
from data_pipelines.street2shop import street2shop_dataset_builder as s2s

BAGS, TOPS = s2s.CATEGORIES.index('bags'), s2s.CATEGORIES.index('tops')
STREET_SIZE = (80, 60)  # width, height of every fake street photo


def _pixels(width: int, height: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def _save(path: str, image: Image.Image, fmt: str, **kwargs) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, format=fmt, **kwargs)


def _box(left, top, width, height) -> dict:
  return {'left': left, 'top': top, 'width': width, 'height': height}


# Street annotations (train_pairs / test_pairs) of bags, with the faults of the real files.
TRAIN_BAGS = [
    {'photo': 1, 'product': 10, 'bbox': _box(10, 5, 30, 40)},
    {'photo': 1, 'product': 10, 'bbox': _box(10, 5, 30, 40)},  # exact duplicate
    {'photo': 1, 'product': 10, 'bbox': _box(2, 3, 20, -5)},  # negative height: dropped
    {'product': 10, 'photo': 2, 'bbox': _box(710.0, 0.0, 20.0, 10.0)},  # outside: dropped
    {'photo': 2, 'product': 10, 'bbox': _box(60.4, 20.0, 40.0, 30.6)},  # rounded then clipped
    {'photo': 3, 'product': 11, 'bbox': _box(0, 0, 40, 60)},  # photo 3 is CMYK
    {'photo': 3, 'product': 12, 'bbox': _box(40, 0, 40, 60)},
    {'photo': 4, 'product': 11, 'bbox': _box(1, 2, 10, 20)},  # two boxes of one product
    {'photo': 4, 'product': 11, 'bbox': _box(30, 10, 25, 15)},
    {'photo': 5, 'product': 13, 'bbox': _box(114.0, 10.0, 0.0, 0.0)},  # zero size: dropped
    {'photo': 99, 'product': 14, 'bbox': _box(1, 1, 5, 5)},  # no such file: item dropped
    {'photo': 2, 'product': 15, 'bbox': {'left': 1, 'top': 1, 'width': 'x', 'height': 4}},
]
TEST_BAGS = [
    {'photo': 6, 'product': 20, 'bbox': _box(5, 5, 50, 50)},
    {'photo': 7, 'product': 21, 'bbox': _box(0, 0, 80, 60)},  # product 21 has no shop photo
    # Its item id would be belts' product 5's (category x 10^7 + product): dropped.
    {'photo': 7, 'product': 10000005, 'bbox': _box(0, 0, 80, 60)},
]
RETRIEVAL_BAGS = [
    {'photo': 100001, 'product': 10},  # a PNG named .jpg
    {'photo': 100002, 'product': 10},  # 900 x 300: stored at 640 x 213
    {'photo': 100002, 'product': 10},  # duplicate
    {'photo': 100011, 'product': 11},  # missing file
    {'photo': 100012, 'product': 11},  # .JPEG
    {'photo': 100021, 'product': 12},  # truncated JPEG
    {'photo': 100031, 'product': 20},  # greyscale .jpeg
    {'photo': 100032, 'product': 20},  # a real PNG
    {'photo': 100041, 'product': 30},  # distractor, a GIF
    {'photo': 100042, 'product': 30},
    {'photo': 100051, 'product': 31},  # distractor whose only photo is garbage
    {'photo': 100061, 'product': 13},  # train product whose only box is empty: stays in train
]
TRAIN_TOPS = [{'photo': 8, 'product': 10, 'bbox': _box(0, 0, 80, 60)},
              {'photo': 9, 'product': 10, 'bbox': _box(20, 10, 30, 30)}]
RETRIEVAL_TOPS = [{'photo': 200001, 'product': 10}, {'photo': 200002, 'product': 10}]


def write_raw_tree(root: str) -> None:
  """A Street2Shop download in the real layout: meta/json/*.json and images/<%09d>.<ext>."""
  meta = os.path.join(root, 'meta', 'json')
  os.makedirs(meta)
  files = {('train_pairs', 'bags'): TRAIN_BAGS, ('test_pairs', 'bags'): TEST_BAGS,
           ('retrieval', 'bags'): RETRIEVAL_BAGS, ('train_pairs', 'tops'): TRAIN_TOPS,
           ('retrieval', 'tops'): RETRIEVAL_TOPS}
  for category in s2s.CATEGORIES:
    for kind in ('train_pairs', 'test_pairs', 'retrieval'):
      with open(os.path.join(meta, f'{kind}_{category}.json'), 'w') as f:
        json.dump(files.get((kind, category), []), f)
  with open(os.path.join(root, 'photos.txt'), 'w') as f:
    f.writelines(f'{i:09d},http://example.com/{i}.jpg\n' for i in range(1, 10))

  images = os.path.join(root, 'images')
  path = lambda photo, ext: os.path.join(images, f'{photo:09d}{ext}')
  rgb = lambda w, h, seed: Image.fromarray(_pixels(w, h, seed))
  for photo in (1, 2, 4, 5, 6, 7, 8, 9):
    _save(path(photo, '.jpg'), rgb(*STREET_SIZE, photo), 'JPEG')
  _save(path(3, '.jpg'), rgb(*STREET_SIZE, 3).convert('CMYK'), 'JPEG')
  _save(path(100001, '.jpg'), rgb(40, 50, 11), 'PNG')
  _save(path(100002, '.jpeg'), rgb(900, 300, 12), 'JPEG')
  _save(path(100012, '.JPEG'), rgb(30, 40, 13), 'JPEG')
  full = io.BytesIO()
  rgb(64, 64, 14).save(full, format='JPEG')
  with open(path(100021, '.jpg'), 'wb') as f:
    f.write(full.getvalue()[:len(full.getvalue()) // 2])
  _save(path(100031, '.jpeg'), rgb(30, 30, 15).convert('L'), 'JPEG')
  _save(path(100032, '.png'), rgb(20, 30, 16), 'PNG')
  _save(path(100041, '.gif'), rgb(24, 24, 17).convert('P'), 'GIF')
  _save(path(100042, '.jpg'), rgb(24, 24, 18), 'JPEG')
  _save(path(100061, '.jpg'), rgb(24, 24, 19), 'JPEG')
  with open(path(100051, '.jpg'), 'wb') as f:
    f.write(b'<html>404 Not Found</html>')
  for photo in (200001, 200002):
    _save(path(photo, '.jpg'), rgb(32, 32, photo), 'JPEG')


def _build(tmp_path) -> tuple[tfds.core.DatasetBuilder, dict]:
  raw = str(tmp_path / 'raw')
  write_raw_tree(raw)
  builder = built_splits.prepare_from_raw(s2s.Builder, raw, str(tmp_path / 'tfds'))
  return builder, built_splits.items_by_id(builder, ('train', 'query', 'gallery'))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('s2s'))


def _size(jpeg: bytes) -> tuple[int, int]:
  with Image.open(io.BytesIO(jpeg)) as image:
    assert image.format == 'JPEG' and image.mode == 'RGB'
    return image.size


def _images(example) -> dict[str, tuple[str, tuple[int, int]]]:
  """image_id -> (domain, (width, height)) of one stored item."""
  images = example['images']
  return {image_id.decode(): (s2s.DOMAINS[domain], _size(jpeg))
          for image_id, domain, jpeg in zip(images['image_id'], images['domain'], images['image'])}


def test_split_membership(built):
  _, examples = built
  assert set(examples['train']) == {s2s.item_id(BAGS, p) for p in (10, 11, 12, 13)} | {
      s2s.item_id(TOPS, 10)}
  assert set(examples['query']) == {s2s.item_id(BAGS, 20), s2s.item_id(BAGS, 21)}
  assert set(examples['gallery']) == {s2s.item_id(BAGS, 20), s2s.item_id(BAGS, 30)}


def test_product_ids_are_per_category(built):
  _, examples = built
  bags10, tops10 = examples['train'][10], examples['train'][TOPS * s2s.ITEM_ID_STRIDE + 10]
  assert (int(bags10['product_id']), int(bags10['category'])) == (10, BAGS)
  assert (int(tops10['product_id']), int(tops10['category'])) == (10, TOPS)
  assert set(_images(tops10)) == {'000000008@0,0,80,60', '000000009@20,10,50,40',
                                  '000200001', '000200002'}


def test_train_images_crops_and_repairs(built):
  _, examples = built
  train = {item: _images(ex) for item, ex in examples['train'].items()}
  assert train[s2s.item_id(BAGS, 10)] == {
      '000000001@10,5,40,45': ('street', (30, 40)),
      '000000002@60,20,80,51': ('street', (20, 31)),  # 60.4 -> 60, 30.6 -> 31, clipped at 80
      '000100001': ('shop', (40, 50)),  # the PNG named .jpg
      '000100002': ('shop', (640, 213)),  # bounded longest side
  }
  assert train[s2s.item_id(BAGS, 11)] == {
      '000000003@0,0,40,60': ('street', (40, 60)),  # CMYK converted
      '000000004@1,2,11,22': ('street', (10, 20)),
      '000000004@30,10,55,25': ('street', (25, 15)),
      '000100012': ('shop', (30, 40)),
  }
  assert train[s2s.item_id(BAGS, 12)] == {'000000003@40,0,80,60': ('street', (40, 60))}
  assert train[s2s.item_id(BAGS, 13)] == {'000100061': ('shop', (24, 24))}


def test_a_larger_bound_is_a_builder_config(built, tmp_path):
  """street2shop/max1024 stores the 900 x 300 shop photo whole; every other record is the same."""
  import beam_check
  builder, examples = built
  raw, _ = beam_check.raw_and_data_dir(builder)
  larger = s2s.Builder(config='max1024', data_dir=str(tmp_path))
  larger.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw))
  assert larger.info.metadata['build_report'] == builder.info.metadata['build_report']
  train = {int(ex['item_id']): _images(ex) for ex in built_splits.records(larger, 'train')}
  expected = {item: _images(ex) for item, ex in examples['train'].items()}
  expected[s2s.item_id(BAGS, 10)]['000100002'] = ('shop', (900, 300))
  assert train == expected


def test_query_and_gallery_images(built):
  _, examples = built
  assert _images(examples['query'][s2s.item_id(BAGS, 20)]) == {
      '000000006@5,5,55,55': ('street', (50, 50))}
  assert _images(examples['query'][s2s.item_id(BAGS, 21)]) == {
      '000000007@0,0,80,60': ('street', (80, 60))}
  assert _images(examples['gallery'][s2s.item_id(BAGS, 20)]) == {
      '000100031': ('shop', (30, 30)), '000100032': ('shop', (20, 30))}
  assert _images(examples['gallery'][s2s.item_id(BAGS, 30)]) == {
      '000100041': ('shop', (24, 24)), '000100042': ('shop', (24, 24))}


def test_boxes_and_pixels(built):
  _, examples = built
  query = examples['query'][s2s.item_id(BAGS, 20)]['images']
  np.testing.assert_allclose(query['bbox'][0], [5 / 60, 5 / 80, 55 / 60, 55 / 80], atol=1e-6)
  shop = examples['gallery'][s2s.item_id(BAGS, 30)]['images']
  np.testing.assert_allclose(shop['bbox'], [[0, 0, 1, 1]] * 2)
  # The crop holds the photo's pixels inside the box (up to JPEG loss, twice).
  source = _pixels(*STREET_SIZE, 6)[5:55, 5:55].astype(np.float32)
  stored = np.asarray(Image.open(io.BytesIO(query['image'][0])), np.float32)
  assert np.abs(stored.mean(axis=(0, 1)) - source.mean(axis=(0, 1))).max() < 8


def test_fault_counts(built):
  builder, _ = built
  expected = {
      'box_empty': 2, 'box_float_rounded': 1, 'box_malformed': 1, 'box_outside_image': 1,
      'box_clipped': 1, 'duplicate_annotation': 2, 'missing_image': 2, 'corrupt_image': 2,
      'wrong_extension': 1, 'converted_CMYK': 1, 'converted_L': 1, 'converted_P': 1,
      'train_item_single_image': 2, 'train_item_without_images': 2,
      'train_item_without_shop_image': 1,
      'gallery_item_without_images': 1, 'product_id_too_large': 1,
  }
  assert builder.info.metadata['build_report'] == expected
  with open(os.path.join(builder.data_dir, s2s.REPORT_FILE)) as f:
    assert json.load(f) == expected
  reloaded = s2s.Builder(data_dir=str(pathlib.Path(builder.data_dir).parents[2]))
  assert reloaded.info.metadata['build_report'] == expected


def test_bad_manual_dir_fails_in_one_line(tmp_path):
  raw = tmp_path / 'raw'
  (raw / 'images').mkdir(parents=True)
  builder = s2s.Builder(data_dir=str(tmp_path / 'tfds'))
  config = tfds.download.DownloadConfig(manual_dir=str(raw))
  with pytest.raises(FileNotFoundError, match='has no meta/json/ folder'):
    builder.download_and_prepare(download_config=config)
  (raw / 'meta' / 'json').mkdir(parents=True)
  (raw / 'meta' / 'json' / 'train_pairs_bags.json').write_text('[]')
  with pytest.raises(FileNotFoundError, match='lacks 32 of the 33 annotation files'):
    builder.download_and_prepare(download_config=config)


def test_a_split_left_empty_is_one_line(tmp_path):
  # Every test pair's box unusable: the query split has no record, which TFDS asserts on.
  raw = tmp_path / 'raw'
  write_raw_tree(str(raw))
  (raw / 'meta' / 'json' / 'test_pairs_bags.json').write_text(
      json.dumps([{'photo': 6, 'product': 20, 'bbox': _box(5, 5, 0, 0)}]))
  with pytest.raises(SystemExit) as stopped:
    build.build('street2shop', str(raw), str(tmp_path / 'tfds'))
  message = str(stopped.value)
  assert message.startswith('error: street2shop: ') and '\n' not in message, message
  assert 'no usable record' in message, message


def test_registry_loads_built_and_refuses_unbuilt(built, tmp_path):
  builder, examples = built
  root = str(pathlib.Path(builder.data_dir).parents[2])
  loaded = datasets.get_builder('street2shop', root)
  assert loaded.info.splits['gallery'].num_examples == len(examples['gallery'])
  with pytest.raises(datasets.DatasetMissingError, match='python -m data_pipelines.build street2shop'):
    datasets.get_builder('street2shop', str(tmp_path))
  # An unknown builder config is named in one line, with the ones there are.
  message = ("dataset 'street2shop' has no config 'max2000'; choose one of default, max1024, "
             "resized320$")
  with pytest.raises(datasets.DatasetMissingError, match=message):
    datasets.get_builder('street2shop/max2000', root)
  with pytest.raises(SystemExit, match='error: ' + message):
    build.build('street2shop/max2000', str(tmp_path / 'raw'), str(tmp_path))
  # Without the raw download: one line that says which flag, before TFDS looks for it.
  (tmp_path / 'empty').mkdir()
  for manual_dir, where in ((None, 'no --manual_dir was given'),
                            (str(tmp_path / 'nowhere'), 'is not a folder'),
                            (str(tmp_path / 'empty'), 'is empty')):
    with pytest.raises(SystemExit, match='error: street2shop is built from its raw download '
                                         f'and .*{where}; pass --manual_dir=<raw root>'):
      build.build('street2shop', manual_dir, str(tmp_path / 'tfds'))


def write_clean_tree(root: str, num_train: int, num_test: int, num_distractors: int) -> None:
  """A fault-free download for training: products alternate bags/tops; every train and test
  product has 2 street photos and 2 shop photos, every distractor 2 shop photos."""
  records = {}
  images = os.path.join(root, 'images')
  os.makedirs(images)
  photo = 0
  for product in range(num_train + num_test + num_distractors):
    category = ('bags', 'tops')[product % 2]
    kind = 'train_pairs' if product < num_train else 'test_pairs'
    has_street = product < num_train + num_test
    for shop in (False, False, True, True) if has_street else (True, True):
      photo += 1
      shop_id = 100000 + photo if shop else photo
      Image.fromarray(_pixels(40, 40, product)).save(
          os.path.join(images, f'{shop_id:09d}.jpg'), format='JPEG')
      record = ({'photo': shop_id, 'product': product} if shop else
                {'photo': shop_id, 'product': product, 'bbox': _box(4, 4, 32, 32)})
      records.setdefault(('retrieval' if shop else kind, category), []).append(record)
  meta = os.path.join(root, 'meta', 'json')
  os.makedirs(meta)
  for category in s2s.CATEGORIES:
    for kind in ('train_pairs', 'test_pairs', 'retrieval'):
      with open(os.path.join(meta, f'{kind}_{category}.json'), 'w') as f:
        json.dump(records.get((kind, category), []), f)


# The fields of tests/tiny_config.py that shrink a paper config to a test-sized run.
TINY_FIELDS = [('input', 'image_size'), ('input', 'pad'), ('input', 'shuffle_buffer'),
               ('model', 'backbone'), ('model', 'width'), ('train', 'batch_size'),
               ('train', 'k'), ('train', 'log_every_steps'),
               ('train', 'checkpoint_every_steps'), ('optim', 'warmup_epochs'),
               ('eval', 'batch_size'), ('eval', 'num_ranked_queries'), ('eval', 'top_k_shown')]


def _config_path(config_name: str) -> pathlib.Path:
  return pathlib.Path(__file__).parents[2] / 'configs' / f'{config_name}.py'


def tiny_config(config_name: str, dataset: str, data_dir: str):
  """configs/<config_name>.py shrunk to the tiny model and images, one epoch."""
  import importlib.util

  import tiny_config as tiny_module

  spec = importlib.util.spec_from_file_location(config_name, _config_path(config_name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.dataset.name == dataset
  # The paper's run is far too big for a test: shrink it to the tiny model and images.
  tiny = tiny_module.get_config()
  for section, key in TINY_FIELDS:
    config[section][key] = tiny[section][key]
  config.train.num_epochs = 1
  config.dataset.data_dir = data_dir
  return config


def _run_cli(config_name: str, dataset: str, data_dir: str, workdir: str, *extra: str) -> None:
  """`python -m fashion_jax.main` with the tiny_config overrides, run in this process."""
  from fashion_jax import main as cli

  config = tiny_config(config_name, dataset, data_dir)
  overrides = [f'--config.{section}.{key}={config[section][key]}' for section, key in TINY_FIELDS]
  argv = ['main', f'--config={_config_path(config_name)}', f'--workdir={workdir}', *overrides,
          '--config.train.num_epochs=1', f'--config.dataset.data_dir={data_dir}', *extra]
  # The config flag reads its overrides from sys.argv, as a real command line has them.
  saved_argv, sys.argv = sys.argv, argv
  cli.FLAGS.unparse_flags()
  try:
    cli.FLAGS(argv)
    cli.main(argv[:1])
  finally:
    sys.argv = saved_argv
    cli.FLAGS.unparse_flags()


def train_tiny(config_name: str, dataset: str, data_dir: str, workdir: str) -> dict:
  """Trains configs/<config_name>.py for one epoch with the tiny model; returns its metrics."""
  from fashion_jax import train

  return train.train_and_evaluate(tiny_config(config_name, dataset, data_dir), workdir)


def cross_evaluate(config_name: str, dataset: str, data_dir: str, workdir: str,
                   eval_dataset: str, eval_data_dir: str, *, cli: bool = False) -> dict:
  """Evaluates the trained workdir of train_tiny on another dataset (mode=evaluate), with
  per-category tables, in Python or through the command line (`--mode=evaluate
  --config.eval.dataset=...`); checks that no training step ran; returns the metrics."""
  from fashion_jax import train

  checkpoints = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    own = json.load(f)
  if cli:
    _run_cli(config_name, dataset, data_dir, workdir, '--mode=evaluate',
             f'--config.eval.dataset={eval_dataset}', f'--config.eval.data_dir={eval_data_dir}',
             '--config.eval.per_category=True')
    metrics = None
  else:
    config = tiny_config(config_name, dataset, data_dir)
    config.mode = 'evaluate'
    config.eval.dataset = eval_dataset
    config.eval.data_dir = eval_data_dir
    config.eval.per_category = True
    metrics = train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == checkpoints
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    assert json.load(f) == own  # the training dataset's report is untouched
  out = os.path.join(workdir, 'eval', eval_dataset)
  with open(os.path.join(out, 'metrics.json')) as f:
    written = json.load(f)
  assert metrics is None or written == metrics
  metrics = written
  assert {'cmc.png', 'history.jsonl', 'per_category.csv', 'per_category.md'} <= set(
      os.listdir(out))
  assert metrics['step'] == own['step'] and metrics['dataset'] == eval_dataset
  return metrics


def _category_column(path: str) -> list[str]:
  with open(path) as f:
    return [line.split(',')[0] for line in f.read().splitlines()[1:]]


def test_street2shop_config_trains_and_evaluates_end_to_end(tmp_path):
  write_clean_tree(str(tmp_path / 'raw'), num_train=16, num_test=6, num_distractors=2)
  data_dir = str(tmp_path / 'tfds')
  built_splits.prepare_from_raw(s2s.Builder, str(tmp_path / 'raw'), data_dir)
  workdir = str(tmp_path / 'run')
  metrics = train_tiny('street2shop', 'street2shop', data_dir, workdir)
  assert metrics['step'] == 2  # 16 identities / P = 8
  assert metrics['num_queries'] == 6 * 2  # every test street crop has its shop photos
  for key in ('mAP', 'acc@1', 'acc@20'):
    assert 0.0 <= metrics[key] <= 1.0

  # Cross-domain: the Street2Shop model tested on DeepFashion's query and gallery.
  from test_deepfashion import write_clean_tree as write_c2s_tree

  from data_pipelines.deepfashion_consumer2shop import (
      deepfashion_consumer2shop_dataset_builder as c2s)
  write_c2s_tree(str(tmp_path / 'c2s_raw'), ['train'] * 2 + ['val'] * 2 + ['test'] * 3)
  c2s_dir = str(tmp_path / 'c2s_tfds')
  c2s.Builder(data_dir=c2s_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'c2s_raw')))
  cross = cross_evaluate('street2shop', 'street2shop', data_dir, workdir,
                         'deepfashion_consumer2shop', c2s_dir)
  assert cross['num_queries'] == 3 * 2 and cross['num_gallery'] == 5 * 2
  # Per-category tables name DeepFashion's clothes types, not Street2Shop's categories.
  table = os.path.join(workdir, 'eval', 'deepfashion_consumer2shop', 'per_category.csv')
  assert _category_column(table) == ['upper_body', 'lower_body', 'average over categories']


def test_beam_build_equals_plain_build(built, tmp_path):
  """The same raw tree built on Beam's DirectRunner gives the same records and fault counts."""
  import beam_check
  builder, _ = built
  beamed = beam_check.build_on_beam_and_compare(builder, 'street2shop', str(tmp_path))
  assert beamed.info.metadata['build_report']['corrupt_image'] == 2  # counted on the workers


def test_tfds_command_line_build_equals_plain_build(built, tmp_path):
  """`tfds build data_pipelines/street2shop --manual_dir=...`, TFDS's own command, builds the
  same records and fault counts, and the result loads by name with tfds.load."""
  import subprocess

  import beam_check
  builder, _ = built
  raw, _ = beam_check.raw_and_data_dir(builder)
  repo = pathlib.Path(__file__).resolve().parents[2]
  tfds_command = pathlib.Path(sys.executable).parent / 'tfds'
  result = subprocess.run(
      [str(tfds_command), 'build', 'data_pipelines/street2shop', f'--manual_dir={raw}',
       f'--data_dir={tmp_path}'], cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  built_by_cli = s2s.Builder(data_dir=str(tmp_path))
  assert built_by_cli.info.metadata['build_report'] == builder.info.metadata['build_report']
  for split in builder.info.splits:
    plain, cli = built_splits.records(builder, split), built_splits.records(built_by_cli, split)
    assert len(cli) == len(plain) > 0
    for p, c in zip(plain, cli):
      where = f'{split} item {p["item_id"]}'
      beam_check._assert_equal(p, c, where)  # pylint: disable=protected-access
  loaded = tfds.load('street2shop', split='gallery', data_dir=str(tmp_path),
                     decoders={'images': {'image': tfds.decode.SkipDecoding()}})
  assert sum(1 for _ in loaded) == len(built_splits.records(builder, 'gallery'))


def test_a_photo_over_the_pixel_limit_is_skipped_whatever_pils_limit(tmp_path, monkeypatch):
  # The builders' own limit: a process where PIL's was lifted (the search's reader lifts it and
  # checks its own) builds the same dataset.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)
  monkeypatch.setattr(raw_images, 'MAX_PIXELS', 100 * 100)
  for size, kept in (((100, 100), True), ((101, 100), False)):
    path = str(tmp_path / f'{size[0]}.png')
    Image.new('RGB', size).save(path)
    faults = raw_images.FaultCounter()
    assert (raw_images.load_rgb(path, faults) is not None) == kept
    assert faults.get('corrupt_image', 0) == (0 if kept else 1)


def test_a_product_in_both_pairs_files_is_kept_and_counted(tmp_path):
  meta = tmp_path / 'json'
  meta.mkdir()
  files = {'train_pairs_bags': [{'photo': 1, 'product': 10, 'bbox': _box(0, 0, 9, 9)}],
           'test_pairs_bags': [{'photo': 2, 'product': 10, 'bbox': _box(0, 0, 9, 9)},
                               {'photo': 3, 'product': 20, 'bbox': _box(0, 0, 9, 9)}],
           'retrieval_bags': [{'photo': 100001, 'product': 10}, {'photo': 100002, 'product': 20}]}
  for category in s2s.CATEGORIES:
    for kind in ('train_pairs', 'test_pairs', 'retrieval'):
      (meta / f'{kind}_{category}.json').write_text(json.dumps(files.get(f'{kind}_{category}',
                                                                         [])))
  faults = raw_images.FaultCounter()
  plan = s2s.plan_splits(str(meta), faults)
  assert faults.report() == {'product_in_train_and_test': 1}
  assert set(plan.splits['query']) == {(BAGS, 10), (BAGS, 20)}
  assert set(plan.splits['gallery']) == {(BAGS, 20)}
