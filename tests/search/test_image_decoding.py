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


@pytest.mark.filterwarnings('ignore:Corrupt EXIF data')  # pytest's filters come before ours
def test_decoding_in_threads_leaves_the_warning_filters_alone(tmp_path):
  """The service decodes in many threads: PIL's warnings about damage it reads past (corrupt
  EXIF here) are silenced by one filter set at import, not by swapping the process's filters
  around each decode, which races and can leave them changed for the whole process."""
  import subprocess
  import sys
  import threading
  import warnings
  picture = Image.new('RGB', (20, 20), (200, 30, 30))
  corrupt_exif = b'Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff' + b'\x00' * 10
  data = _encoded(picture, 'JPEG', exif=corrupt_exif)
  # In a process of its own (pytest puts its own filters first): PIL's warning is not shown,
  # and others still are.
  photo = tmp_path / 'photo.jpg'
  photo.write_bytes(data)
  shown = subprocess.run(
      [sys.executable, '-c', 'import sys, warnings; from fashion_jax.search import images; '
       'images.read(sys.argv[1]); warnings.warn("still heard")', str(photo)],
      capture_output=True, text=True, check=True).stderr
  assert 'still heard' in shown and 'EXIF' not in shown, shown

  before = list(warnings.filters)
  barrier = threading.Barrier(8)

  def decode_many():
    barrier.wait()
    for _ in range(300):
      image_io.decode(data)

  threads = [threading.Thread(target=decode_many) for _ in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert warnings.filters == before
