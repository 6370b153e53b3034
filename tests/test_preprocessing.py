"""The one check of the resize names: a bad mode or filter is one line naming it and the ones
there are, from check_resize, from a config's input section and from the config check. The
bucket ladder of crop sizes and the weights of a padded crop."""

import jax
import ml_collections
import numpy as np
import pytest

from fashion_jax import configlib
from fashion_jax import preprocessing


@pytest.mark.parametrize('resize_mode,resize_filter,message', [
    ('crop', 'triangle', "resize mode 'crop' is not one of stretch, letterbox"),
    ('stretch', 'lanczos3', "resize filter 'lanczos3' is not one of triangle, area, bilinear"),
])
def test_bad_name_is_one_line_naming_it_and_the_allowed_ones(resize_mode, resize_filter,
                                                             message):
  with pytest.raises(ValueError) as error:
    preprocessing.check_resize(resize_mode, resize_filter)
  assert str(error.value) == message
  with pytest.raises(ValueError) as error:
    preprocessing.resize_images(np.zeros((1, 8, 8, 3), np.uint8), (16, 16), resize_mode,
                                resize_filter)
  assert str(error.value) == message


def test_every_mode_and_filter_passes():
  for resize_mode in preprocessing.RESIZE_MODES:
    for resize_filter in preprocessing.RESIZE_FILTERS:
      preprocessing.check_resize(resize_mode, resize_filter)


def test_config_check_names_the_config_field():
  config = configlib.base_config()
  config.dataset.name = 'fashion_synth/demo'
  configlib.validate_config(config, num_devices=1)
  config.input.resize_filter = 'sharp'
  with pytest.raises(ValueError) as error:
    configlib.validate_config(config, num_devices=1)
  assert str(error.value) == "input.resize_filter 'sharp' is not one of triangle, area, bilinear"
  config.input.resize_filter = 'area'
  config.input.resize_mode = 'crop'
  with pytest.raises(ValueError) as error:
    configlib.validate_config(config, num_devices=1)
  assert str(error.value) == "input.resize_mode 'crop' is not one of stretch, letterbox"


def test_settings_a_config_lacks_take_the_defaults():
  assert preprocessing.resize_settings(ml_collections.ConfigDict()) == ('stretch', 'triangle')
  input_config = ml_collections.ConfigDict({'resize_mode': 'letterbox', 'resize_filter': 'area'})
  assert preprocessing.resize_settings(input_config) == ('letterbox', 'area')
  assert preprocessing.resize_settings(configlib.base_config().input) == (
      preprocessing.DEFAULT_RESIZE_MODE, preprocessing.DEFAULT_RESIZE_FILTER)


def test_bucket_lengths_are_the_ladder_and_pad_under_half():
  ladder = sorted({preprocessing.bucket_length(n) for n in range(1, 5000)})
  assert ladder[:12] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
  assert all(b in (a * 4 // 3, a * 3 // 2) for a, b in zip(ladder[2:], ladder[3:]))
  for n in range(1, 5000):
    bucket = preprocessing.bucket_length(n)
    assert n <= bucket < 1.5 * n
    # The smallest rung that fits: the one below is too short.
    assert ladder.index(bucket) == 0 or ladder[ladder.index(bucket) - 1] < n


@pytest.mark.parametrize('resize_filter', preprocessing.RESIZE_FILTERS)
def test_padded_weights_are_the_crops_then_zeros(resize_filter):
  """Weights for a traced size on a padded axis: the crop's own weights, bit for bit, then zero
  columns (kernels reaching past the crop's edge included). One pixel to 24: numerators 41 and
  47, whose reciprocals times themselves miss 1."""
  padded, out, content, offset = 48, 32, 24, 3
  sizes = np.array([1, 5, 17, 24, 25, 47, 48], np.int32)
  placed = jax.jit(jax.vmap(lambda n, enlarged: preprocessing._placed_weights(
      n, out, content, offset, resize_filter, enlarged, in_length=padded)[0]))
  unpadded = jax.jit(lambda n, enlarged: preprocessing._placed_weights(
      n, out, content, offset, resize_filter, enlarged)[0], static_argnums=0)
  for enlarged in (False, True):
    weights = np.asarray(placed(sizes, np.full(sizes.shape, enlarged)))
    for n, padded_weights in zip(sizes, weights):
      np.testing.assert_array_equal(padded_weights[:, :n],
                                    np.asarray(unpadded(int(n), enlarged)), (n, enlarged))
      assert (padded_weights[:, n:] == 0).all()
