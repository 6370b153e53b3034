"""Crop sizes in buckets: preprocess (what SearchModel.prepare calls) compiles once per bucket
of crop sizes, not once per size, and gives resize_images' pixels exactly."""

import jax
import numpy as np
import pytest

from fashion_jax import preprocessing
from fashion_jax.preprocessing import RESIZE_FILTERS, RESIZE_MODES, bucket_length

TARGET = (40, 24)
# One pixel, thin either way, enlarged along both axes, halved (many values exactly on .5), on
# a rung (24) and one past it (25), tall and shrunk a lot. (bench/README.md: many more sizes.)
SIZES = ((1, 1), (1, 37), (45, 1), (3, 2), (80, 48), (24, 25), (300, 61))


@jax.jit
def _unbucketed(images):
  """resize_images in every mode and filter: {(mode, filter): uint8 [B, 40, 24, 3]}, one
  compilation per crop size."""
  return {(resize_mode, resize_filter): preprocessing.resize_images(images, TARGET, resize_mode,
                                                                    resize_filter)
          for resize_mode in RESIZE_MODES for resize_filter in RESIZE_FILTERS}


@pytest.mark.parametrize('size', SIZES, ids=[f'{h}x{w}' for h, w in SIZES])
def test_bucketed_pixels_are_resize_images_pixels(size):
  rng = np.random.default_rng(size[0] * 1000 + size[1])
  images = rng.integers(0, 256, (2,) + size + (3,), np.uint8)
  # Padding must not leak in: the zeros preprocess pads with are not what the crop's edge is.
  images[:, -1, :] = 255
  images[:, :, -1] = 255
  for (resize_mode, resize_filter), expected in _unbucketed(images).items():
    np.testing.assert_array_equal(
        np.asarray(preprocessing.preprocess(images, TARGET, resize_mode, resize_filter)),
        np.asarray(expected), f'{size} {resize_mode} {resize_filter}')


def _compiled() -> int:
  return preprocessing._resize_bucket._cache_size()


def _distinct_sizes(count: int, low: int, high: int, seed: int) -> list[tuple[int, int]]:
  rng = np.random.default_rng(seed)
  sizes = []
  while len(sizes) < count:
    size = tuple(int(v) for v in rng.integers(low, high + 1, 2))
    if size not in sizes:
      sizes.append(size)
  return sizes


def test_one_compilation_per_bucket():
  # A target no other test uses: every compilation counted here is this test's.
  target = (20, 12)
  rng = np.random.default_rng(0)
  before = _compiled()
  # 100 sizes, all in the bucket 128 x 128.
  for height, width in _distinct_sizes(100, 97, 128, seed=1):
    preprocessing.preprocess(rng.integers(0, 256, (1, height, width, 3), np.uint8), target)
  assert _compiled() - before == 1
  # Sizes over 9 bucket pairs: one compilation for each pair met (the one above included: it
  # is not compiled again).
  sizes = _distinct_sizes(30, 49, 128, seed=2)
  for height, width in sizes:
    preprocessing.preprocess(rng.integers(0, 256, (1, height, width, 3), np.uint8), target)
  buckets = {(bucket_length(h), bucket_length(w)) for h, w in sizes} | {(128, 128)}
  assert _compiled() - before == len(buckets) < len(sizes)


def test_search_model_prepares_through_the_buckets(model):
  """The service's path: SearchModel.prepare of 100 crop sizes compiles at most one resize
  per bucket pair they fall in (fewer where earlier tests compiled some)."""
  rng = np.random.default_rng(3)
  sizes = _distinct_sizes(100, 97, 192, seed=4)
  before = _compiled()
  for height, width in sizes:
    crop = rng.integers(0, 256, (height, width, 3), np.uint8)
    prepared = model.prepare(crop)
    assert prepared.shape == model.image_size + (3,) and prepared.dtype == np.uint8
  buckets = {(bucket_length(h), bucket_length(w)) for h, w in sizes}
  assert len(buckets) == 4
  assert _compiled() - before <= len(buckets)
  np.testing.assert_array_equal(
      prepared, np.asarray(preprocessing.resize_images(crop[None], model.image_size,
                                                       model.resize_mode,
                                                       model.resize_filter))[0])
