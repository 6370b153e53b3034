"""Antialiased linear ("triangle") resizing of uint8 images on the CPU, compiled.

The input pipeline's default resize. It computes what tf.image.resize(antialias=True) followed by
tf.round and tf.clip_by_value computes (and what PIL's BILINEAR resize does, without PIL's
rounding to 8 bits between the two passes), about five times faster than TensorFlow's kernel: a
value that sits on .5 may round the other way, by one grey level, and nothing else differs.
The extension is built by `pip install` from data_pipelines/_resample.c; where it was not
built, `available()` is False and the pipeline uses TensorFlow's kernel instead.
"""

import numpy as np

try:
  from data_pipelines import _resample
except ImportError:  # installed without a C compiler
  _resample = None


def available() -> bool:
  return _resample is not None


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [h, w, c] -> uint8 [height, width, c], stretched (aspect ratio not kept)."""
  if _resample is None:
    raise RuntimeError('data_pipelines._resample is not built; reinstall the package '
                       '(pip install -e .) where a C compiler is available')
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f'expected a uint8 [height, width, channels] image, got {image.dtype} '
                     f'{list(image.shape)}')
  height, width = (int(v) for v in size)
  out = np.empty((height, width, image.shape[2]), np.uint8)
  _resample.resize(np.ascontiguousarray(image), *image.shape, out, height, width)
  return out
