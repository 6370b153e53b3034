"""Exports of the embedding function, preprocessing included, for serving without this code.

  embed.stablehlo    jax.export serialization: fn(images uint8 [b, h, w, 3]) -> [b, F] float32,
                     b, h and w symbolic; load with jax.export.deserialize(...).call(images)
  saved_model/       TensorFlow SavedModel (jax2tf, native serialization) with the signature
                     serving_default(images uint8 [None, None, None, 3]) -> {'embeddings'}
Both are lowered for CPU, CUDA, ROCm and TPU (PLATFORMS).
  export.json        model, checkpoint, fingerprint, preprocessing and the signature

Both take a batch of crops of one size: each is resized to the model's input size by
fashion_jax.preprocessing.resize_images, as the workdir's input.resize_mode and
input.resize_filter say (stretched, or letterboxed on white with its aspect ratio kept), and
rounded to uint8, exactly as the search tool does.
"""

import importlib.util
import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

STABLEHLO_FILE = 'embed.stablehlo'
SAVED_MODEL_DIR = 'saved_model'
EXPORT_FILE = 'export.json'
# Lowered for each, whatever this machine has: one export serves on CPU, NVIDIA and AMD GPUs
# and TPUs (the caller's device picks the lowering).
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def export_stablehlo(model, *, platforms=PLATFORMS) -> jax_export.Exported:
  """The embedding function with the weights as constants, batch and image size symbolic."""
  fn = model.embed_with_params_fn()
  weights = model.weights
  batch, height, width = jax_export.symbolic_shape('b, h, w')
  spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
  return jax_export.export(jax.jit(lambda images: fn(weights, images)),
                           platforms=platforms)(spec)


def save_saved_model(model, path: str) -> None:
  """A TF SavedModel via jax2tf; the weights are tf.Variables (not constants in the graph)."""
  import tensorflow as tf
  from jax.experimental import jax2tf
  leaves, treedef = jax.tree.flatten(model.weights)
  variables = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]
  embed = model.embed_with_params_fn()
  converted = jax2tf.convert(
      lambda flat, images: embed(jax.tree.unflatten(treedef, flat), images),
      with_gradient=False, polymorphic_shapes=[None, '(b, h, w, 3)'],
      native_serialization_platforms=PLATFORMS)
  module = tf.Module()
  module.weights = variables

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')])
  def serve(images):
    return {'embeddings': converted(variables, images)}

  module.serve = serve
  tf.saved_model.save(module, path, signatures={'serving_default': serve})


_OURS = (STABLEHLO_FILE, SAVED_MODEL_DIR, EXPORT_FILE)


def _check_out(out: str) -> None:
  """`out` may be new, empty, or an earlier export (its export.json): that is replaced whole,
  so no file of it stays beside the new one (a SavedModel the new export.json does not list).
  A folder holding anything else is refused."""
  from fashion_jax.search.images import InputError
  if os.path.exists(out) and not os.path.isdir(out):
    raise InputError(f'cannot export to {out}: it is a file, not a folder')
  if not os.path.isdir(out) or not os.listdir(out):
    return
  others = sorted(set(os.listdir(out)) - set(_OURS))
  if others or not os.path.isfile(os.path.join(out, EXPORT_FILE)):
    raise InputError(f'cannot export to {out}: it holds other files '
                     f'({", ".join(others[:3] or sorted(os.listdir(out))[:3])}); choose a new '
                     'or empty folder')


def _remove_abandoned(parent: str) -> None:
  """Deletes the staging folders of exports whose process has gone (killed before its
  cleanup); those of running exports are theirs."""
  for name in os.listdir(parent):
    found = re.match(r'^\.export-(\d+)-', name)
    if not found:
      continue
    try:
      os.kill(int(found[1]), 0)
      continue  # that export still runs
    except ProcessLookupError:
      pass
    except (OSError, OverflowError):
      continue  # another user's process, or not a process id: left alone
    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def export_all(model, out: str, *, saved_model: bool = True) -> list[str]:
  """Writes the model's StableHLO export, its SavedModel unless `saved_model` is False, and
  export.json describing them, into `out` (new, empty, or an earlier export: replaced once the
  new one is complete, so a failed export leaves the earlier one as it was)."""
  from fashion_jax.search.images import InputError
  _check_out(out)
  if saved_model and importlib.util.find_spec('tensorflow') is None:
    raise InputError('the SavedModel needs TensorFlow (pip install -e ".[data]"); '
                     '--no-saved-model writes the StableHLO export alone')
  parent = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned(parent)
    staging = tempfile.mkdtemp(prefix=f'.export-{os.getpid()}-', dir=parent)
  except OSError as error:  # named by the folder asked for, not the staging one
    raise InputError(f'cannot export to {out}: {error.strerror or error}') from None
  try:
    exported = export_stablehlo(model)
    with open(os.path.join(staging, STABLEHLO_FILE), 'wb') as f:
      f.write(exported.serialize())
    if saved_model:
      save_saved_model(model, os.path.join(staging, SAVED_MODEL_DIR))
    with open(os.path.join(staging, EXPORT_FILE), 'w') as f:
      json.dump({'model': model.describe(), 'embedding_dim': model.embedding_dim,
                 'input': 'images uint8 [b, h, w, 3] (RGB crops of one size)',
                 'output': 'embeddings float32 [b, F], L2-normalised',
                 'stablehlo': {'file': STABLEHLO_FILE, 'platforms': list(exported.platforms),
                               'calling_convention_version':
                                   exported.calling_convention_version},
                 'saved_model': {'dir': SAVED_MODEL_DIR, 'signature': 'serving_default'}
                 if saved_model else None}, f, indent=2)
    os.makedirs(out, exist_ok=True)
    for name in _OURS:  # the earlier export's files, then the new ones in their place
      path = os.path.join(out, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    written = []
    for name in _OURS:
      if os.path.exists(os.path.join(staging, name)):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
        written.append(os.path.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return written
