"""Robust reading of raw downloaded photos for the dataset builders: format detection, RGB
conversion, box clipping and bounded re-encoding, with every fault counted by reason.
"""

import collections
import io
import json
import os
import warnings

import numpy as np
import tensorflow as tf
from PIL import Image

# The format each extension promises; the content decides what the file really is.
# The largest photo decoded: PIL's default refusal (twice its 89,478,485-pixel warning), kept
# here so that a process that changes PIL's limit (the search reads by its own) builds alike.
MAX_PIXELS = 2 * 89_478_485

_EXTENSION_FORMATS = {
    '.jpg': 'JPEG', '.jpeg': 'JPEG', '.jpe': 'JPEG', '.png': 'PNG', '.gif': 'GIF',
    '.bmp': 'BMP', '.webp': 'WEBP', '.tif': 'TIFF', '.tiff': 'TIFF',
}
JPEG_QUALITY = 95


class FaultCounter(collections.Counter):
  """Counts of skipped or repaired records, keyed by reason."""

  def report(self) -> dict[str, int]:
    return {reason: int(count) for reason, count in sorted(self.items()) if count}

  def write(self, builder, file_name: str) -> dict[str, int]:
    """Stores the report in the builder's metadata and in `file_name` beside its data; prints it."""
    report = self.report()
    builder.info.metadata['build_report'] = report
    # builder.data_dir is the build's temporary folder here; TFDS renames it when done.
    with tf.io.gfile.GFile(os.path.join(builder.data_dir, file_name), 'w') as f:
      json.dump(report, f, indent=1, sort_keys=True)
    print(f'{builder.name} build report (skipped or repaired records by reason): {report}')
    return report


def keep_item(split: str, images: list[dict], faults: FaultCounter) -> bool:
  """Whether an item with these images is written; counts the item-level faults either way.

  Items without images are dropped. Train items with one image, or with no shop image, are
  kept: the input pipeline drops single-image identities, and street-only ones still train.
  """
  if not images:
    faults[f'{split}_item_without_images'] += 1
    return False
  if split == 'train' and len(images) == 1:
    faults['train_item_single_image'] += 1
  if split == 'train' and all(image['domain'] == 'street' for image in images):
    faults['train_item_without_shop_image'] += 1
  return True


def load_rgb(path: str, faults: FaultCounter) -> Image.Image | None:
  """The photo at `path` as a fully decoded RGB image, or None (counted) if it is unusable.

  Rules: unreadable or truncated files are skipped (`corrupt_image`); a file whose content
  differs from its extension is used as what it really is (`wrong_extension`); any mode other
  than RGB is converted (`converted_<mode>`), transparency composited on white as shop photos
  sit on white; animated GIFs keep their first frame.
  """
  try:
    with warnings.catch_warnings():
      # Palette images with transparency warn; the conversion below handles them.
      warnings.simplefilter('ignore')
      with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:  # checked here, whatever PIL's limit is
          raise Image.DecompressionBombError(f'{image.width}x{image.height} pixels')
        # load() decodes every byte, so a truncated file fails here and not later in TFDS.
        image.load()
        real_format = image.format
        rgb = _to_rgb(image, faults)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    faults['corrupt_image'] += 1
    return None
  expected = _EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower())
  if expected != real_format:
    faults['wrong_extension'] += 1
  if rgb.width == 0 or rgb.height == 0:
    faults['corrupt_image'] += 1
    return None
  return rgb


def _to_rgb(image: Image.Image, faults: FaultCounter) -> Image.Image:
  if image.mode == 'RGB':
    return image.copy()
  faults[f'converted_{image.mode}'] += 1
  if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    canvas = Image.new('RGB', rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel('A'))
    return canvas
  if image.mode.startswith('I'):
    # 16/32-bit greyscale: PIL's RGB conversion would clip, so rescale to 8 bits first.
    values = np.asarray(image, np.float64)
    peak = max(values.max(), 1.0)
    grey = Image.fromarray(np.round(values * (255.0 / peak)).astype(np.uint8))
    return grey.convert('RGB')
  return image.convert('RGB')


def clip_box(left: int, top: int, right: int, bottom: int, width: int,
             height: int) -> tuple[int, int, int, int] | None:
  """The box clipped to a width x height image, or None if nothing of it is inside."""
  left, right = max(left, 0), min(right, width)
  top, bottom = max(top, 0), min(bottom, height)
  if right <= left or bottom <= top:
    return None
  return left, top, right, bottom


def normalized_box(box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
  """(left, top, right, bottom) pixels -> TFDS BBox order [ymin, xmin, ymax, xmax] in [0, 1]."""
  left, top, right, bottom = box
  return np.array([top / height, left / width, bottom / height, right / width], np.float32)


def encode_bounded(image: Image.Image, max_side: int) -> bytes:
  """JPEG bytes of `image`, shrunk (never enlarged) so its longest side is at most max_side."""
  if max(image.size) > max_side:
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=JPEG_QUALITY)
  return buffer.getvalue()
