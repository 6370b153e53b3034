"""The test-time flip (eval.flip): the embedding of an image and of its mirror image combined."""

import jax
import numpy as np
from flax import nnx

import tiny_config
from fashion_jax import train_step as ts
from fashion_jax.models import build_model


def _unit(rows: np.ndarray) -> np.ndarray:
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_flip_sums_the_image_and_its_mirror_before_normalising():
  config = tiny_config.get_config()
  model = build_model(config.model, num_classes=5, seed=0)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  # Running statistics away from their initial values, so the BNNeck is not the identity.
  rng = np.random.default_rng(0)
  batch_stats = jax.tree.map(lambda a: a + rng.uniform(0.1, 0.5, np.shape(a)).astype(a.dtype),
                             batch_stats)
  mesh = ts.make_mesh()
  plain = ts.make_embed_fn(graphdef, mesh)
  flipped = ts.make_embed_fn(graphdef, mesh, flip=True)
  images = rng.integers(0, 256, (8, 32, 32, 3), np.uint8)
  mirrors = np.ascontiguousarray(images[:, :, ::-1])

  # f_i before normalisation, from the model itself.
  def neck(x):
    return np.asarray(nnx.merge(graphdef, params, batch_stats).features(x, train=False)[1])

  expected = _unit(neck(images) + neck(mirrors))
  got = np.asarray(flipped(params, batch_stats, images))
  np.testing.assert_allclose(got, expected, atol=2e-6)
  # The same embedding for an image and its mirror image; without the flip, another one.
  np.testing.assert_allclose(np.asarray(flipped(params, batch_stats, mirrors)), got, atol=2e-6)
  np.testing.assert_allclose(np.asarray(plain(params, batch_stats, images)), _unit(neck(images)),
                             atol=2e-6)
  assert np.abs(np.asarray(plain(params, batch_stats, mirrors)) - _unit(neck(images))).max() > 1e-3
