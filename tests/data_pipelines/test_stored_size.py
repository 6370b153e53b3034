"""The `resized320` builds: the default build's images resized as training resizes them, stored
once; the input pipeline then decodes them without resizing."""

import functools
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import built_splits
import test_deepfashion
import test_inshop
import test_street2shop
from data_pipelines import input_pipeline, stored_size
from data_pipelines.deepfashion_consumer2shop import (
    deepfashion_consumer2shop_dataset_builder as c2s)
from data_pipelines.deepfashion_inshop import deepfashion_inshop_dataset_builder as inshop
from data_pipelines.street2shop import street2shop_dataset_builder as s2s
from fashion_jax import configlib

DATASETS = {
    'street2shop': (s2s.Builder, test_street2shop.write_raw_tree),
    'deepfashion_consumer2shop': (c2s.Builder, test_deepfashion.write_raw_tree),
    'deepfashion_inshop': (inshop.Builder, test_inshop.write_raw_tree),
}


def _decoded(jpeg: bytes) -> np.ndarray:
  return tf.io.decode_jpeg(jpeg, channels=3).numpy()


@pytest.fixture(scope='module', params=sorted(DATASETS))
def builds(request, tmp_path_factory):
  """(default build, resized320 build) of one dataset's fake raw tree."""
  builder_class, write_raw_tree = DATASETS[request.param]
  tmp = tmp_path_factory.mktemp(request.param)
  write_raw_tree(str(tmp / 'raw'))
  return tuple(built_splits.prepare_from_raw(functools.partial(builder_class, config=config),
                                             str(tmp / 'raw'), str(tmp / 'tfds'))
               for config in ('default', 'resized320'))


def test_resized_build_is_the_default_build_resized_as_training_does(builds):
  default, resized = builds
  assert stored_size.stored_size(default) is None
  assert stored_size.stored_size(resized) == (320, 320)
  worst = []
  for split in ('train', 'query', 'gallery'):
    kept, stored = (built_splits.records(b, split) for b in builds)
    assert [int(ex['item_id']) for ex in kept] == [int(ex['item_id']) for ex in stored]
    for ex_kept, ex_stored in zip(kept, stored):
      assert list(ex_kept['images']['image_id']) == list(ex_stored['images']['image_id'])
      for jpeg_kept, jpeg_stored in zip(ex_kept['images']['image'], ex_stored['images']['image']):
        pixels = _decoded(jpeg_stored)
        assert pixels.shape == (320, 320, 3)
        # The pipeline decodes a stored image as it is: the resize is skipped, not redone.
        np.testing.assert_array_equal(
            input_pipeline.decode_resized_uint8(tf.constant(jpeg_stored), (320, 320)).numpy(),
            pixels)
        reference = input_pipeline.decode_resized_uint8(tf.constant(jpeg_kept), (320, 320))
        # Exactly the training resize of the default build's image, JPEG-coded once more.
        buffer = io.BytesIO()
        Image.fromarray(reference.numpy()).save(buffer, format='JPEG',
                                                quality=stored_size.JPEG_QUALITY)
        np.testing.assert_array_equal(_decoded(buffer.getvalue()), pixels)
        worst.append(stored_size.pixel_difference(pixels, reference.numpy()))
  # The fixtures' images are uniform noise, JPEG's worst case (up to 4.6 grey levels on
  # average); bench/README.md has the figures for photographs.
  assert max(d['mean_abs'] for d in worst) < 6
  assert min(d['psnr_db'] for d in worst) > 30


def test_resized_build_refuses_another_training_size_or_resize(builds):
  _, resized = builds
  config = configlib.base_config().input
  stored_size.check(resized, config)
  for field, value in (('image_size', (256, 128)), ('resize_mode', 'letterbox'),
                       ('resize_filter', 'area')):
    changed = config.copy_and_resolve_references()
    changed[field] = value
    with pytest.raises(ValueError, match='stores its crops resized to 320x320'):
      stored_size.check(resized, changed)


def test_resize_is_skipped_only_at_the_training_size():
  image = np.random.default_rng(0).integers(0, 256, (48, 32, 3), np.uint8)
  encoded = tf.io.encode_png(image)
  for resize_filter in ('triangle', 'area', 'bilinear'):
    out = input_pipeline.decode_resized_uint8(encoded, (48, 32), resize_filter).numpy()
    np.testing.assert_array_equal(out, image)
    assert input_pipeline.decode_resized_uint8(encoded, (32, 32), resize_filter).shape == (
        32, 32, 3)


def test_builds_that_keep_their_crops_train_at_any_size(tiny_builder):
  # fashion_synth's config has an int `image_size` (its shop images' side): not a stored size.
  assert stored_size.stored_size(tiny_builder) is None
  config = configlib.base_config()
  config.input.image_size = (48, 32)
  config.train.batch_size, config.train.k = 8, 2
  stored_size.check(tiny_builder, config.input)
  batch = next(iter(input_pipeline.create_train_dataset(
      tiny_builder, config, item_ids=input_pipeline.train_item_ids(tiny_builder))))
  assert batch['images'].shape == (8, 48, 32, 3)


def test_build_help_lists_every_dataset_and_config():
  # `python -m data_pipelines.build --help` prints the module docstring: the only place a user
  # sees the configs before a build fails.
  import importlib
  import re

  import tensorflow_datasets as tfds

  from data_pipelines import build, datasets
  listed = dict(re.findall(r'^  (\w+) +(.+)$', build.__doc__, re.M))
  assert set(listed) == set(datasets.BUILDER_MODULES)
  for name, module in datasets.BUILDER_MODULES.items():
    importlib.import_module(module)
    configs = [config.name for config in tfds.builder_cls(name).BUILDER_CONFIGS]
    assert re.findall(r'(\w+)(?: \([^)]*\))?(?:, |$)', listed[name]) == configs, name
