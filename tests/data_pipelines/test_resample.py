"""The compiled antialiased resize against a float64 reference of the filter's definition and
against TensorFlow's kernel, and its use by the input pipeline."""

import threading

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import input_pipeline
from data_pipelines import resample


def _reference_weights(n: int, m: int) -> np.ndarray:
  """[m, n] float64: output j centred at input (j + 0.5) n / m - 0.5, triangle of radius
  max(n / m, 1) input pixels, each row normalised."""
  scale = max(n / m, 1.0)
  centre = (np.arange(m) + 0.5) * n / m - 0.5
  weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n)[None, :] - centre[:, None]) / scale)
  return weights / weights.sum(axis=1, keepdims=True)


def _reference(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Float64 values before rounding, [height, width, channels]."""
  x = np.einsum('oh,hwc->owc', _reference_weights(image.shape[0], size[0]), image.astype(float))
  return np.einsum('pw,owc->opc', _reference_weights(image.shape[1], size[1]), x)


def _check_against_reference(image, size):
  ours = resample.resize_uint8(image, size).astype(int)
  exact = _reference(image, size)
  expected = np.clip(np.round(exact), 0, 255).astype(int)
  # float32 arithmetic may round a value within a hair of .5 the other way; nothing else.
  ties = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
  np.testing.assert_array_equal(ours[~ties], expected[~ties])
  assert np.abs(ours - expected).max(initial=0) <= 1


@pytest.mark.parametrize('shape,size', [
    ((480, 640, 3), (320, 320)),   # shrink both axes, by 1.5 and 2
    ((400, 400, 3), (320, 320)),   # shrink by 1.25
    ((20, 12, 3), (32, 32)),       # enlarge both
    ((30, 200, 3), (64, 32)),      # enlarge one axis, shrink the other
    ((1, 1, 3), (5, 7)),           # one pixel
    ((997, 13, 3), (3, 1)),        # shrink by over 300: wide kernels
    ((50, 40, 1), (17, 23)),       # grey
    ((50, 40, 4), (17, 23)),       # four channels
    ((64, 64, 3), (64, 64)),       # same size: the identity
])
def test_matches_the_filter_definition(shape, size):
  image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
  _check_against_reference(image, size)


def test_same_size_is_the_identity_and_constant_images_stay_constant():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)
  np.testing.assert_array_equal(resample.resize_uint8(image, (37, 29)), image)
  for value in (0, 1, 128, 254, 255):
    flat = np.full((123, 77, 3), value, np.uint8)
    assert np.all(resample.resize_uint8(flat, (40, 200)) == value)


def test_random_sizes_match_tensorflow():
  rng = np.random.default_rng(0)
  differing = total = 0
  for _ in range(60):
    shape = (*rng.integers(1, 160, 2), 3)
    size = tuple(int(v) for v in rng.integers(1, 160, 2))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = resample.resize_uint8(image, size).astype(int)
    theirs = tf.image.resize(image, size, antialias=True)
    theirs = tf.cast(tf.clip_by_value(tf.round(theirs), 0.0, 255.0), tf.int32).numpy()
    difference = np.abs(ours - theirs)
    assert difference.max() <= 1, (shape, size)
    differing += int((difference > 0).sum())
    total += difference.size
  assert differing <= 0.005 * total


def test_views_and_threads():
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
  # A strided view is copied to contiguous memory first.
  np.testing.assert_array_equal(resample.resize_uint8(image[::2, ::-1], (20, 30)),
                                resample.resize_uint8(image[::2, ::-1].copy(), (20, 30)))
  # The GIL is released while resizing; concurrent calls give the same pixels.
  expected = resample.resize_uint8(image, (33, 47))
  results = [None] * 8

  def run(i):
    results[i] = resample.resize_uint8(image, (33, 47))

  threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(np.array_equal(r, expected) for r in results)


@pytest.mark.parametrize('image,size,message', [
    (np.zeros((4, 4, 3), np.float32), (2, 2), 'expected a uint8 .height, width, channels. image'),
    (np.zeros((4, 4), np.uint8), (2, 2), 'expected a uint8'),
    (np.zeros((4, 4, 3), np.uint8), (0, 2), 'cannot resize a 4 x 4 x 3 image to 0 x 2'),
    (np.zeros((0, 4, 3), np.uint8), (2, 2), 'cannot resize a 0 x 4 x 3 image to 2 x 2'),
])
def test_bad_input_is_named(image, size, message):
  with pytest.raises(ValueError, match=message):
    resample.resize_uint8(image, size)


def test_the_pipeline_resizes_with_it_and_the_tensorflow_fallback_agrees():
  assert resample.available()  # the package build compiles it
  rng = np.random.default_rng(5)
  for shape in [(96, 64, 3), (20, 30, 3), (41, 17, 3)]:
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    encoded = tf.io.encode_png(image)
    pipeline = input_pipeline.decode_resized_uint8(encoded, (32, 24)).numpy()
    np.testing.assert_array_equal(pipeline, resample.resize_uint8(image, (32, 24)))
    fallback = input_pipeline.resize_tf(tf.constant(image), (32, 24)).numpy()
    assert np.abs(fallback.astype(int) - pipeline.astype(int)).max() <= 1
    # And inside a traced tf.data map, as the pipeline runs it.
    ds = tf.data.Dataset.from_tensors(encoded).map(
        lambda e: input_pipeline.decode_resized_uint8(e, (32, 24)), num_parallel_calls=2)
    np.testing.assert_array_equal(next(iter(ds)).numpy(), pipeline)


def test_without_the_extension_the_pipeline_falls_back_to_tensorflow(monkeypatch, caplog):
  image = np.random.default_rng(6).integers(0, 256, (50, 70, 3), dtype=np.uint8)
  encoded = tf.io.encode_png(image)
  compiled = input_pipeline.decode_resized_uint8(encoded, (32, 24)).numpy()
  monkeypatch.setattr(resample, '_resample', None)
  monkeypatch.setattr(input_pipeline, '_warned_uncompiled', False)
  assert not resample.available()
  with pytest.raises(RuntimeError, match='data_pipelines._resample is not built'):
    resample.resize_uint8(image, (32, 24))
  with caplog.at_level('WARNING'):
    fallback = input_pipeline.decode_resized_uint8(encoded, (32, 24)).numpy()
  assert 'runs on TensorFlow' in caplog.text
  assert np.abs(fallback.astype(int) - compiled.astype(int)).max() <= 1
