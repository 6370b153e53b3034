"""Tests for the PK training pipeline and the evaluation pipeline on fashion_synth/tiny."""

import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from data_pipelines import input_pipeline
from data_pipelines import resample
from fashion_jax import configlib
from fashion_jax import preprocessing


def _config(batch_size=8, k=2, **input_overrides):
  c = configlib.base_config()
  c.dataset.name = 'fashion_synth/tiny'
  c.input.image_size = (32, 32)
  c.input.shuffle_buffer = 64
  c.input.update(input_overrides)
  c.train.batch_size = batch_size
  c.train.k = k
  return c


def _batches(builder, config, count, **kwargs):
  item_ids = input_pipeline.train_item_ids(builder)
  ds = input_pipeline.create_train_dataset(builder, config, item_ids=item_ids, **kwargs)
  return list(itertools.islice(ds.as_numpy_iterator(), count))


def test_train_item_ids_are_the_sorted_train_identities(tiny_builder):
  ids = input_pipeline.train_item_ids(tiny_builder)
  assert len(ids) == 16 and np.all(np.diff(ids) > 0)
  query_ids = {int(ex['item_id']) for ex in tiny_builder.as_dataset(
      split='query', decoders=input_pipeline._SKIP_IMAGES).as_numpy_iterator()}
  assert not query_ids & set(ids.tolist())


def test_pk_batches_hold_whole_identities(tiny_builder):
  config = _config(batch_size=8, k=2)
  for batch in _batches(tiny_builder, config, 5):
    assert batch['images'].shape == (8, 32, 32, 3) and batch['images'].dtype == np.uint8
    labels = batch['labels'].reshape(4, 2)  # P x K, each identity's images adjacent
    assert np.all(labels == labels[:, :1])
    assert len(set(labels[:, 0])) == 4
    assert labels.min() >= 0 and labels.max() < 16


def test_an_epoch_visits_every_identity_once(tiny_builder):
  config = _config(batch_size=8, k=2)
  batches = _batches(tiny_builder, config, 8)  # 16 identities, P = 4: two epochs
  for epoch in (batches[:4], batches[4:]):
    seen = np.concatenate([b['labels'][::2] for b in epoch])
    assert sorted(seen.tolist()) == list(range(16))
  # Reshuffled between epochs.
  assert not np.array_equal(np.concatenate([b['labels'] for b in batches[:4]]),
                            np.concatenate([b['labels'] for b in batches[4:]]))


def test_resuming_at_a_step_replays_the_uninterrupted_stream(tiny_builder):
  config = _config(batch_size=8, k=2)
  full = _batches(tiny_builder, config, 7)
  resumed = _batches(tiny_builder, config, 2, start_step=5)
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a['labels'], b['labels'])
    np.testing.assert_array_equal(a['images'], b['images'])
  other_seed = _config(batch_size=8, k=2)
  other_seed.seed = 1
  assert not np.array_equal(full[0]['images'], _batches(tiny_builder, other_seed, 1)[0]['images'])


@pytest.mark.parametrize('k,expect_repeats', [(4, False), (6, True)])
def test_k_images_sampled_with_replacement_only_when_needed(tiny_builder, k, expect_repeats):
  # No random augmentation, so equal images mean the same source image was drawn twice.
  config = _config(batch_size=2 * k, k=k, flip_prob=0.0, pad=0, erasing_prob=0.0)
  batch = _batches(tiny_builder, config, 1)[0]
  for group in batch['images'].reshape(2, k, -1):
    distinct = len({row.tobytes() for row in group})
    assert (distinct < k) == expect_repeats
    assert distinct <= 4  # tiny train items have 4 images


def test_each_process_reads_its_own_identities(tiny_builder):
  config = _config(batch_size=8, k=2)
  seen = []
  for process in (0, 1):
    batches = _batches(tiny_builder, config, 4, process_index=process, process_count=2)
    seen.append({int(label) for b in batches for label in b['labels']})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(16))


def test_batches_depend_on_input_shards_not_on_processes(tiny_builder):
  config = _config(batch_size=8, k=2)
  config.input.num_shards = 2
  together = _batches(tiny_builder, config, 3)
  apart = [_batches(tiny_builder, config, 3, process_index=p, process_count=2) for p in (0, 1)]
  for step, batch in enumerate(together):
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(
          batch[key], np.concatenate([apart[0][step][key], apart[1][step][key]]))
  config.input.num_shards = 3
  with pytest.raises(ValueError, match='input.num_shards=3 must be a multiple of the 2'):
    configlib.validate_config(config, num_devices=2, num_processes=2)


def test_train_augment_flip_and_crop_without_padding_is_a_mirror():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  encoded = tf.io.encode_png(image)
  c = ml_collections.ConfigDict(dict(image_size=(16, 16), flip_prob=1.0, pad=0,
                                     erasing_prob=0.0, erasing_area=(0.02, 0.4),
                                     erasing_aspect=0.3))
  out = input_pipeline.train_augment(encoded, tf.constant([1, 2], tf.int64), c).numpy()
  np.testing.assert_array_equal(out, image[:, ::-1])


def test_random_erasing_fills_one_rectangle_with_the_mean_pixel():
  image = tf.fill([40, 60, 3], 7.0)
  areas = []
  for s in range(20):
    out = input_pipeline.random_erasing(image, tf.constant([s, 3], tf.int64), prob=1.0,
                                        area=(0.02, 0.4), min_aspect=0.3).numpy()
    erased = np.all(out == np.asarray(input_pipeline.MEAN_PIXEL, np.float32), axis=-1)
    rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
    assert erased.sum() == len(rows) * len(cols)  # a filled rectangle
    assert np.all(out[~erased] == 7.0)
    areas.append(erased.mean())
  assert 0.015 < min(areas) and max(areas) < 0.42
  untouched = input_pipeline.random_erasing(image, tf.constant([0, 3], tf.int64), prob=0.0,
                                            area=(0.02, 0.4), min_aspect=0.3)
  np.testing.assert_array_equal(untouched, image)


def test_eval_dataset_yields_every_image_once_in_a_fixed_order(tiny_builder):
  config = _config()
  expected = []
  for ex in tiny_builder.as_dataset(split='query',
                                    decoders=input_pipeline._SKIP_IMAGES).as_numpy_iterator():
    expected += [(int(ex['item_id']), image_id) for image_id in ex['images']['image_id']]
  runs = []
  for _ in range(2):
    ds = input_pipeline.create_eval_dataset(tiny_builder, 'query', config, batch_size=5)
    batches = list(ds.as_numpy_iterator())
    assert all(b['images'].shape[1:] == (32, 32, 3) for b in batches)
    assert np.all(np.concatenate([b['domain'] for b in batches]) == 0)  # street only
    runs.append([(int(i), s) for b in batches for i, s in zip(b['item_id'], b['image_id'])])
  assert runs[0] == runs[1]
  assert sorted(runs[0]) == sorted(expected)


def test_pad_and_crop_is_stateless_random_crop_of_the_padded_image():
  image = tf.constant(np.random.default_rng(1).integers(0, 256, (24, 16, 3), dtype=np.uint8))
  padded = tf.pad(image, [[3, 3], [3, 3], [0, 0]])
  corners = set()
  for s in range(40):
    seed = tf.constant([s, 5], tf.int64)
    out = input_pipeline._pad_and_crop(image, 3, seed).numpy()
    np.testing.assert_array_equal(out, tf.image.stateless_random_crop(padded, [24, 16, 3], seed))
    corners.add((out[0, 0] == 0).all() and (out[-1, -1] != 0).any())
  assert corners == {True, False}  # both padded and unpadded corners occur


def test_resize_filters_and_uint8_augmentation():
  rng = np.random.default_rng(2)
  small = tf.io.encode_jpeg(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8), quality=100)
  large = tf.io.encode_png(np.kron(rng.integers(0, 256, (8, 4, 3), dtype=np.uint8),
                                   np.ones((8, 8, 1), np.uint8)))  # 64 x 32 blocks of 8 x 8
  # Enlarging skips the antialiasing kernel; it gives the same pixels (up to rounding).
  resized = {f: input_pipeline.decode_resized_uint8(small, (32, 32), f).numpy().astype(int)
             for f in preprocessing.RESIZE_FILTERS}
  reference = tf.image.resize(tf.io.decode_jpeg(small), (32, 32), antialias=True).numpy()
  assert np.abs(resized['triangle'] - reference).max() <= 1
  assert all(np.array_equal(resized['triangle'], r) for r in resized.values())
  # Shrinking by 8 with a box filter averages each block exactly; triangle smooths across them.
  blocks = tf.io.decode_png(large).numpy()[::8, ::8]
  area = input_pipeline.decode_resized_uint8(large, (8, 4), 'area').numpy()
  np.testing.assert_array_equal(area, blocks)
  triangle = input_pipeline.decode_resized_uint8(large, (8, 4), 'triangle').numpy()
  assert 0 < np.abs(triangle.astype(int) - blocks).max()
  c = ml_collections.ConfigDict(dict(image_size=(8, 4), flip_prob=0.5, pad=1, erasing_prob=1.0,
                                     erasing_area=(0.1, 0.4), erasing_aspect=0.3,
                                     resize_filter='sharp'))
  with pytest.raises(ValueError, match="input.resize_filter 'sharp' is not one of"):
    input_pipeline.train_augment(large, tf.constant([0, 1], tf.int64), c)
  # Erasing the rounded uint8 image equals erasing the float image, then rounding.
  image = tf.constant(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
  for s in range(10):
    args = dict(seed=tf.constant([s, 9], tf.int64), prob=0.5, area=(0.02, 0.4), min_aspect=0.3)
    np.testing.assert_array_equal(
        input_pipeline.random_erasing(image, **args),
        tf.cast(input_pipeline.random_erasing(tf.cast(image, tf.float32), **args), tf.uint8))


def test_letterbox_size_is_pil_thumbnail():
  """The sizes of PIL's Image.thumbnail, except that an exact tie between the floor and the
  ceiling always goes to the floor (PIL's float arithmetic picks either)."""
  from fractions import Fraction

  from PIL import Image
  rng = np.random.default_rng(7)
  cases = [(480, 640, 320, 320), (640, 480, 320, 320), (100, 40, 32, 32), (20, 12, 32, 32),
           (32, 32, 32, 32), (33, 32, 32, 32), (1, 5000, 256, 128), (5000, 1, 256, 128),
           (300, 301, 256, 128), (7, 700, 10, 10),
           (640, 251, 320, 320), (80, 47, 40, 24)]  # ties that PIL rounds up
  cases += [tuple(int(v) for v in rng.integers(1, 900, 4)) for _ in range(400)]
  ties = 0
  for h, w, big_h, big_w in cases:
    picture = Image.new('RGB', (w, h))
    picture.thumbnail((big_w, big_h))
    pil = (picture.height, picture.width)
    # As the pipeline computes it: on TensorFlow's tensors, in int64.
    geometry = preprocessing.letterbox_geometry(tf.constant(h), tf.constant(w), (big_h, big_w),
                                                xp=tnp, dtype=tnp.int64)
    ours = tuple(int(v) for v in geometry[:2])
    if ours == pil:
      continue
    # Only the free side may differ, by one, on an exact tie, where ours takes the floor.
    aspect = Fraction(w, h)
    if big_w * h >= w * big_h:  # the height limits: compare n / H with w / h
      side, other = 1, lambda n: abs(aspect - Fraction(n, big_h))
    else:                       # the width limits: compare W / n with w / h
      side, other = 0, lambda n: abs(aspect - Fraction(big_w, n))
    assert ours[1 - side] == pil[1 - side] and pil[side] == ours[side] + 1, (h, w, big_h, big_w)
    assert other(ours[side]) == other(pil[side]), (h, w, big_h, big_w)
    ties += 1
  assert ties >= 2


def test_letterbox_keeps_the_aspect_ratio_on_white():
  rng = np.random.default_rng(8)
  for shape, content, corner in [((100, 40, 3), (32, 13), (0, 9)),   # tall: the height limits
                                 ((30, 90, 3), (11, 32), (10, 0)),   # wide: the width limits
                                 ((20, 12, 3), (20, 12), (6, 10))]:  # fits: left as it is
    image = rng.integers(0, 255, shape, dtype=np.uint8)  # never 255, so white is the canvas
    out = input_pipeline.decode_resized_uint8(tf.io.encode_png(image), (32, 32), 'triangle',
                                              'letterbox').numpy()
    top, left = corner
    inside = out[top:top + content[0], left:left + content[1]]
    np.testing.assert_array_equal(inside, resample.resize_uint8(image, content))
    mask = np.ones(out.shape[:2], bool)
    mask[top:top + content[0], left:left + content[1]] = False
    assert np.all(out[mask] == 255) and mask.sum() == 32 * 32 - content[0] * content[1]
    # TensorFlow's kernels letterbox the same way.
    area = input_pipeline.decode_resized_uint8(tf.io.encode_png(image), (32, 32), 'area',
                                               'letterbox').numpy()
    np.testing.assert_array_equal(area[mask], out[mask])
  with pytest.raises(ValueError, match="input.resize_mode 'crop' is not one of stretch, letterbox"):
    input_pipeline.train_augment(tf.io.encode_png(image), tf.constant([0, 1], tf.int64),
                                 _config(resize_mode='crop').input)


def test_letterbox_training_and_evaluation_batches(tiny_builder):
  config = _config(resize_mode='letterbox', erasing_prob=0.0, pad=0, flip_prob=0.0)
  config.input.image_size = (48, 16)  # the tiny dataset's crops are wider than 1:3
  [batch] = _batches(tiny_builder, config, 1)
  images = batch['images']
  assert images.shape == (8, 48, 16, 3)
  # Every crop is letterboxed: its top and bottom rows are the white canvas.
  assert np.all(images[:, 0] == 255) and np.all(images[:, -1] == 255)
  ds = input_pipeline.create_eval_dataset(tiny_builder, 'query', config, batch_size=5)
  first = next(iter(ds.as_numpy_iterator()))['images']
  assert first.shape[1:] == (48, 16, 3) and np.all(first[:, 0] == 255)
