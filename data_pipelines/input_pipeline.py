"""tf.data pipelines: streamed P x K training batches with the strong baseline's augmentation,
and deterministic evaluation batches. Images leave the pipeline as uint8; the model normalises.

Every split holds one example per item (identity) with all its images, so a PK batch is P
shuffled items with K of their images each, read in one pass with a bounded shuffle buffer.
"""

import math

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow.experimental.numpy as tnp
import tensorflow_datasets as tfds

from data_pipelines import resample, stored_size
from fashion_jax import augment, preprocessing

# Random erasing's fill, the ImageNet mean pixel: the same as on the device.
MEAN_PIXEL = augment.MEAN_PIXEL
_SKIP_IMAGES = {'images': {'image': tfds.decode.SkipDecoding()}}


def _read(builder, split: str, *, shuffle: bool, seed: int | None = None) -> tf.data.Dataset:
  read_config = tfds.ReadConfig(try_autocache=False, shuffle_seed=seed,
                                shuffle_reshuffle_each_iteration=True if shuffle else None)
  options = tf.data.Options()
  options.deterministic = True
  read_config.options = options
  return builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config,
                            decoders=_SKIP_IMAGES)


def train_item_ids(builder, split: str = 'train') -> np.ndarray:
  """Sorted item ids of the training identities that have at least 2 images.

  Label = position in this array; identities with one image are dropped (docs/method.md section 4).
  Reads every process's items, so all processes agree on the labels.
  """
  ds = _read(builder, split, shuffle=False).map(
      lambda ex: (ex['item_id'], tf.shape(ex['images']['image'])[0]))
  ids = [int(item) for item, count in ds.as_numpy_iterator() if count >= 2]
  if not ids:
    raise ValueError(f'split {split!r} has no identity with 2 or more images')
  return np.unique(np.asarray(ids, np.int64))


def resize_tf(image: tf.Tensor, size,
              resize_filter: str = preprocessing.DEFAULT_RESIZE_FILTER) -> tf.Tensor:
  """uint8 [h, w, 3] -> uint8 [height, width, 3] on TensorFlow's kernels, rounded.

  size: (height, width) as ints or int32 scalars. For 'triangle' the same pixels as
  data_pipelines.resample up to a .5 rounded the other way, at about five times the CPU time.
  """
  height, width = size
  target = tf.stack([height, width])
  if resize_filter == 'area':
    shrink = lambda: tf.image.resize(image, target, method='area')
  else:
    shrink = lambda: tf.image.resize(image, target, antialias=resize_filter == 'triangle')
  # Enlarging along both axes every filter is plain bilinear (for 'triangle' the same pixels as
  # its antialiased kernel, for a fraction of the cost).
  shape = tf.shape(image)
  enlarged = (shape[0] <= height) & (shape[1] <= width)
  resized = tf.cond(enlarged, lambda: tf.image.resize(image, target), shrink)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


_warned_uncompiled = False


def _resize(image: tf.Tensor, size, resize_filter: str) -> tf.Tensor:
  """uint8 [h, w, 3] -> uint8 [height, width, 3]; size: (height, width), ints or int32 scalars.

  An image already of that size is returned as it is (every filter maps it to itself), so a
  build that stores crops at the training size (docs/datasets.md) costs no resize.
  """
  global _warned_uncompiled
  height, width = size
  if resize_filter == 'triangle' and resample.available():
    # The compiled resize releases the GIL, so parallel map calls run it side by side.
    resize = lambda: tf.numpy_function(lambda x, h, w: resample.resize_uint8(x, (h, w)),
                                       [image, height, width], tf.uint8, stateful=False)
  else:
    if resize_filter == 'triangle' and not _warned_uncompiled:
      logging.warning('data_pipelines._resample is not built: the triangle resize runs on '
                      "TensorFlow's kernel, about 5x slower (reinstall with a C compiler)")
      _warned_uncompiled = True
    resize = lambda: resize_tf(image, size, resize_filter)
  shape = tf.shape(image)
  resized = tf.cond((shape[0] == height) & (shape[1] == width), lambda: image, resize)
  static = [v if isinstance(v, int) else None for v in (height, width)]
  return tf.ensure_shape(resized, static + [3])


def _letterbox(image: tf.Tensor, image_size: tuple[int, int], resize_filter: str) -> tf.Tensor:
  height, width = image_size
  shape = tf.shape(image)
  # The search's geometry, in int64: exact for any size TensorFlow decodes.
  geometry = preprocessing.letterbox_geometry(shape[0], shape[1], image_size, xp=tnp,
                                              dtype=tnp.int64)
  content_h, content_w, top, left = (tf.cast(v, tf.int32) for v in geometry)
  content = _resize(image, (content_h, content_w), resize_filter)
  padding = [[top, height - content_h - top], [left, width - content_w - left], [0, 0]]
  return tf.ensure_shape(tf.pad(content, padding, constant_values=255), [height, width, 3])


def decode_resized_uint8(encoded: tf.Tensor, image_size: tuple[int, int],
                         resize_filter: str = preprocessing.DEFAULT_RESIZE_FILTER,
                         resize_mode: str = preprocessing.DEFAULT_RESIZE_MODE) -> tf.Tensor:
  """JPEG/PNG bytes -> uint8 [H, W, 3]: stretched or letterboxed to image_size, rounded."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  if resize_mode == 'letterbox':
    return _letterbox(image, tuple(image_size), resize_filter)
  return _resize(image, tuple(image_size), resize_filter)


def decode_resized(encoded: tf.Tensor, image_size: tuple[int, int],
                   resize_filter: str = preprocessing.DEFAULT_RESIZE_FILTER,
                   resize_mode: str = preprocessing.DEFAULT_RESIZE_MODE) -> tf.Tensor:
  """JPEG/PNG bytes -> float32 [H, W, 3] in [0, 255] (rounded), resized to image_size."""
  return tf.cast(decode_resized_uint8(encoded, image_size, resize_filter, resize_mode),
                 tf.float32)


def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, prob: float, area: tuple[float, float],
                   min_aspect: float, attempts: int = 100) -> tf.Tensor:
  """Zhong et al.'s random erasing, stateless: image [H, W, 3] (any dtype) -> same shape.

  Like the reference it tries up to `attempts` rectangles and erases the first one that fits;
  the tries are drawn at once and the first fitting one is chosen.
  """
  height, width = image.shape[0], image.shape[1]
  seeds = tf.random.experimental.stateless_split(seed, 5)
  apply = tf.random.stateless_uniform([], seeds[0]) < prob
  target = tf.random.stateless_uniform([attempts], seeds[1], area[0], area[1]) * height * width
  aspect = tf.random.stateless_uniform([attempts], seeds[2], min_aspect, 1.0 / min_aspect)
  h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (h < height) & (w < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h, w = h[first], w[first]
  top = tf.random.stateless_uniform([], seeds[3], 0, tf.maximum(height - h, 1), tf.int32)
  left = tf.random.stateless_uniform([], seeds[4], 0, tf.maximum(width - w, 1), tf.int32)

  def erase():
    # The image around the rectangle, stitched back together (a broadcasting select over the
    # whole image costs ten times more).
    fill = tf.broadcast_to(tf.constant(MEAN_PIXEL, image.dtype), [h, w, 3])
    band = tf.concat([image[top:top + h, :left], fill, image[top:top + h, left + w:]], axis=1)
    return tf.concat([image[:top], band, image[top + h:]], axis=0)

  return tf.cond(apply & tf.reduce_any(fits), erase, lambda: image)


def _pad_and_crop(image: tf.Tensor, pad: int, seed: tf.Tensor) -> tf.Tensor:
  """tf.image.stateless_random_crop of the image zero-padded by `pad`, without the padded copy.

  The offset is drawn exactly as stateless_random_crop draws it, so the result is the same.
  """
  height, width = image.shape[0], image.shape[1]
  offset = tf.random.stateless_uniform([3], seed, maxval=tf.int32.max, dtype=tf.int32)
  offset = offset % tf.constant([2 * pad + 1, 2 * pad + 1, 1])
  top, left = offset[0] - pad, offset[1] - pad  # the window's corner in the unpadded image
  window = image[tf.maximum(top, 0):tf.minimum(top + height, height),
                 tf.maximum(left, 0):tf.minimum(left + width, width)]
  padding = [[tf.maximum(-top, 0), tf.maximum(top, 0)], [tf.maximum(-left, 0), tf.maximum(left, 0)],
             [0, 0]]
  return tf.ensure_shape(tf.pad(window, padding), [height, width, 3])


def train_augment(encoded: tf.Tensor, seed: tf.Tensor, input_config) -> tf.Tensor:
  """RST order: resize -> flip -> zero-pad + random crop -> (normalise, in the model) -> erase.

  Everything after the resize moves or overwrites whole pixels, so it runs on the rounded
  uint8 image: the same result as on floats, at a quarter of the memory traffic.
  """
  resize_mode, resize_filter = preprocessing.resize_settings(input_config)
  image = decode_resized_uint8(encoded, tuple(input_config.image_size), resize_filter,
                               resize_mode)
  return augment_resized(image, seed, input_config)


def augment_resized(image: tf.Tensor, seed: tf.Tensor, input_config) -> tf.Tensor:
  """The random part of train_augment: uint8 [H, W, 3] at input.image_size -> the same shape,
  flipped, padded + cropped and erased (fashion_jax/augment.py does this on the device)."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  flip = tf.random.stateless_uniform([], seeds[0]) < input_config.flip_prob
  image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  image = _pad_and_crop(image, input_config.pad, seeds[1])
  return random_erasing(image, seeds[2], prob=input_config.erasing_prob,
                        area=tuple(input_config.erasing_area),
                        min_aspect=input_config.erasing_aspect)


def _identity_stream(builder, config, table, *, shard: int, num_shards: int, shard_p: int,
                     start_step: int) -> tf.data.Dataset:
  """Endless P x K batches of one input shard: shard_p identities per batch, K images each."""
  k, seed = config.train.k, config.seed
  split = tfds.split_for_jax_process(config.dataset.train_split, process_index=shard,
                                     process_count=num_shards)
  ds = _read(builder, split, shuffle=True, seed=seed * 7919 + shard)
  ds = ds.map(lambda ex: {'encoded': ex['images']['image'],
                          'label': table.lookup(tf.cast(ex['item_id'], tf.int64))})
  ds = ds.filter(lambda ex: ex['label'] >= 0)
  ds = ds.shuffle(config.input.shuffle_buffer, seed=seed * 7919 + shard,
                  reshuffle_each_iteration=True).repeat()
  # Images are decoded only after the skip, so fast-forwarding reads bytes but decodes nothing.
  ds = ds.enumerate().skip(start_step * shard_p)

  def pick_k(index, ex):
    element_seed = tf.stack([tf.constant(seed * 1009 + shard, tf.int64), index])
    pick_seed, image_seed = tf.unstack(tf.random.experimental.stateless_split(element_seed, 2))
    count = tf.shape(ex['encoded'])[0]
    chosen = tf.cond(
        count >= k,
        lambda: tf.random.experimental.stateless_shuffle(tf.range(count), pick_seed)[:k],
        lambda: tf.random.stateless_uniform([k], pick_seed, 0, count, tf.int32))
    return {'encoded': tf.gather(ex['encoded'], chosen),
            'label': tf.fill([k], ex['label']),
            'seed': tf.random.experimental.stateless_split(image_seed, k)}

  ds = ds.map(pick_k).unbatch()
  if config.input.get('augment_on_device', False):
    # The step augments (fashion_jax/augment.py); the same images are picked either way.
    resize_mode, resize_filter = preprocessing.resize_settings(config.input)
    prepare = lambda ex: decode_resized_uint8(ex['encoded'], tuple(config.input.image_size),
                                              resize_filter, resize_mode)
  else:
    prepare = lambda ex: train_augment(ex['encoded'], ex['seed'], config.input)
  ds = ds.map(lambda ex: {'images': prepare(ex), 'labels': ex['label']},
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(shard_p * k, drop_remainder=True)


def num_input_shards(config, process_count: int) -> int:
  """Input shards: independent identity streams whose batches are concatenated in order.

  The global batch depends on the number of shards, not on the number of processes reading
  them, so a run on 2 processes sees the same batches as one process reading both shards.
  `configlib.validate_config` checks that the shards split evenly over processes and P.
  """
  return config.input.get('num_shards') or process_count


def create_train_dataset(builder, config, *, item_ids: np.ndarray, start_step: int = 0,
                         process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """Endless PK batches for this process: {'images': [P_local*K, H, W, 3] uint8, 'labels': [.]}.

  Identities are shuffled with a bounded buffer and visited once per epoch; an identity with
  fewer than K images is sampled with replacement. Each process reads only its own input
  shards. Every random choice is a stateless function of (seed, shard, element index), so
  starting at `start_step` yields exactly the batches an uninterrupted run would have seen
  from that step on.
  """
  stored_size.check(builder, config.input)
  num_shards = num_input_shards(config, process_count)
  shard_p = config.train.batch_size // config.train.k // num_shards
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(item_ids, tf.int64),
                                          tf.range(len(item_ids), dtype=tf.int32)),
      default_value=-1)
  per_process = num_shards // process_count
  streams = tuple(
      _identity_stream(builder, config, table, shard=shard, num_shards=num_shards,
                       shard_p=shard_p, start_step=start_step)
      for shard in range(process_index * per_process, (process_index + 1) * per_process))
  ds = streams[0] if len(streams) == 1 else tf.data.Dataset.zip(streams).map(
      lambda *batches: {key: tf.concat([b[key] for b in batches], axis=0)
                        for key in ('images', 'labels')})
  return ds.prefetch(tf.data.AUTOTUNE)


def create_eval_dataset(builder, split: str, config, *, batch_size: int, process_index: int = 0,
                        process_count: int = 1) -> tf.data.Dataset:
  """One element per image, in a fixed order, batched (the last batch may be short).

  Yields {'images': [B, H, W, 3] uint8, 'item_id', 'category', 'domain': [B] int64,
  'image_id': [B] bytes}.
  """
  stored_size.check(builder, config.input)
  split = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
  ds = _read(builder, split, shuffle=False)

  def per_image(ex):
    n = tf.shape(ex['images']['image'])[0]
    return {'encoded': ex['images']['image'],
            'item_id': tf.fill([n], tf.cast(ex['item_id'], tf.int64)),
            'category': tf.fill([n], tf.cast(ex['category'], tf.int64)),
            'domain': tf.cast(ex['images']['domain'], tf.int64),
            'image_id': ex['images']['image_id']}

  ds = ds.map(per_image).unbatch()

  resize_mode, resize_filter = preprocessing.resize_settings(config.input)

  def decode(ex):
    ex = dict(ex)
    ex['images'] = decode_resized_uint8(ex.pop('encoded'), tuple(config.input.image_size),
                                        resize_filter, resize_mode)
    return ex

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(num_identities: int, global_p: int) -> int:
  """An epoch visits every identity about once: ceil(identities / P) steps."""
  return max(1, math.ceil(num_identities / global_p))
