"""How an image becomes the model's input: the resize modes and filters, their check, the
letterbox geometry and the resize in JAX, compiled per size (resize_images) or per bucket of
sizes (preprocess); and, for the default filter, the same resize on the host with the input
pipeline's compiled kernel (resize_on_host). No TensorFlow: the tf.data pipeline imports it too.

The evaluation pipeline (data_pipelines.input_pipeline), the search and the exports resize with
these names and this geometry, so an image gives the same pixels in training, search and serving
(up to a value on .5 rounded the other way; none at all between the input pipeline and
resize_on_host, which run one kernel).
"""

import jax
import jax.numpy as jnp
import numpy as np

try:
  from data_pipelines import resample
except ModuleNotFoundError as error:  # fashion_jax without its data_pipelines package
  if error.name != 'data_pipelines':
    raise
  resample = None

# How a crop reaches image_size (config.input.resize_mode):
#   'stretch': both axes scaled to image_size, as the ReID code does (the default);
#   'letterbox': the aspect ratio kept, only ever shrunk (to the size PIL's Image.thumbnail
#                gives), centred on a white canvas of image_size, as the authors' dataset
#                conversion does.
RESIZE_MODES = ('stretch', 'letterbox')
DEFAULT_RESIZE_MODE = 'stretch'
# With which filter (config.input.resize_filter):
#   'triangle': antialiased bilinear, tf.image.resize(antialias=True), what PIL's BILINEAR resize
#               does in the ReID code (the default);
#   'area': box filter, tf.image.resize(method='area');
#   'bilinear': two taps, no antialiasing, tf.image.resize(antialias=False) (aliases when
#               shrinking more than 2x).
# Whatever the filter, a crop enlarged along both axes is resized by plain bilinear.
RESIZE_FILTERS = ('triangle', 'area', 'bilinear')
DEFAULT_RESIZE_FILTER = 'triangle'
# Letterbox borders.
_WHITE = 255.0


def _not_one_of(name: str, value, allowed: tuple[str, ...]) -> str:
  return f'{name} {value!r} is not one of {", ".join(allowed)}'


def check_resize(resize_mode: str, resize_filter: str, *,
                 names: tuple[str, str] = ('resize mode', 'resize filter')) -> None:
  """Raises a one-line ValueError naming a mode or filter that is not one of RESIZE_MODES or
  RESIZE_FILTERS, and the ones that are. `names`: what the message calls the two values (the
  config fields where they come from a config)."""
  mode_name, filter_name = names
  if resize_mode not in RESIZE_MODES:
    raise ValueError(_not_one_of(mode_name, resize_mode, RESIZE_MODES))
  if resize_filter not in RESIZE_FILTERS:
    raise ValueError(_not_one_of(filter_name, resize_filter, RESIZE_FILTERS))


def resize_settings(input_config) -> tuple[str, str]:
  """(resize_mode, resize_filter) of a config's `input` section, checked (check_resize); a
  setting the config lacks takes its default."""
  resize_mode = input_config.get('resize_mode', DEFAULT_RESIZE_MODE)
  resize_filter = input_config.get('resize_filter', DEFAULT_RESIZE_FILTER)
  check_resize(resize_mode, resize_filter, names=('input.resize_mode', 'input.resize_filter'))
  return resize_mode, resize_filter


def letterbox_geometry(height, width, image_size: tuple[int, int], *, xp=jnp, dtype=jnp.int32):
  """Where a crop of `height` x `width` lands in a letterbox of `image_size` (H, W).

  Returns `dtype` (content height, content width, top, left): the size PIL's
  `Image.thumbnail((W, H))` gives (aspect ratio kept, never enlarged, PIL's rounding) and the
  offset that centres it (floor). Exact integer arithmetic (int32: sides up to about
  2**30 / max(H, W)), elementwise on arrays of sizes, traced or symbolic ones too:
    - a crop that fits is kept as it is;
    - if W h >= w H the height limits: H, and the integer nearest H w / h (ties down);
    - otherwise the width limits: W, and of floor(W h / w) and its ceiling the one whose W / n
      is closer to w / h (floor on ties, at least 1).
  An exact tie goes down, where PIL's float arithmetic picks either side.
  xp: the array namespace, jax.numpy or, in tf.data, tensorflow.experimental.numpy (with
  dtype int64), so that training and search letterbox by this one rule.
  """
  target_height, target_width = image_size
  h = xp.asarray(height, dtype)
  w = xp.asarray(width, dtype)
  fits = (h <= target_height) & (w <= target_width)
  height_limits = target_width * h >= w * target_height
  # Height limits: round(H w / h), a tie going down.
  by_height = xp.maximum(1, (2 * target_height * w + h - 1) // (2 * h))
  # Width limits: with r = W h mod w, floor lo = W h // w is off by r / w and the ceiling
  # lo + 1 by (w - r) / w; PIL compares W / lo - w / h = r / (lo h) with
  # w / h - W / (lo + 1) = (w - r) / ((lo + 1) h).
  low = (target_width * h) // w
  remainder = (target_width * h) % w
  high = low + xp.minimum(remainder, 1)
  by_width = xp.maximum(1, xp.where((low == 0) | (remainder * high <= (w - remainder) * low),
                                    low, high))
  content_height = xp.where(fits, h, xp.where(height_limits, target_height, by_width))
  content_width = xp.where(fits, w, xp.where(height_limits, by_height, target_width))
  return (content_height, content_width, (target_height - content_height) // 2,
          (target_width - content_width) // 2)


def _numerators(i: jax.Array, j: jax.Array, n_in, n_out, resize_filter: str = 'triangle',
                enlarged=None) -> jax.Array:
  """int32 [out, in] unnormalised weights of input pixel i for output pixel j (axis n_in ->
  n_out; i, j int32 vectors, n_in, n_out int32 scalars, possibly traced).

  - 'triangle': max(0, 2 max(n_in, n_out) - |(2j + 1) n_in - (2i + 1) n_out|), the triangle
    kernel widened by the downscale factor, centred on output pixel j at input coordinate
    (j + 0.5) n_in / n_out - 0.5, as tf.image.resize(antialias=True) defines it;
  - 'bilinear': max(0, 2 n_out - |(2j + 1) n_in - (2i + 1) n_out|), the same triangle never
    widened; truncated at the borders and renormalised, that is TensorFlow's clamping of the
    two taps (tf.image.resize(antialias=False), half-pixel centres);
  - 'area': in units of 1 / n_out, how much of input pixel [i, i + 1) the interval
    [j n_in / n_out, (j + 1) n_in / n_out) covers: max(0, min((j + 1) n_in, (i + 1) n_out) -
    max(j n_in, i n_out)), as TensorFlow's ResizeArea (no half-pixel offset), also where the
    axis enlarges.
  `enlarged` (bool, possibly traced): the crop is enlarged along both axes, where the pipeline
  resizes by plain bilinear whatever the filter. Only 'area' needs it: enlarging, 'triangle'
  and 'bilinear' are both plain bilinear already.
  """
  offsets = jnp.abs((2 * j[:, None] + 1) * n_in - (2 * i[None, :] + 1) * n_out)
  if resize_filter == 'triangle':
    return jnp.maximum(0, 2 * jnp.maximum(n_in, n_out) - offsets)
  bilinear = jnp.maximum(0, 2 * n_out - offsets)
  if resize_filter == 'bilinear':
    return bilinear
  if resize_filter == 'area':
    area = jnp.maximum(0, jnp.minimum((j[:, None] + 1) * n_in, (i[None, :] + 1) * n_out) -
                       jnp.maximum(j[:, None] * n_in, i[None, :] * n_out))
    return area if enlarged is None else jnp.where(enlarged, bilinear, area)
  raise ValueError(_not_one_of('resize filter', resize_filter, RESIZE_FILTERS))


def _placed_weights(in_size, out_size: int, content, offset, resize_filter: str = 'triangle',
                    enlarged=None, *, in_length=None):
  """[out, in_length] weights resizing `in_size` pixels to `content` pixels placed at `offset`
  of `out_size`, and [out] bool: which output pixels are content.

  Content row o holds the weights of resizing `in_size` pixels to `content`, row o - offset;
  the other rows are zero. Integer numerators are normalised by one division each, so the
  weights come out bit-identical whether the sizes are known when compiling or only when running
  (a shape-polymorphic export, a padded crop): rounding to uint8 then cannot differ.
  `content`, `offset` and `enlarged` may be traced: the export computes them from symbolic
  image sizes.
  `in_length` (static, default `in_size`): the length of the axis the weights apply to, a crop
  padded to a bucket; the input pixels from `in_size` on get zero weight, so `in_size` may be
  traced and one compilation serves every size up to `in_length`.
  """
  i = jnp.arange(in_size if in_length is None else in_length, dtype=jnp.int32)
  j = jnp.arange(out_size, dtype=jnp.int32) - offset
  inside = (j >= 0) & (j < content)
  n_in = jnp.asarray(in_size, jnp.int32)
  numerator = _numerators(i, j, n_in, content, resize_filter, enlarged)
  # Padding is outside the crop: the kernels reaching past its edge must not weigh it, and the
  # totals then sum the same integers as for the crop alone.
  numerator = jnp.where(inside[:, None] & (i < n_in)[None, :], numerator, 0)
  total = jnp.maximum(jnp.sum(numerator, axis=1, keepdims=True), 1)
  weights = numerator.astype(jnp.float32) / total.astype(jnp.float32)
  # XLA (on CPU at least) turns this division by totals broadcast along the input axis into a
  # product with their reciprocals, which can miss 1 (41 * (1 / 41) < 1); along a one-pixel
  # axis nothing is broadcast and it divides exactly. A one-pixel crop padded to more keeps
  # those exact weights, the ones resize_images always gave it.
  weights = jnp.where(n_in == 1, (numerator > 0).astype(jnp.float32), weights)
  return weights, inside


def resize_images(images: jax.Array, image_size: tuple[int, int],
                  resize_mode: str = DEFAULT_RESIZE_MODE,
                  resize_filter: str = DEFAULT_RESIZE_FILTER) -> jax.Array:
  """uint8 [B, h, w, 3] of any size -> uint8 [B, H, W, 3], as the evaluation pipeline resizes:
  with `resize_filter` (plain bilinear where the crop is enlarged along both axes), clipped,
  rounded; stretched to (H, W), or letterboxed (aspect ratio kept, never enlarged, centred on
  white). h and w may be symbolic (a shape-polymorphic export)."""
  check_resize(resize_mode, resize_filter)
  height, width = images.shape[1], images.shape[2]
  rows = _resize_rows(images, height, width, image_size, resize_mode, resize_filter)
  return _resize_columns((rows,), height, width, image_size, resize_mode, resize_filter)


def _placement(height, width, image_size: tuple[int, int], resize_mode: str):
  """int32 (content height, content width, top, left) of a crop of height x width in the
  output, and whether the resize enlarges it along both axes (bool)."""
  out_height, out_width = image_size
  if resize_mode == 'stretch':
    content_height, content_width, top, left = (jnp.asarray(v, jnp.int32) for v in
                                                (out_height, out_width, 0, 0))
  else:
    content_height, content_width, top, left = letterbox_geometry(height, width, image_size)
  # The crop's size as int32 scalars: under a shape-polymorphic export or with a padded crop
  # the test is only known when running, so it selects between weights.
  enlarged = ((jnp.asarray(height, jnp.int32) <= content_height) &
              (jnp.asarray(width, jnp.int32) <= content_width))
  return content_height, content_width, top, left, enlarged


def _resize_rows(images: jax.Array, height, width, image_size: tuple[int, int],
                 resize_mode: str, resize_filter: str) -> jax.Array:
  """The first pass of resize_images, along the rows: uint8 [B, h_pad, w_pad, 3] -> float32
  [B, H, w_pad, 3]. The crop is images[:, :height] (height, width: int32 scalars, static,
  symbolic or traced; width only places a letterbox); rows from height on get zero weight.
  Each output column is its input column's alone, so columns can be resized in pieces."""
  content_height, _, top, _, enlarged = _placement(height, width, image_size, resize_mode)
  rows, _ = _placed_weights(height, image_size[0], content_height, top, resize_filter,
                            enlarged, in_length=images.shape[1])
  return jnp.einsum('oh,bhwc->bowc', rows, images.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _resize_columns(pieces: tuple[jax.Array, ...], height, width,
                    image_size: tuple[int, int], resize_mode: str,
                    resize_filter: str) -> jax.Array:
  """The second pass, along the columns: _resize_rows' float32 [B, H, w_i, 3] pieces, side by
  side, -> uint8 [B, H, W, 3], clipped, rounded, letterbox borders white. Columns from `width`
  on get zero weight."""
  out_height, out_width = image_size
  content_height, content_width, top, left, enlarged = _placement(height, width, image_size,
                                                                  resize_mode)
  x = jnp.concatenate(pieces, axis=2)
  columns, column_inside = _placed_weights(width, out_width, content_width, left,
                                           resize_filter, enlarged, in_length=x.shape[2])
  x = jnp.einsum('pw,bowc->bopc', columns, x, precision=jax.lax.Precision.HIGHEST)
  if resize_mode == 'letterbox':
    row = jnp.arange(out_height, dtype=jnp.int32)
    row_inside = (row >= top) & (row < top + content_height)
    # Border pixels got all-zero weights: 0 + 255 is exactly white.
    border = ~(row_inside[:, None] & column_inside[None, :])
    x = x + jnp.where(border, _WHITE, 0.0)[None, :, :, None]
  return jnp.round(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


def bucket_length(n: int) -> int:
  """The smallest 2**k or 3 * 2**k (k >= 0) that is at least n: 1, 2, 3, 4, 6, 8, 12, 16, 24,
  ..., 256, 384, 512, 768, 1024, 1536, ... Two rungs an octave: few lengths (14 from 33 to
  4,096, 51 up to the decoder's 40M-pixel limit), each under 1.5 n."""
  power = 1 << max(n - 1, 0).bit_length()
  return 3 * power // 4 if 3 * power // 4 >= n else power


# The rows pass resizes the columns in pieces this wide, so it compiles once per padded height
# and the columns pass once per number of pieces; one pass over both padded axes would compile
# once per pair of them (about 4 MB each on CPU).
_PIECE = 128
_STATIC = ('image_size', 'resize_mode', 'resize_filter')
_resize_rows_jit = jax.jit(_resize_rows, static_argnames=_STATIC)
_resize_columns_jit = jax.jit(_resize_columns, static_argnames=_STATIC)


def padded_size(height: int, width: int) -> tuple[int, int]:
  """(rows, columns) preprocess pads an h x w crop to: bucket_length(h) rows, and
  bucket_length(ceil(w / 128)) pieces of 128 columns."""
  return bucket_length(height), _PIECE * bucket_length(-(-width // _PIECE))


def preprocess(images, image_size: tuple[int, int], resize_mode: str = DEFAULT_RESIZE_MODE,
               resize_filter: str = DEFAULT_RESIZE_FILTER) -> jax.Array:
  """resize_images compiled per bucket of crop sizes instead of per size: uint8 [B, h, w, 3]
  (host memory) -> uint8 [B, H, W, 3], the same pixels.

  The crops are zero-padded at the bottom and right to padded_size(h, w); their true size goes
  in as traced int32 scalars, and the padding gets zero weight. The rows pass runs piece by
  piece, so a service meeting uploads of every size holds one compiled resize per padded
  height and one per padded width (preprocess_compilations()).
  """
  check_resize(resize_mode, resize_filter)
  images = np.asarray(images)
  batch, height, width, channels = images.shape
  padded_height, padded_width = padded_size(height, width)
  sizes = (np.int32(height), np.int32(width))
  pieces = []
  for start in range(0, padded_width, _PIECE):
    piece = np.zeros((batch, padded_height, _PIECE, channels), np.uint8)
    content = images[:, :, start:start + _PIECE]
    piece[:, :height, :content.shape[2]] = content
    pieces.append(_resize_rows_jit(piece, *sizes, image_size, resize_mode, resize_filter))
  return _resize_columns_jit(tuple(pieces), *sizes, image_size, resize_mode, resize_filter)


def preprocess_compilations() -> int:
  """How many resizes preprocess holds compiled, over all image sizes, modes, filters and
  batch sizes: one per padded height and one per number of pieces met for each."""
  return _resize_rows_jit._cache_size() + _resize_columns_jit._cache_size()


def host_resize_applies(resize_filter: str) -> bool:
  """Whether resize_on_host can resize with `resize_filter`: the compiled kernel
  (data_pipelines.resample) is built and implements that filter ('triangle' only)."""
  return resize_filter == 'triangle' and resample is not None and resample.available()


def resize_on_host(crop: np.ndarray, image_size: tuple[int, int],
                   resize_mode: str = DEFAULT_RESIZE_MODE) -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [H, W, 3] with the 'triangle' filter, on the host: the input
  pipeline's compiled kernel with its geometry (stretched, or letterboxed on white), so the
  pixels are the ones training and evaluation see. Needs host_resize_applies('triangle').

  It holds no device and releases the GIL while resizing, so request threads can run it side
  by side; a crop already of the target size is not resized (every filter keeps it).
  """
  check_resize(resize_mode, 'triangle')
  crop = np.asarray(crop)
  height, width = crop.shape[:2]
  out_height, out_width = image_size
  if resize_mode == 'stretch':
    top = left = 0
    content_height, content_width = out_height, out_width
  else:
    content_height, content_width, top, left = (int(v) for v in letterbox_geometry(
        height, width, image_size, xp=np, dtype=np.int64))
  if (height, width) == (content_height, content_width):
    content = crop.copy()  # not a view that would keep a whole photo alive
  else:
    content = resample.resize_uint8(crop, (content_height, content_width))
  if resize_mode == 'stretch':
    return content
  canvas = np.full((out_height, out_width, crop.shape[2]), 255, np.uint8)
  canvas[top:top + content_height, left:left + content_width] = content
  return canvas
