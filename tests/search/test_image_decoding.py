"""Decoding a photo for search: TensorFlow's pixels, the EXIF orientation applied, and the
pixel limit ours whatever PIL's is."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from fashion_jax.search import images as image_io


def _encoded(picture: Image.Image, format: str, **options) -> bytes:
  buffer = io.BytesIO()
  picture.save(buffer, format=format, **options)
  return buffer.getvalue()


def test_16_bit_grey_decodes_as_tensorflow_does():
  tf = pytest.importorskip('tensorflow')
  values = np.arange(65536, dtype=np.uint32).reshape(256, 256) * 7919 % 65536
  data = _encoded(Image.fromarray(values.astype(np.uint16)), 'PNG')
  expected = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  decoded = image_io.decode(data)
  np.testing.assert_array_equal(decoded, expected)
  assert len(np.unique(decoded)) == 256  # not PIL's clipped white


@pytest.mark.parametrize('orientation', range(1, 9))
@pytest.mark.parametrize('format', ['PNG', 'JPEG'])
def test_exif_orientation_is_applied_as_phones_and_browsers_show_it(orientation, format):
  rng = np.random.default_rng(orientation)
  picture = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))

  def stored(tag):
    exif = Image.Exif()
    exif[0x0112] = tag
    return _encoded(picture, format, exif=exif, quality=95)

  # The same pixel stream (the encoder is deterministic), tagged as stored or as turned.
  as_stored = Image.fromarray(image_io.decode(stored(1)))
  as_stored.getexif()[0x0112] = orientation
  expected = np.asarray(ImageOps.exif_transpose(as_stored))
  np.testing.assert_array_equal(image_io.decode(stored(orientation)), expected)
  assert (expected.shape[0] > expected.shape[1]) == (orientation >= 5)


def test_the_pixel_limit_is_ours_above_and_below_pils(monkeypatch):
  # PIL's default limit (89 megapixels, an error from twice that) neither refuses what a larger
  # limit allows nor speaks for ours.
  data = _encoded(Image.new('L', (10_000, 9_000)), 'PNG')  # 90 megapixels, a tiny file
  assert image_io.decode(data, max_pixels=100_000_000).shape == (9_000, 10_000, 3)
  with pytest.raises(image_io.InputError,
                     match=r'^photo: 10000x9000 pixels is over the limit of 40,000,000 pixels$'):
    image_io.decode(data, name='photo')
  huge = _encoded(Image.new('1', (20_000, 20_000)), 'PNG')  # 400 megapixels: PIL's error before
  with pytest.raises(image_io.InputError, match='20000x20000 pixels is over the limit of '):
    image_io.decode(huge)


def test_a_catalogue_field_too_long_for_the_index_is_refused(tmp_path):
  # An index line is read back under a size limit: a field that would break it is refused when
  # the catalogue is read, whatever its format (CSV's reader stops at 131,072 characters).
  import json

  from fashion_jax.search import catalogue
  path = tmp_path / 'c.jsonl'
  path.write_text(json.dumps({'image': 'a.jpg', 'product_id': 'p' * 3_000_000}) + '\n')
  with pytest.raises(image_io.InputError,
                     match=r'row 1: product_id is 3,000,000 characters, more than 65,536$'):
    catalogue.read_catalogue(str(path))
