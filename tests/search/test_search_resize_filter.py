"""Resize filters (input.resize_filter = 'triangle', 'area' or 'bilinear'): TensorFlow's weights,
the tf.data pipeline's pixels in both resize modes, symbolic image sizes, and the fingerprint."""

import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fashion_jax.preprocessing import (RESIZE_FILTERS, _numerators, _placed_weights, preprocess,
                                      resize_images)
from fashion_jax.search import index as search_index
from fashion_jax.search.images import InputError
from fashion_jax.search.model import SearchModel

TARGET = (40, 24)
# Against (40, 24): both axes shrunk (by factors that are not whole), both enlarged, mixed
# either way, exactly the target, halved (many values exactly on .5).
SIZES = ((90, 40), (17, 11), (17, 50), (60, 13), (40, 24), (80, 48))


def _workdir_with(path, workdir, **settings) -> str:
  """The fixture workdir's checkpoint with `settings` in config.json's input section."""
  shutil.copytree(os.path.join(workdir, 'checkpoints'), os.path.join(path, 'checkpoints'))
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['input'].update(settings)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  return str(path)


def _png(image: np.ndarray) -> bytes:
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, format='PNG')
  return encoded.getvalue()


def test_weights_are_tensorflows():
  """Each filter's weights along one axis, as tf.image.resize gives them on unit impulses,
  shrinking and enlarging, for sizes that divide each other and sizes that do not."""
  import tensorflow as tf
  pairs = np.array([(n, m) for n in list(range(1, 41, 3)) + [61, 64]
                    for m in list(range(1, 31, 2)) + [32]], np.int32)
  for name in RESIZE_FILTERS:
    # The integer numerators for all size pairs at once (sizes traced), then cut to size.
    kernels = np.asarray(jax.jit(jax.vmap(
        lambda n, m: _numerators(jnp.arange(64), jnp.arange(32), n, m, name)))(
            pairs[:, 0], pairs[:, 1]))
    assert kernels.dtype == np.int32 and (kernels >= 0).all()
    for (in_size, out_size), kernel in zip(pairs, kernels):
      impulses = np.eye(in_size, dtype=np.float32)[:, None, :]
      if name == 'area':
        resized = tf.image.resize(impulses, [out_size, 1], method='area')
      else:
        resized = tf.image.resize(impulses, [out_size, 1], antialias=name == 'triangle')
      kernel = kernel[:out_size, :in_size]
      np.testing.assert_allclose(kernel / kernel.sum(axis=1, keepdims=True),
                                 resized.numpy()[:, 0, :], atol=1e-5,
                                 err_msg=f'{name} {in_size} -> {out_size}')
    # The float32 weights are those numerators over their sums.
    kernel = kernels[pairs.tolist().index([61, 25]), :25, :61]
    np.testing.assert_allclose(np.asarray(_placed_weights(61, 25, 25, 0, name)[0]),
                               kernel / kernel.sum(axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize('resize_mode', ['stretch', 'letterbox'])
def test_pixels_are_the_input_pipelines(resize_mode):
  from data_pipelines import input_pipeline
  rng = np.random.default_rng(0)
  for name in RESIZE_FILTERS:
    differing = total = 0
    for size in SIZES:
      image = rng.integers(0, 256, size + (3,), np.uint8)
      encoded = _png(image)
      expected = np.asarray(input_pipeline.decode_resized_uint8(encoded, TARGET, name,
                                                               resize_mode)).astype(np.int32)
      ours = np.asarray(preprocess(image[None], TARGET, resize_mode, name))[0]
      assert ours.shape == expected.shape == TARGET + (3,)
      difference = np.abs(ours.astype(np.int32) - expected)
      # Float rounding may move a value that sits on .5 by one grey level; nothing more.
      assert difference.max() <= 1, (name, resize_mode, size)
      differing += int((difference > 0).sum())
      total += difference.size
      if name != 'triangle' and min(size[0] / TARGET[0], size[1] / TARGET[1]) > 1.5:
        # Shrunk well below the crop's size the filters differ: the pipeline's pixels are
        # far from what the default filter gives.
        default = np.asarray(preprocess(image[None], TARGET, resize_mode, 'triangle'))[0]
        assert (default != expected).mean() > 0.3, (name, resize_mode, size)
    assert differing <= 0.005 * total, (name, resize_mode, differing, total)


def test_enlarging_both_axes_is_plain_bilinear():
  """Whatever the filter; with one axis shrinking the named filter resizes both."""
  rng = np.random.default_rng(1)
  small = rng.integers(0, 256, (1, 17, 11, 3), np.uint8)
  for name in RESIZE_FILTERS:
    np.testing.assert_array_equal(np.asarray(preprocess(small, TARGET, 'stretch', name)),
                                  np.asarray(preprocess(small, TARGET, 'stretch', 'bilinear')))
  mixed = rng.integers(0, 256, (1, 17, 50, 3), np.uint8)
  area = np.asarray(preprocess(mixed, TARGET, 'stretch', 'area'))
  assert (area != np.asarray(preprocess(mixed, TARGET, 'stretch', 'bilinear'))).mean() > 0.3
  # The enlarging axis is box-filtered too: an output row whose interval
  # [17 j / 40, 17 (j + 1) / 40) lies inside one input row is that row (columns resized alike),
  # where bilinear would blend it with its neighbour.
  columns_only = np.asarray(preprocess(mixed, (17, 24), 'stretch', 'area'))[0]
  inside = [(j, 17 * j // 40) for j in range(40) if 17 * j // 40 == (17 * (j + 1) - 1) // 40]
  assert len(inside) > 20
  for j, row in inside:
    np.testing.assert_array_equal(area[0, j], columns_only[row], err_msg=str(j))


@pytest.mark.parametrize('resize_mode', ['stretch', 'letterbox'])
def test_symbolic_sizes_give_the_same_pixels(resize_mode):
  """Exported with b, h, w symbolic (as the embedding exports are), each filter rounds exactly
  like the compiled resize, including the choice of plain bilinear for enlarged crops."""
  batch, height, width = jax.export.symbolic_shape('b, h, w')
  spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
  rng = np.random.default_rng(2)
  for name in ('area', 'bilinear'):
    exported = jax.export.export(jax.jit(
        lambda images: resize_images(images, TARGET, resize_mode, name)))(spec)
    exported = jax.export.deserialize(exported.serialize())
    # Shrunk, enlarged along both axes, mixed (one image each: compiled already above).
    for size in ((90, 40), (17, 11), (17, 50)):
      images = rng.integers(0, 256, (1,) + size + (3,), np.uint8)
      np.testing.assert_array_equal(np.asarray(exported.call(images)),
                                    np.asarray(preprocess(images, TARGET, resize_mode, name)),
                                    err_msg=f'{name} {resize_mode} {size}')


def test_area_workdir_preprocesses_with_area_and_has_its_own_fingerprint(
    tmp_path, workdir, model, make_image):
  default = dict(model.preprocessing)
  # Workdirs without the setting keep the fingerprint they had: no key for the default.
  assert default == {'image_size': [32, 32], 'resize': 'stretch', 'antialias': True,
                     'dtype': 'uint8', 'normalisation': 'in the model (ImageNet mean/std)'}
  area_model = SearchModel(_workdir_with(tmp_path / 'area', workdir, resize_filter='area'))
  assert area_model.resize_filter == 'area'
  assert area_model.preprocessing == {**default, 'filter': 'area'}
  assert area_model.fingerprint != model.fingerprint
  crop = make_image(0, 1, (70, 45))
  prepared = area_model.prepare(crop)
  np.testing.assert_array_equal(prepared,
                                np.asarray(preprocess(crop[None], (32, 32), 'stretch', 'area'))[0])
  assert (prepared != model.prepare(crop)).any()
  fn = area_model.embed_with_params_fn()
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(area_model.weights, crop[None])),
                             area_model.embed_crops([crop]), atol=1e-5)
  # An index built with the default filter names the filter that differs.
  with pytest.raises(InputError, match="filter 'triangle' in the index, 'area' here") as error:
    search_index.check_model({'model': model.describe()}, area_model)
  assert len(str(error.value).splitlines()) == 1


def test_unknown_resize_filter_is_refused(tmp_path, workdir):
  with pytest.raises(InputError, match="input.resize_filter 'lanczos3'") as error:
    SearchModel(_workdir_with(tmp_path, workdir, resize_filter='lanczos3'))
  assert len(str(error.value).splitlines()) == 1
  with pytest.raises(ValueError, match="resize filter 'nearest'"):
    resize_images(np.zeros((1, 8, 8, 3), np.uint8), TARGET, 'stretch', 'nearest')


@pytest.mark.parametrize('resize_mode', ['stretch', 'letterbox'])
def test_host_resize_is_the_input_pipelines_pixels_exactly(resize_mode):
  """resize_on_host runs the input pipeline's compiled kernel with its geometry: the very
  pixels training and evaluation see, and resize_images' up to a value on .5."""
  from data_pipelines import input_pipeline
  from fashion_jax.preprocessing import host_resize_applies, resize_on_host
  if not host_resize_applies('triangle'):
    pytest.skip('data_pipelines._resample is not built')
  assert not host_resize_applies('area') and not host_resize_applies('bilinear')
  rng = np.random.default_rng(5)
  for size in SIZES + ((3, 200), (200, 3), (1, 1)):
    image = rng.integers(0, 256, size + (3,), np.uint8)
    expected = np.asarray(input_pipeline.decode_resized_uint8(_png(image), TARGET, 'triangle',
                                                             resize_mode))
    ours = resize_on_host(image, TARGET, resize_mode)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, expected, str(size))
    jax_pixels = np.asarray(preprocess(image[None], TARGET, resize_mode, 'triangle'))[0]
    assert np.abs(jax_pixels.astype(np.int32) - ours).max() <= 1, size


def test_search_model_prepares_on_the_host_only_for_the_default_filter(model, workdir, tmp_path):
  from fashion_jax.preprocessing import host_resize_applies
  crop = np.random.default_rng(6).integers(0, 256, (90, 61, 3), np.uint8)
  assert model.host_resize == host_resize_applies('triangle')
  if model.host_resize:
    np.testing.assert_array_equal(model.prepare(crop), model.prepare_on_host(crop))
  area_model = SearchModel(_workdir_with(tmp_path / 'area', workdir, resize_filter='area'))
  assert not area_model.host_resize and area_model.prepare_on_host(crop) is None
  np.testing.assert_array_equal(area_model.prepare(crop), np.asarray(
      preprocess(crop[None], area_model.image_size, 'stretch', 'area'))[0])
