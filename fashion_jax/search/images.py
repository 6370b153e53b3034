"""Reading untrusted images: decode, size limits, boxes. Every failure is an InputError.

Decoding mirrors the evaluation pipeline's `tf.io.decode_image(channels=3)`: the first frame,
RGB, no EXIF rotation, alpha dropped (not composited). TensorFlow decodes JPEG with libjpeg's
fast integer IDCT and smooth chroma upsampling; PIL only offers the accurate IDCT, which moves
most pixels of a JPEG by a few grey levels. So JPEGs are decoded with simplejpeg (libjpeg-turbo)
in TensorFlow's mode when it is installed (the `search` extra), giving the same pixels as the
evaluation; PIL decodes everything else, and JPEGs when simplejpeg is absent.
"""

import io
import warnings

import numpy as np
from PIL import Image

try:
  import simplejpeg
except ImportError:  # PIL's accurate IDCT instead: within a few grey levels of the evaluation
  simplejpeg = None

# The default pixel limit: 40 megapixels (a 7,300 x 5,500 photo) is more than any phone makes.
DEFAULT_MAX_PIXELS = 40_000_000


class InputError(ValueError):
  """A request or input file that cannot be used; the message is one line naming the problem."""


def decode(data: bytes, *, name: str = 'image', max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded bytes -> uint8 [H, W, 3]; raises InputError for anything that is not a whole image."""
  if not data:
    raise InputError(f'{name}: empty file')
  try:
    with warnings.catch_warnings():
      # PIL only warns between its limit and twice it; any bomb warning is an error here.
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > max_pixels:
          raise InputError(f'{name}: {width}x{height} pixels is over the limit of {max_pixels:,} '
                           f'pixels')
        if width < 1 or height < 1:
          raise InputError(f'{name}: image has no pixels')
        if simplejpeg is not None and image.format == 'JPEG' and image.mode in ('RGB', 'L'):
          # strict: a truncated or damaged stream is an error, not a grey-filled picture.
          array = simplejpeg.decode_jpeg(data, colorspace='RGB', fastdct=True,
                                         fastupsample=False, strict=True)
        else:
          image.load()
          if image.mode != 'RGB':
            image = image.convert('RGB')
          array = np.asarray(image, dtype=np.uint8)
  except InputError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise InputError(f'{name}: image is over the pixel limit ({e})') from None
  except Image.UnidentifiedImageError:
    raise InputError(f'{name}: not an image (unrecognised format)') from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise InputError(f'{name}: truncated or corrupt image ({_one_line(e)})') from None
  return np.ascontiguousarray(array.reshape(height, width, 3))


def read(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None
         ) -> np.ndarray:
  """Decodes an image file; a missing or oversized file is an InputError."""
  try:
    with open(path, 'rb') as f:
      data = f.read() if max_bytes is None else f.read(max_bytes + 1)
  except OSError as e:
    raise InputError(f'{path}: cannot read ({e.strerror or e})') from None
  if max_bytes is not None and len(data) > max_bytes:
    raise InputError(f'{path}: file is over the size limit of {max_bytes:,} bytes')
  return decode(data, name=path, max_pixels=max_pixels)


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
  """'x,y,w,h' (pixels, top-left corner + size) -> a tuple, '' or None -> None."""
  if text is None or not str(text).strip():
    return None
  parts = str(text).replace(' ', '').split(',')
  try:
    values = tuple(float(p) for p in parts)
  except ValueError:
    raise InputError(f'box {text!r} is not four numbers x,y,w,h') from None
  if len(values) != 4 or not all(np.isfinite(values)):
    raise InputError(f'box {text!r} is not four numbers x,y,w,h')
  return values


def crop(image: np.ndarray, box, *, name: str = 'image') -> np.ndarray:
  """The box (x, y, w, h) of `image` [H, W, 3], rounded to whole pixels; None -> whole image.

  A box of zero size or reaching outside the image is an InputError.
  """
  if box is None:
    return image
  x, y, w, h = box
  height, width = image.shape[:2]
  if w <= 0 or h <= 0:
    raise InputError(f'{name}: box {_fmt(box)} has zero size')
  if x < 0 or y < 0 or x + w > width or y + h > height:
    raise InputError(f'{name}: box {_fmt(box)} reaches outside the {width}x{height} image')
  x0, y0 = int(round(x)), int(round(y))
  x1, y1 = min(width, int(round(x + w))), min(height, int(round(y + h)))
  if x1 <= x0 or y1 <= y0:
    raise InputError(f'{name}: box {_fmt(box)} has zero size')
  return image[y0:y1, x0:x1]


def _fmt(box) -> str:
  return ','.join(f'{v:g}' for v in box)


def _one_line(e: Exception) -> str:
  return ' '.join(str(e).split()) or type(e).__name__


def thumbnail_bytes(image: np.ndarray, max_side: int = 256) -> bytes:
  """A JPEG of `image` whose longer side is at most `max_side`."""
  picture = Image.fromarray(image)
  picture.thumbnail((max_side, max_side))
  out = io.BytesIO()
  picture.save(out, format='JPEG', quality=85)
  return out.getvalue()
