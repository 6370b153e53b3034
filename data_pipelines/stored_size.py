"""Builds that store crops already resized to the training size (builder configs `resized320`):
the input pipeline's first, deterministic operation done once at build time instead of every
epoch, so training only decodes (docs/datasets.md).
"""

import io

import numpy as np
import tensorflow as tf
from PIL import Image

from fashion_jax import preprocessing

# The storage codec's quality: the default builds' (raw_images.JPEG_QUALITY).
JPEG_QUALITY = 95


def resize_stored(jpeg: bytes, image_size: tuple[int, int], quality: int = JPEG_QUALITY) -> bytes:
  """JPEG bytes of a default build's stored image, resized to image_size (height, width) exactly
  as training resizes it (decoded by TensorFlow, default mode and filter), re-encoded.

  Starting from the stored bytes makes the pixels the ones training on the default build sees,
  up to this second JPEG encoding.
  """
  # Imported here: input_pipeline imports this module for `check`.
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  pixels = input_pipeline.decode_resized_uint8(tf.constant(jpeg), tuple(image_size)).numpy()
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def stored_size(builder) -> tuple[int, int] | None:
  """The (height, width) every image of the build is stored at, or None (crops kept as cut)."""
  size = getattr(builder.builder_config, 'resized_to', None)
  return tuple(size) if size else None


def check(builder, input_config) -> None:
  """Refuses to train or evaluate on a resized build at another size or with another resize
  than the one it was resized with: its crops would be resized twice."""
  size = stored_size(builder)
  if size is None:
    return
  mode, resize_filter = preprocessing.resize_settings(input_config)
  wanted = (tuple(input_config.image_size), mode, resize_filter)
  stored = (size, preprocessing.DEFAULT_RESIZE_MODE, preprocessing.DEFAULT_RESIZE_FILTER)
  if wanted != stored:
    raise ValueError(
        f'{builder.info.full_name} stores its crops resized to {size[0]}x{size[1]} '
        f'({stored[1]}, {stored[2]}); input.image_size={wanted[0]}, resize_mode={mode!r}, '
        f'resize_filter={resize_filter!r} needs a build that keeps the crops (its default config)')


def pixel_difference(stored: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  """How far a resized build's decoded pixels are from resizing the default build's image:
  mean and max absolute difference in grey levels, and the PSNR in dB."""
  diff = np.abs(stored.astype(np.int16) - reference.astype(np.int16))
  mse = float(np.mean(diff.astype(np.float64) ** 2))
  return {'mean_abs': float(diff.mean()), 'max_abs': int(diff.max()),
          'psnr_db': float('inf') if mse == 0 else 10 * np.log10(255.0**2 / mse)}
