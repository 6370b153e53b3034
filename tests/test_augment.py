"""The device augmentation: against a NumPy reference for fixed keys, against the host
pipeline's statistics, inside the sharded step, and across a resumed run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tiny_config
from fashion_jax import augment, checkpointing, configlib, optim, train
from fashion_jax import train_step as ts
from fashion_jax.models import build_model


def _reference(image: np.ndarray, key, aug: augment.Augmentation) -> np.ndarray:
  """One example in NumPy: the uniform draws taken from the documented key layout of
  augment.draw, everything computed from them written out here."""
  height, width = image.shape[:2]
  k_flip, k_crop, k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(key, 7)
  out = image[:, ::-1] if float(jax.random.uniform(k_flip)) < aug.flip_prob else image
  top, left = np.asarray(jax.random.randint(k_crop, (2,), 0, 2 * aug.pad + 1)) - aug.pad
  padded = np.pad(out, ((aug.pad, aug.pad), (aug.pad, aug.pad), (0, 0)))
  out = padded[aug.pad + top:aug.pad + top + height, aug.pad + left:aug.pad + left + width].copy()
  low, high = aug.erasing_area
  areas = np.asarray(jax.random.uniform(k_area, (aug.attempts,), minval=low, maxval=high))
  aspects = np.asarray(jax.random.uniform(k_aspect, (aug.attempts,), minval=aug.erasing_aspect,
                                          maxval=1 / aug.erasing_aspect))
  for area, aspect in zip(areas * np.float32(height * width), aspects):
    h = int(np.round(np.sqrt(area * aspect)))
    w = int(np.round(np.sqrt(area / aspect)))
    if h < height and w < width:
      break
  else:
    return out
  if float(jax.random.uniform(k_apply)) < aug.erasing_prob:
    y = int(jax.random.randint(k_top, (), 0, max(height - h, 1)))
    x = int(jax.random.randint(k_left, (), 0, max(width - w, 1)))
    out[y:y + h, x:x + w] = augment.MEAN_PIXEL
  return out


@pytest.mark.parametrize('aug', [
    augment.Augmentation(pad=4),
    # Areas up to 90 % of a 40x24 image: many tries do not fit, so the first fitting one matters.
    augment.Augmentation(pad=3, flip_prob=0.7, erasing_prob=1.0, erasing_area=(0.5, 0.9),
                         erasing_aspect=0.2, attempts=5),
])
def test_device_augmentation_equals_numpy_reference(aug):
  images = np.random.default_rng(1).integers(0, 256, (48, 40, 24, 3), dtype=np.uint8)
  keys = augment.example_keys(7, jnp.int32(11), jnp.arange(48))
  out = np.asarray(jax.jit(augment.augment_batch, static_argnums=2)(images, keys, aug))
  expected = np.stack([_reference(image, key, aug) for image, key in zip(images, keys)])
  np.testing.assert_array_equal(out, expected)
  # The fixed keys exercise every branch, or the comparison proves little.
  choices = jax.vmap(lambda k: augment.draw(k, (40, 24), aug))(keys)
  assert 0 < int(jnp.sum(choices['flip'])) < 48
  assert 0 < int(jnp.sum(choices['erase'])) <= 48
  assert len(set(np.asarray(choices['top']).tolist())) == 2 * aug.pad + 1


def test_keys_depend_on_seed_step_and_example_only():
  a = augment.example_keys(3, jnp.int32(5), jnp.arange(4, 8))
  b = augment.example_keys(3, jnp.int32(5), jnp.arange(8))[4:]
  np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
  for other in (augment.example_keys(4, jnp.int32(5), jnp.arange(4, 8)),
                augment.example_keys(3, jnp.int32(6), jnp.arange(4, 8))):
    assert not np.any(np.all(jax.random.key_data(a) == jax.random.key_data(other), axis=-1))
  # Independent of the stochastic-depth key of the same seed and step.
  step_key = ts.step_key(3, jnp.int32(5), jnp.int32(0))
  assert not np.any(np.all(jax.random.key_data(a) == jax.random.key_data(step_key), axis=-1))


def _coded_image(height: int, width: int) -> np.ndarray:
  """Each pixel says where it came from: (row + 1, column + 1, 255); padding is (0, 0, 0) and
  erasing the mean pixel, whose blue differs from 255."""
  rows, cols = np.meshgrid(np.arange(height) + 1, np.arange(width) + 1, indexing='ij')
  return np.stack([rows, cols, np.full_like(rows, 255)], -1).astype(np.uint8)


def _recover(out: np.ndarray) -> tuple[bool, int, int, int, int]:
  """(flipped, top, left, erased height, erased width) of an augmented _coded_image."""
  height, width = out.shape[:2]
  erased = np.all(out == augment.MEAN_PIXEL, axis=-1)
  h = int(np.any(erased, axis=1).sum())
  w = int(np.any(erased, axis=0).sum())
  content = out[..., 2] == 255
  row = int(np.argmax(content.sum(axis=1) >= 2))  # a row with two source pixels
  j1, j2 = np.flatnonzero(content[row])[:2]
  flipped = out[row, j2, 1] < out[row, j1, 1]
  top = int(out[row, j1, 0]) - 1 - row
  x = int(out[row, j1, 1]) - 1  # source column of output column j1
  left = (width - 1 - x - j1) if flipped else x - j1
  assert h * w == erased.sum()  # one rectangle
  return bool(flipped), top, left, h, w


def _ks(a: np.ndarray, b: np.ndarray) -> float:
  """Two-sample Kolmogorov-Smirnov statistic."""
  grid = np.union1d(a, b)
  cdf = lambda s: np.searchsorted(np.sort(s), grid, side='right') / len(s)
  return float(np.max(np.abs(cdf(a) - cdf(b))))


def test_device_augmentation_statistics_match_the_host():
  import tensorflow as tf

  from data_pipelines import input_pipeline
  n, height, width = 3000, 40, 32
  config = configlib.base_config().input
  config.image_size, config.pad = (height, width), 4
  image = _coded_image(height, width)
  host = tf.data.Dataset.range(n).map(
      lambda i: input_pipeline.augment_resized(tf.constant(image), tf.stack([i, 17]), config))
  host = np.stack([_recover(out) for out in host.as_numpy_iterator()])
  keys = augment.example_keys(0, jnp.int32(0), jnp.arange(n))
  aug = augment.Augmentation.from_config(config)
  device = np.asarray(jax.jit(augment.augment_batch, static_argnums=2)(
      np.broadcast_to(image, (n, height, width, 3)), keys, aug))
  device = np.stack([_recover(out) for out in device])

  # Rates: within 4 standard errors of each other.
  for column, p in ((0, config.flip_prob), (3, config.erasing_prob)):
    rate = lambda s: np.mean(s[:, column] > 0)
    assert abs(rate(host) - rate(device)) < 4 * np.sqrt(2 * p * (1 - p) / n)
    assert abs(rate(device) - p) < 4 * np.sqrt(p * (1 - p) / n)
  # Distributions: two-sample KS below its 0.1 % critical value, 1.95 * sqrt(2 / n).
  critical = 1.95 * np.sqrt(2 / n)
  for column in (1, 2):  # crop offsets, uniform on [-pad, pad]
    assert _ks(host[:, column], device[:, column]) < critical
    assert set(device[:, column]) == set(range(-config.pad, config.pad + 1))
  erased = lambda s: s[s[:, 3] > 0]
  h_host, h_device = erased(host), erased(device)
  area = lambda s: s[:, 3] * s[:, 4] / (height * width)
  aspect = lambda s: s[:, 3] / s[:, 4]
  for stat in (area, aspect):
    assert _ks(stat(h_host), stat(h_device)) < 1.95 * np.sqrt(
        (len(h_host) + len(h_device)) / (len(h_host) * len(h_device)))
  low, high = config.erasing_area
  assert low - 0.02 < area(h_device).min() and area(h_device).max() < high + 0.02


def _step_setup(config):
  model = build_model(config.model, 8, seed=0)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=10)
  graphdef, state = ts.create_train_state(model, tx, 8, loss_config=config.loss, seed=0)
  return graphdef, state, tx, schedule


def test_sharded_step_augments_each_example_by_its_place_in_the_global_batch():
  assert jax.device_count() == 4, 'tests/conftest.py sets 4 simulated CPU devices'
  c = configlib.base_config()
  c.model.backbone, c.model.width = 'resnet10_ibn_a', 8
  c.optim.warmup_epochs, c.input.pad = 0, 4
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  labels = np.repeat(rng.permutation(8), 2).astype(np.int32)
  graphdef, state, tx, schedule = _step_setup(c)
  state = jax.device_get(state)
  state['step'] = np.int32(3)
  aug = augment.Augmentation.from_config(c.input)
  mesh = ts.make_mesh()
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  put = lambda x: jax.device_put(x, sharding)

  on_device = ts.make_train_step(graphdef, tx, mesh, c.loss, schedule, seed=5, augmentation=aug)
  got, got_metrics = on_device(ts.replicate(state, mesh), put(images), put(labels))
  # Reference: the whole batch augmented in one piece, then the plain step.
  augmented = np.asarray(augment.augment_batch(
      images, augment.example_keys(5, jnp.int32(3), jnp.arange(16)), aug))
  assert np.mean(augmented != images) > 0.1
  plain = ts.make_train_step(graphdef, tx, mesh, c.loss, schedule, seed=5)
  want, want_metrics = plain(ts.replicate(state, mesh), put(augmented), put(labels))
  np.testing.assert_allclose(got_metrics['loss'], want_metrics['loss'], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  unaugmented, _ = plain(ts.replicate(state, mesh), put(images), put(labels))
  assert float(jnp.abs(unaugmented['params']['classifier']['kernel']
                       - got['params']['classifier']['kernel']).max()) > 1e-6


def _run(data_dir, workdir, num_epochs):
  c = tiny_config.get_config()
  c.dataset.data_dir = data_dir
  c.input.augment_on_device = True
  c.train.num_epochs = num_epochs
  c.mode = 'train'
  train.train_and_evaluate(c, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  step, params = ckpt.latest_step(), ckpt.restore()['params']
  ckpt.close()
  return step, params


def test_resumed_run_with_device_augmentation_equals_uninterrupted_run(tiny_data_dir, tmp_path):
  _run(tiny_data_dir, str(tmp_path / 'resumed'), 2)
  step_a, params_a = _run(tiny_data_dir, str(tmp_path / 'resumed'), 3)
  step_b, params_b = _run(tiny_data_dir, str(tmp_path / 'straight'), 3)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
