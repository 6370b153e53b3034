"""Reading untrusted input: files (type and size checked before reading), images, boxes.
Every failure is an InputError.

Decoding mirrors the evaluation pipeline's `tf.io.decode_image(channels=3)`: the first frame,
RGB, alpha dropped (not composited), 16-bit grey by its high byte. One difference: an EXIF
orientation is applied, so a phone's photo is upright, as the web page shows it and its box is
drawn (TensorFlow leaves it as stored). TensorFlow decodes JPEG with libjpeg's
fast integer IDCT and smooth chroma upsampling; PIL only offers the accurate IDCT, which moves
most pixels of a JPEG by a few grey levels. So JPEGs are decoded with simplejpeg (libjpeg-turbo)
in TensorFlow's mode when it is installed (the `search` extra), giving the same pixels as the
evaluation; PIL decodes everything else, and JPEGs when simplejpeg is absent.
"""

import io
import logging
import os
import stat
import warnings

import numpy as np
from PIL import Image

try:
  import simplejpeg
except ImportError:  # PIL's accurate IDCT instead: within a few grey levels of the evaluation
  simplejpeg = None

# The default pixel limit: 40 megapixels (a 7,300 x 5,500 photo) is more than any phone makes.
DEFAULT_MAX_PIXELS = 40_000_000

# PIL logs some damage it finds (e.g. a TIFF's impossible sample count) before raising; with no
# handler configured Python prints those records on stderr, a second line beside the one-line
# error. Records still reach any handler the application configures.
logging.getLogger('PIL').addHandler(logging.NullHandler())
# The pixel limit is decode's `max_pixels`, checked from the header before anything is decoded,
# as PIL's own check would be; PIL's fixed one (89 megapixels) would refuse what a larger
# --max-pixels allows, and with its own words.
Image.MAX_IMAGE_PIXELS = None
# PIL warns about damage it reads past (bad EXIF, short TIFF strips): phone photos often carry
# such metadata, and a picture that decodes is used. A filter for PIL's own warnings, set once:
# warnings.catch_warnings around each decode would race between the service's threads, and
# could leave every warning of the process silenced.
warnings.filterwarnings('ignore', module=r'PIL\.')


class InputError(ValueError):
  """A request or input file that cannot be used; the message is one line naming the problem."""


def decode(data: bytes, *, name: str = 'image', max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded bytes -> uint8 [H, W, 3]; raises InputError for anything that is not a whole image."""
  if not data:
    raise InputError(f'{name}: empty file')
  try:
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
        if image.mode.startswith('I;16') or image.mode == 'I':
          # 16-bit grey: its high byte, as TensorFlow decodes it to uint8 (PIL's RGB
          # conversion clips the values to 255 instead, a white picture).
          grey = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
          array = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
        else:
          array = np.asarray(image if image.mode == 'RGB' else image.convert('RGB'),
                             dtype=np.uint8)
      # After decoding: PIL reads a PNG's EXIF by loading the picture, whose errors must
      # surface above, not be swallowed here.
      orientation = _orientation(image)
  except InputError:
    raise
  except Image.DecompressionBombError as e:
    raise InputError(f'{name}: image is over the pixel limit ({e})') from None
  except Image.UnidentifiedImageError:
    raise InputError(f'{name}: not an image (unrecognised format)') from None
  except Exception as e:  # pylint: disable=broad-except
    # PIL's plugins parse untrusted bytes and fail in their own ways (a truncated QOI raises
    # IndexError, a DDS NotImplementedError): whatever they raise, the bytes are no image.
    raise InputError(f'{name}: truncated or corrupt image ({one_line(e)})') from None
  return np.ascontiguousarray(_upright(array.reshape(height, width, 3), orientation))


_ORIENTATION = 0x0112  # the EXIF tag


def _orientation(image: Image.Image):
  """The EXIF orientation tag, or 1 (as stored) where there is none or the EXIF is damaged: a
  photo that decodes is used."""
  try:
    return image.getexif().get(_ORIENTATION, 1)
  except Exception:  # noqa: BLE001 (PIL's EXIF parser meets untrusted bytes)
    return 1


def _upright(array: np.ndarray, orientation) -> np.ndarray:
  """The image as its EXIF orientation (1-8) says to show it: what a phone, a browser and
  PIL's ImageOps.exif_transpose show. Other values leave it as stored."""
  return {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
          7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}.get(
              orientation, lambda a: a)(array)


def default_max_bytes(max_pixels: int) -> int:
  """The file size limit that goes with a pixel limit: an uncompressed RGBA picture of that
  many pixels, plus 1 MiB of metadata."""
  return 4 * max_pixels + (1 << 20)


def read_file(path: str, max_bytes: int) -> bytes:
  """The bytes of a regular file of at most `max_bytes`; anything else is an InputError.

  Type and size are checked on the open file before reading: a device such as /dev/zero never
  ends, and a huge (or sparse) file would be read whole before any check.
  """
  try:
    # Without O_NONBLOCK, opening a FIFO waits for a writer; it changes nothing for a file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  except (OSError, ValueError) as e:  # ValueError: a NUL in the path
    raise InputError(f'{path}: cannot read ({getattr(e, "strerror", None) or e})') from None
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
    os.close(fd)
    raise InputError(f'{path}: not a regular file' if not stat.S_ISREG(info.st_mode) else
                     f'{path}: {info.st_size:,} bytes is over the size limit of '
                     f'{max_bytes:,} bytes')
  # In pieces, not f.read(max_bytes + 1): Python reserves the whole count up front, and a limit
  # proportional to a large index would not fit in memory. The file may grow after fstat.
  chunks, total = [], 0
  with os.fdopen(fd, 'rb') as f:
    try:
      while total <= max_bytes:
        chunk = f.read(min(max(info.st_size - total, 0) + 1, max_bytes + 1 - total, 1 << 24))
        if not chunk:
          break
        chunks.append(chunk)
        total += len(chunk)
    except OSError as e:
      raise InputError(f'{path}: cannot read ({e.strerror or e})') from None
  if total > max_bytes:
    raise InputError(f'{path}: file is over the size limit of {max_bytes:,} bytes')
  return b''.join(chunks)


def read_text(path: str, max_bytes: int) -> str:
  """A UTF-8 text file (a byte-order mark is dropped) of at most `max_bytes`; a binary file
  (NUL bytes, not UTF-8) is an InputError."""
  data = read_file(path, max_bytes)
  if b'\0' in data:
    raise InputError(f'{path}: not a text file (it has NUL bytes)')
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise InputError(f'{path}: not a UTF-8 text file ({e.reason} at byte {e.start:,})') from None


def read(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None
         ) -> np.ndarray:
  """Decodes an image file; a missing, oversized or not regular file is an InputError.
  `max_bytes` defaults to `default_max_bytes(max_pixels)`."""
  data = read_file(path, default_max_bytes(max_pixels) if max_bytes is None else max_bytes)
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


def one_line(e: Exception) -> str:
  """The exception's message on one line (its type's name when it has none)."""
  return ' '.join(str(e).split()) or type(e).__name__


def one_line_error(message: str) -> InputError:
  """An InputError of `message` on one line: names read from files may hold line breaks."""
  return InputError(' '.join(message.split()))


def thumbnail_bytes(image: np.ndarray, max_side: int = 256) -> bytes:
  """A JPEG of `image` whose longer side is at most `max_side`."""
  picture = Image.fromarray(image)
  picture.thumbnail((max_side, max_side))
  out = io.BytesIO()
  picture.save(out, format='JPEG', quality=85)
  return out.getvalue()
