"""A trained workdir as an embedding function for search: checkpoint, preprocessing, fingerprint.

Reads `<workdir>/config.json` and the latest (or a given) checkpoint in `<workdir>/checkpoints`
with Orbax alone; no TensorFlow. Preprocessing is the evaluation pipeline's
(fashion_jax.preprocessing): the image (or box crop) is stretched or letterboxed to
`input.image_size` as `input.resize_mode` says, with the filter `input.resize_filter` names,
clipped, rounded to uint8; the model normalises it. The default filter runs on the host with
the input pipeline's compiled kernel where it is built, the others in JAX.
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax import checkpointing
from fashion_jax import train_step as ts
from fashion_jax.models import build_model
from fashion_jax.preprocessing import (DEFAULT_RESIZE_FILTER, host_resize_applies, preprocess,
                                      resize_images, resize_on_host, resize_settings)
from fashion_jax.search.images import InputError


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's config.json; one-line InputError when it is missing, unreadable or lacks
  what the search needs (model.backbone, input.image_size)."""
  path = os.path.join(workdir, 'config.json')
  try:
    # epath: a workdir in a bucket (gs://...), as training on a TPU VM writes it, reads too.
    data = json.loads(epath.Path(path).read_text(encoding='utf-8'))
  except FileNotFoundError:
    raise InputError(f'{workdir}: not a training workdir (no config.json)') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise InputError(f'{path}: cannot be read as a config ({error})') from None
  sections = isinstance(data, dict) and all(isinstance(data.get(k), dict)
                                            for k in ('model', 'input'))
  if (not sections or not isinstance(data['model'].get('backbone'), str)
      or not isinstance(data['input'].get('image_size'), list)
      or len(data['input']['image_size']) != 2
      or not all(isinstance(v, int) and v > 0 for v in data['input']['image_size'])):
    raise InputError(f'{path}: not a training config (needs model.backbone and a two-number '
                     'input.image_size)')
  return ml_collections.ConfigDict(data)


class SearchModel:
  """The embedding model of a trained workdir.

  Attributes:
    workdir, checkpoint_dir, step: where the weights came from.
    config: the workdir's config; image_size: (H, W) model input; resize_mode, resize_filter:
      its input.resize_mode and input.resize_filter (see fashion_jax.preprocessing).
    fingerprint: sha256 of the weights, model config and preprocessing; two indexes are
      comparable exactly when their fingerprints are equal.
  """

  def __init__(self, workdir: str, *, step: int | None = None, batch_size: int = 64):
    self.workdir = checkpointing.absolute(workdir)
    self.config = load_config(self.workdir)
    self.image_size = tuple(int(v) for v in self.config.input.image_size)
    try:
      self.resize_mode, self.resize_filter = resize_settings(self.config.input)
    except ValueError as error:
      raise InputError(f'{os.path.join(self.workdir, "config.json")}: {error}') from None
    # The test-time flip the model was evaluated with (eval.flip); absent in older workdirs.
    self.flip = self.config.get('eval', {}).get('flip', False) is True
    # Whether prepare resizes on the host (the compiled kernel) rather than in JAX.
    self.host_resize = host_resize_applies(self.resize_filter)
    if not epath.Path(self.workdir, 'checkpoints').is_dir():
      raise InputError(f'{self.workdir}: no checkpoints/ folder (has it trained yet?)')
    checkpointer = checkpointing.Checkpointer(os.path.join(self.workdir, 'checkpoints'))
    self.checkpoint_dir = checkpointer.directory
    try:
      steps = checkpointer.steps()
      self.step = (steps[-1] if steps else None) if step is None else step
      if self.step is None:
        raise InputError(f'{self.workdir}: no checkpoint in {self.checkpoint_dir}')
      others = ', '.join(str(s) for s in steps if s != self.step) or 'none'
      if self.step not in steps:
        raise InputError(f'{self.workdir}: no checkpoint of step {self.step} (saved: {others})')
      try:
        state = checkpointer.restore(step=self.step)
      except checkpointing.CheckpointDamaged as error:
        # The step is used as asked (or as the newest), never silently another: name the
        # others, which --step can choose.
        raise checkpointing.CheckpointDamaged(f'{error} (other steps saved: {others}; choose '
                                              'one with --step)') from None
    finally:
      checkpointer.close()
    num_classes = int(np.shape(state['params']['classifier']['kernel'])[-1])
    # Shapes only: the checkpoint supplies every value, so nothing is initialised or compiled.
    try:
      model = nnx.eval_shape(lambda: build_model(self.config.model, num_classes, seed=0))
    except ValueError as error:
      raise InputError(f'{os.path.join(self.workdir, "config.json")}: {error}') from None
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
    self._embed = ts.make_embed_fn(self.graphdef, self.mesh, flip=self.flip)
    replicated = NamedSharding(self.mesh, P())
    self._device_params = jax.device_put((self.params, self.batch_stats), replicated)
    self._batch_sharding = NamedSharding(self.mesh, P(ts.DATA_AXIS))

  @property
  def preprocessing(self) -> dict:
    settings = {'image_size': list(self.image_size), 'resize': self.resize_mode,
                'antialias': self.resize_filter != 'bilinear', 'dtype': 'uint8',
                'normalisation': 'in the model (ImageNet mean/std)'}
    # The default filter is not recorded: a config that names it and one that leaves it out
    # preprocess alike, so they share the fingerprint.
    if self.resize_filter != DEFAULT_RESIZE_FILTER:
      settings['filter'] = self.resize_filter
    if self.flip:  # likewise recorded only when on
      settings['flip'] = True
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
    """uint8 [h, w, 3] -> uint8 [H, W, 3] model input; indexes and queries prepare alike.

    With `host_resize`, preprocessing.resize_on_host: the input pipeline's compiled kernel,
    on the host, safe to call from any thread. Otherwise preprocessing.preprocess: JAX on the
    devices (call it from the thread that owns them), resize_images' pixels compiled per
    padded height and width rather than per crop size, so a service's memory stays flat
    whatever sizes are uploaded.
    """
    prepared = self.prepare_on_host(crop)
    if prepared is not None:
      return prepared
    return np.asarray(preprocess(crop[None], self.image_size, self.resize_mode,
                                 self.resize_filter))[0]

  def prepare_on_host(self, crop: np.ndarray) -> np.ndarray | None:
    """prepare's result where it needs no device (`host_resize`), else None."""
    if not self.host_resize:
      return None
    return resize_on_host(crop, self.image_size, self.resize_mode)

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
    """uint8 [h, w, 3] crops of any sizes -> [N, F] float32 unit vectors. Each crop is resized
    alone: resizing several at once compiles once per count as well as per bucket, and saves
    little (the resize is compute-bound)."""
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
    resize_mode, resize_filter, flip = self.resize_mode, self.resize_filter, self.flip

    def embed_raw(weights, images):
      model = nnx.merge(graphdef, *weights)
      return model.embed(resize_images(images, image_size, resize_mode, resize_filter),
                         flip=flip)

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
