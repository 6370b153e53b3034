"""A trained workdir as an embedding function for search: checkpoint, preprocessing, fingerprint.

Reads `<workdir>/config.json` and the latest (or a given) checkpoint in `<workdir>/checkpoints`
with Orbax alone; no TensorFlow. Preprocessing is the evaluation pipeline's, in JAX: the image
(or box crop) is resized to `input.image_size` with the filter `input.resize_filter` names
('triangle': antialiased bilinear, the default; 'area': box filter; 'bilinear': two taps, no
antialiasing), clipped, rounded to uint8; the model normalises it. `input.resize_mode` says
how: 'stretch' scales both axes to the target; 'letterbox' keeps the aspect ratio (shrinking
only, to the size PIL's `Image.thumbnail` gives) and centres the result on a white canvas.
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax import checkpointing
from fashion_jax import train_step as ts
from fashion_jax.models import build_model
from fashion_jax.search.images import InputError

# How images reach the model (config.input.resize_mode); recorded in every index and part of
# the fingerprint, so an index is only queried with the same preprocessing. Workdirs written
# before the setting existed stretch.
RESIZE_MODES = ('stretch', 'letterbox')
DEFAULT_RESIZE_MODE = 'stretch'
# With which filter (config.input.resize_filter), as data_pipelines.input_pipeline resizes:
#   'triangle': antialiased bilinear, tf.image.resize(antialias=True) (the default);
#   'area': box filter, tf.image.resize(method='area');
#   'bilinear': two taps, no antialiasing, tf.image.resize(antialias=False).
# Whatever the filter, a crop enlarged along both axes is resized by plain bilinear, as the
# pipeline does. Recorded in an index (when not the default) and part of the fingerprint.
RESIZE_FILTERS = ('triangle', 'area', 'bilinear')
DEFAULT_RESIZE_FILTER = 'triangle'
# Letterbox borders.
_WHITE = 255.0


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
  raise ValueError(f'resize filter {resize_filter!r} is not one of {", ".join(RESIZE_FILTERS)}')


def _resize_weights(in_size, out_size, resize_filter: str = 'triangle',
                    enlarged=None) -> jax.Array:
  """[out, in] float32 weights resizing one axis with `resize_filter` (see _numerators).

  Integer numerators normalised by one division each, so the weights come out bit-identical
  whether the sizes are known when compiling or only when running (a shape-polymorphic
  export): rounding to uint8 then cannot differ between them.
  """
  # The whole axis is content: the placed weights with no offset.
  weights, _ = _placed_weights(in_size, out_size, jnp.asarray(out_size, jnp.int32), 0,
                               resize_filter, enlarged)
  return weights


def letterbox_geometry(height, width, image_size: tuple[int, int]):
  """Where a crop of `height` x `width` lands in a letterbox of `image_size` (H, W).

  Returns int32 (content height, content width, top, left): the size PIL's
  `Image.thumbnail((W, H))` gives (aspect ratio kept, never enlarged, PIL's rounding) and the
  offset that centres it (floor). Works on traced or symbolic sizes, elementwise on arrays of
  them, in exact integer arithmetic (int32: sides up to about 2**30 / max(H, W)):
    - a crop that fits is kept as it is;
    - if W h >= w H the height limits: H, and the integer nearest H w / h (ties down);
    - otherwise the width limits: W, and of floor(W h / w) and its ceiling the one whose W / n
      is closer to w / h (floor on ties, at least 1).
  """
  target_height, target_width = image_size
  h = jnp.asarray(height, jnp.int32)
  w = jnp.asarray(width, jnp.int32)
  fits = (h <= target_height) & (w <= target_width)
  height_limits = target_width * h >= w * target_height
  # Height limits: round(H w / h), a tie going down.
  by_height = jnp.maximum(1, (2 * target_height * w + h - 1) // (2 * h))
  # Width limits: with r = W h mod w, floor lo = W h // w is off by r / w and the ceiling
  # lo + 1 by (w - r) / w; PIL compares W / lo - w / h = r / (lo h) with
  # w / h - W / (lo + 1) = (w - r) / ((lo + 1) h).
  low = (target_width * h) // w
  remainder = (target_width * h) % w
  high = low + (remainder > 0).astype(jnp.int32)
  by_width = jnp.maximum(1, jnp.where((low == 0) | (remainder * high <= (w - remainder) * low),
                                      low, high))
  content_height = jnp.where(fits, h, jnp.where(height_limits, target_height, by_width))
  content_width = jnp.where(fits, w, jnp.where(height_limits, by_height, target_width))
  return (content_height, content_width, (target_height - content_height) // 2,
          (target_width - content_width) // 2)


def _placed_weights(in_size, out_size: int, content, offset, resize_filter: str = 'triangle',
                    enlarged=None):
  """[out, in] weights resizing `in_size` pixels to `content` pixels placed at `offset` of
  `out_size`, and [out] bool: which output pixels are content.

  Content row o holds _resize_weights(in_size, content, ...)[o - offset] (the same integer
  numerators, so the same float32 weights); the other rows are zero. `content`, `offset` and
  `enlarged` may be traced: the export computes them from symbolic image sizes.
  """
  i = jnp.arange(in_size, dtype=jnp.int32)
  j = jnp.arange(out_size, dtype=jnp.int32) - offset
  inside = (j >= 0) & (j < content)
  n_in = jnp.asarray(in_size, jnp.int32)
  numerator = _numerators(i, j, n_in, content, resize_filter, enlarged)
  numerator = jnp.where(inside[:, None], numerator, 0)
  total = jnp.maximum(jnp.sum(numerator, axis=1, keepdims=True), 1)
  return numerator.astype(jnp.float32) / total.astype(jnp.float32), inside


def resize_images(images: jax.Array, image_size: tuple[int, int],
                  resize_mode: str = DEFAULT_RESIZE_MODE,
                  resize_filter: str = DEFAULT_RESIZE_FILTER) -> jax.Array:
  """uint8 [B, h, w, 3] of any size -> uint8 [B, H, W, 3], as the evaluation pipeline resizes:
  with `resize_filter` (plain bilinear where the crop is enlarged along both axes), clipped,
  rounded; stretched to (H, W), or letterboxed (aspect ratio kept, never enlarged, centred on
  white)."""
  if resize_filter not in RESIZE_FILTERS:
    raise ValueError(f'resize filter {resize_filter!r} is not one of {", ".join(RESIZE_FILTERS)}')
  height, width = image_size
  x = images.astype(jnp.float32)
  highest = jax.lax.Precision.HIGHEST
  # The crop's size as traced int32 scalars: under a shape-polymorphic export the test
  # "enlarged along both axes" is only known when running, so it selects between weights.
  in_height = jnp.asarray(images.shape[1], jnp.int32)
  in_width = jnp.asarray(images.shape[2], jnp.int32)
  if resize_mode == 'stretch':
    enlarged = (in_height <= height) & (in_width <= width)
    x = jnp.einsum('oh,bhwc->bowc',
                   _resize_weights(images.shape[1], height, resize_filter, enlarged), x,
                   precision=highest)
    x = jnp.einsum('pw,bowc->bopc',
                   _resize_weights(images.shape[2], width, resize_filter, enlarged), x,
                   precision=highest)
  elif resize_mode == 'letterbox':
    content_height, content_width, top, left = letterbox_geometry(
        images.shape[1], images.shape[2], image_size)
    # The resize goes to the content size: enlarged means it is at least the crop's.
    enlarged = (in_height <= content_height) & (in_width <= content_width)
    rows, row_inside = _placed_weights(images.shape[1], height, content_height, top,
                                       resize_filter, enlarged)
    columns, column_inside = _placed_weights(images.shape[2], width, content_width, left,
                                             resize_filter, enlarged)
    x = jnp.einsum('oh,bhwc->bowc', rows, x, precision=highest)
    x = jnp.einsum('pw,bowc->bopc', columns, x, precision=highest)
    # Border pixels got all-zero weights: 0 + 255 is exactly white.
    border = ~(row_inside[:, None] & column_inside[None, :])
    x = x + jnp.where(border, _WHITE, 0.0)[None, :, :, None]
  else:
    raise ValueError(f'resize mode {resize_mode!r} is not one of {", ".join(RESIZE_MODES)}')
  return jnp.round(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


preprocess = jax.jit(resize_images, static_argnames=('image_size', 'resize_mode',
                                                     'resize_filter'))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError:
    raise InputError(f'{workdir}: not a training workdir (no config.json)') from None


class SearchModel:
  """The embedding model of a trained workdir.

  Attributes:
    workdir, checkpoint_dir, step: where the weights came from.
    config: the workdir's config; image_size: (H, W) model input; resize_mode: 'stretch' or
      'letterbox' (input.resize_mode); resize_filter: 'triangle', 'area' or 'bilinear'
      (input.resize_filter).
    fingerprint: sha256 of the weights, model config and preprocessing; two indexes are
      comparable exactly when their fingerprints are equal.
  """

  def __init__(self, workdir: str, *, step: int | None = None, batch_size: int = 64):
    self.workdir = os.path.abspath(workdir)
    self.config = load_config(self.workdir)
    self.image_size = tuple(int(v) for v in self.config.input.image_size)
    self.resize_mode = self.config.input.get('resize_mode', DEFAULT_RESIZE_MODE)
    if self.resize_mode not in RESIZE_MODES:
      raise InputError(f'{self.workdir}: input.resize_mode {self.resize_mode!r} in config.json '
                       f'is not one of {", ".join(RESIZE_MODES)}')
    self.resize_filter = self.config.input.get('resize_filter', DEFAULT_RESIZE_FILTER)
    if self.resize_filter not in RESIZE_FILTERS:
      raise InputError(f'{self.workdir}: input.resize_filter {self.resize_filter!r} in '
                       f'config.json is not one of {", ".join(RESIZE_FILTERS)}')
    if not os.path.isdir(os.path.join(self.workdir, 'checkpoints')):
      raise InputError(f'{self.workdir}: no checkpoints/ folder (has it trained yet?)')
    checkpointer = checkpointing.Checkpointer(os.path.join(self.workdir, 'checkpoints'))
    self.checkpoint_dir = checkpointer.directory
    try:
      self.step = checkpointer.latest_step() if step is None else step
      if self.step is None:
        raise InputError(f'{self.workdir}: no checkpoint in {self.checkpoint_dir}')
      state = checkpointer.restore(step=self.step)
    finally:
      checkpointer.close()
    num_classes = int(np.shape(state['params']['classifier']['kernel'])[-1])
    # Shapes only: the checkpoint supplies every value, so nothing is initialised or compiled.
    model = nnx.eval_shape(lambda: build_model(self.config.model, num_classes, seed=0))
    self.graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = nnx.as_pure((params, batch_stats))
    # Same tree as the model's, the checkpoint's values.
    self.params = jax.tree.map(lambda like, saved: jnp.asarray(saved, like.dtype), params,
                               _as_tree(state['params'], params))
    self.batch_stats = jax.tree.map(lambda like, saved: jnp.asarray(saved, like.dtype),
                                    batch_stats, _as_tree(state['batch_stats'], batch_stats))
    self.fingerprint = self._fingerprint()
    self.batch_size = batch_size
    self.mesh = ts.make_mesh()
    self._embed = ts.make_embed_fn(self.graphdef, self.mesh)
    replicated = NamedSharding(self.mesh, P())
    self._device_params = jax.device_put((self.params, self.batch_stats), replicated)
    self._batch_sharding = NamedSharding(self.mesh, P(ts.DATA_AXIS))

  @property
  def preprocessing(self) -> dict:
    settings = {'image_size': list(self.image_size), 'resize': self.resize_mode,
                'antialias': self.resize_filter != 'bilinear', 'dtype': 'uint8',
                'normalisation': 'in the model (ImageNet mean/std)'}
    # The default filter is left out, so workdirs and indexes from before the setting existed
    # keep their fingerprints.
    if self.resize_filter != DEFAULT_RESIZE_FILTER:
      settings['filter'] = self.resize_filter
    return settings

  def describe(self) -> dict:
    """What an index records about the model it was built with."""
    return {'workdir': self.workdir, 'checkpoint_dir': self.checkpoint_dir, 'step': int(self.step),
            'fingerprint': self.fingerprint, 'backbone': self.config.model.backbone,
            'preprocessing': self.preprocessing}

  def _fingerprint(self) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({'model': self.config.model.to_dict(),
                              'preprocessing': self.preprocessing}, sort_keys=True,
                             default=str).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path((self.params, self.batch_stats)):
      digest.update(jax.tree_util.keystr(path).encode())
      digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()

  def prepare(self, crop: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3] model input."""
    return np.asarray(preprocess(crop[None], self.image_size, self.resize_mode,
                                 self.resize_filter))[0]

  def embed_prepared(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] model inputs -> [N, F] float32 unit vectors, batched over all devices."""
    images = np.asarray(images)
    devices = self.mesh.devices.size
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      # Power-of-two batch shapes: few compilations, little padding for a single query.
      size = max(devices, 1 << max(len(chunk) - 1, 0).bit_length())
      size = -(-size // devices) * devices
      padded = np.zeros((size,) + chunk.shape[1:], np.uint8)
      padded[:len(chunk)] = chunk
      batch = jax.device_put(padded, self._batch_sharding)
      outputs.append(np.asarray(self._embed(*self._device_params, batch))[:len(chunk)])
    if not outputs:
      return np.zeros((0, self.embedding_dim), np.float32)
    return np.concatenate(outputs).astype(np.float32)

  def embed_crops(self, crops: list[np.ndarray]) -> np.ndarray:
    """uint8 [h, w, 3] crops of any sizes -> [N, F] float32 unit vectors."""
    if not crops:
      return np.zeros((0, self.embedding_dim), np.float32)
    return self.embed_prepared(np.stack([self.prepare(c) for c in crops]))

  @property
  def embedding_dim(self) -> int:
    return int(np.shape(self.params['bottleneck']['scale'])[0])

  def embed_with_params_fn(self):
    """fn((params, batch_stats), images uint8 [B, h, w, 3]) -> [B, F] float32 unit vectors:
    preprocessing and model in one function (what the exports hold)."""
    graphdef, image_size = self.graphdef, self.image_size
    resize_mode, resize_filter = self.resize_mode, self.resize_filter

    def embed_raw(weights, images):
      model = nnx.merge(graphdef, *weights)
      return model.embed(resize_images(images, image_size, resize_mode, resize_filter))

    return embed_raw

  @property
  def weights(self):
    return (self.params, self.batch_stats)


def _as_tree(saved, like):
  """The restored nested dict `saved` rearranged into the structure of `like` (by key path)."""
  flat_saved = {_path_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
  leaves = []
  for path, _ in jax.tree_util.tree_leaves_with_path(like):
    key = _path_key(path)
    if key not in flat_saved:
      raise InputError(f'checkpoint lacks {key}: not a checkpoint of this model')
    leaves.append(flat_saved[key])
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def _path_key(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
