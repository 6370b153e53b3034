"""Exports of the embedding function, preprocessing included, for serving without this code.

  embed.stablehlo    jax.export serialization: fn(images uint8 [b, h, w, 3]) -> [b, F] float32,
                     b, h and w symbolic; load with jax.export.deserialize(...).call(images)
  saved_model/       TensorFlow SavedModel (jax2tf, native serialization) with the signature
                     serving_default(images uint8 [None, None, None, 3]) -> {'embeddings'}
  export.json        model, checkpoint, fingerprint, preprocessing and the signature

Both take a batch of crops of one size: each is resized to the model's input size by
fashion_jax.preprocessing.resize_images, as the workdir's input.resize_mode and
input.resize_filter say (stretched, or letterboxed on white with its aspect ratio kept), and
rounded to uint8, exactly as the search tool does.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

STABLEHLO_FILE = 'embed.stablehlo'
SAVED_MODEL_DIR = 'saved_model'


def export_stablehlo(model, *, platforms=('cpu',)) -> jax_export.Exported:
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
      with_gradient=False, polymorphic_shapes=[None, '(b, h, w, 3)'])
  module = tf.Module()
  module.weights = variables

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')])
  def serve(images):
    return {'embeddings': converted(variables, images)}

  module.serve = serve
  tf.saved_model.save(module, path, signatures={'serving_default': serve})


def export_all(model, out: str, *, saved_model: bool = True) -> list[str]:
  os.makedirs(out, exist_ok=True)
  written = []
  exported = export_stablehlo(model)
  path = os.path.join(out, STABLEHLO_FILE)
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  written.append(path)
  if saved_model:
    path = os.path.join(out, SAVED_MODEL_DIR)
    save_saved_model(model, path)
    written.append(path)
  path = os.path.join(out, 'export.json')
  with open(path, 'w') as f:
    json.dump({'model': model.describe(), 'embedding_dim': model.embedding_dim,
               'input': 'images uint8 [b, h, w, 3] (RGB crops of one size)',
               'output': 'embeddings float32 [b, F], L2-normalised',
               'stablehlo': {'file': STABLEHLO_FILE, 'platforms': list(exported.platforms),
                             'calling_convention_version': exported.calling_convention_version},
               'saved_model': {'dir': SAVED_MODEL_DIR, 'signature': 'serving_default'}
               if saved_model else None}, f, indent=2)
  written.append(path)
  return written
