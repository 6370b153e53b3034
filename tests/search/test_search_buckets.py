"""Crop sizes in buckets: preprocess (what SearchModel.prepare calls) compiles once per padded
height and once per padded width, not once per crop size, and gives resize_images' pixels
exactly."""

import jax
import numpy as np
import pytest

from fashion_jax import preprocessing
from fashion_jax.preprocessing import RESIZE_FILTERS, RESIZE_MODES, padded_size

TARGET = (40, 24)
# One pixel, thin either way (80 x 1: values on .5 from the rows, then a one-pixel axis padded
# to 128 columns), enlarged along both axes, halved, on a rung (24, 128) and one past it (25,
# 129), tall and shrunk a lot. (bench/README.md: many more sizes.)
SIZES = ((1, 1), (1, 37), (80, 1), (3, 2), (80, 48), (24, 25), (128, 129), (300, 61))


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
  for (resize_mode, resize_filter), expected in _unbucketed(images).items():
    np.testing.assert_array_equal(
        np.asarray(preprocessing.preprocess(images, TARGET, resize_mode, resize_filter)),
        np.asarray(expected), f'{size} {resize_mode} {resize_filter}')


def _distinct_sizes(count: int, low: int, high: int, seed: int) -> list[tuple[int, int]]:
  rng = np.random.default_rng(seed)
  sizes = []
  while len(sizes) < count:
    size = tuple(int(v) for v in rng.integers(low, high + 1, 2))
    if size not in sizes:
      sizes.append(size)
  return sizes


def _buckets(sizes) -> int:
  """Compilations due to `sizes`: one per padded height, one per padded width."""
  padded = [padded_size(h, w) for h, w in sizes]
  return len({h for h, _ in padded}) + len({w for _, w in padded})


def test_one_compilation_per_padded_height_and_width():
  # A target no other test uses: every compilation counted here is this test's.
  target = (20, 12)
  rng = np.random.default_rng(0)
  before = preprocessing.preprocess_compilations()
  # 100 sizes, all padded to 128 x 256.
  first = [(h, w + 128) for h, w in _distinct_sizes(100, 97, 128, seed=1)]
  for height, width in first:
    preprocessing.preprocess(rng.integers(0, 256, (1, height, width, 3), np.uint8), target)
  assert preprocessing.preprocess_compilations() - before == _buckets(first) == 2
  # 50 sizes over 7 padded heights and 4 padded widths, 128 rows and 256 columns among them
  # (not compiled again): one compilation for each, not one for each of the 18 pairs met.
  sizes = _distinct_sizes(50, 49, 400, seed=2)
  for height, width in sizes:
    preprocessing.preprocess(rng.integers(0, 256, (1, height, width, 3), np.uint8), target)
  assert preprocessing.preprocess_compilations() - before == _buckets(first + sizes) == 11


def test_search_model_prepares_through_the_buckets(model, monkeypatch):
  """The service's path where the resize runs in JAX (filters other than the default, or the
  compiled kernel not built): SearchModel.prepare of 100 crop sizes compiles at most one resize
  per padded height and width (fewer where earlier tests compiled some)."""
  monkeypatch.setattr(model, 'host_resize', False)
  rng = np.random.default_rng(3)
  sizes = _distinct_sizes(100, 97, 192, seed=4)
  before = preprocessing.preprocess_compilations()
  for height, width in sizes:
    crop = rng.integers(0, 256, (height, width, 3), np.uint8)
    prepared = model.prepare(crop)
    assert prepared.shape == model.image_size + (3,) and prepared.dtype == np.uint8
  assert _buckets(sizes) == 4
  assert preprocessing.preprocess_compilations() - before <= 4
  np.testing.assert_array_equal(
      prepared, np.asarray(preprocessing.resize_images(crop[None], model.image_size,
                                                       model.resize_mode,
                                                       model.resize_filter))[0])
