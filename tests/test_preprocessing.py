"""The one check of the resize names: a bad mode or filter is one line naming it and the ones
there are, from check_resize, from a config's input section and from the config check."""

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
