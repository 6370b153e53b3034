"""The ReID strong-baseline head on a backbone: GAP -> BNNeck -> bias-free classifier.

Images enter as uint8 (or float pixel values in [0, 255]); ImageNet normalisation happens here,
so the exported embedding function includes its preprocessing.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fashion_jax.models.backbones import build_backbone, get_backbone
from fashion_jax.models.base import global_average_pool
from fashion_jax.models.layers import BatchNorm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ReIDOutput(NamedTuple):
  global_feat: jax.Array  # [B, F] f_t, before the BNNeck: metric and center losses
  neck_feat: jax.Array    # [B, F] f_i, after the BNNeck: the embedding
  logits: jax.Array       # [B, num_classes] f_i W: cross-entropy
  # [B, num_classes] cos(f_i, W_j), the same weights as a cosine classifier: CosFace and
  # ArcFace. Whichever of the two a loss does not read is dropped by the compiler.
  cosines: jax.Array


class ReIDModel(nnx.Module):
  """Backbone + pooling + BNNeck + classifier (docs/method.md section 2).

  `pool` turns the backbone's output into [B, F] (global average pooling of a feature map for
  the convolutional backbones: the registry entry's `pool`).
  """

  def __init__(self, backbone: nnx.Module, num_classes: int, *, axis_name: str | None = None,
               pool: Callable[[jax.Array], jax.Array] = global_average_pool, rngs: nnx.Rngs):
    self.backbone = backbone
    self.pool = pool
    feat = backbone.out_features
    self.bottleneck = BatchNorm(feat, use_bias=False, axis_name=axis_name)
    self.classifier = nnx.Linear(feat, num_classes, use_bias=False,
                                 kernel_init=nnx.initializers.normal(0.001), rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool,
               key: jax.Array | None = None) -> ReIDOutput:
    global_feat, neck_feat = self.features(images, train=train, key=key)
    weights = self.classifier.kernel[...].astype(jnp.float32)
    columns = weights / jnp.maximum(jnp.linalg.norm(weights, axis=0, keepdims=True), 1e-12)
    cosines = unit_rows(neck_feat.astype(jnp.float32)) @ columns
    return ReIDOutput(global_feat, neck_feat, self.classifier(neck_feat), cosines)

  def features(self, images: jax.Array, *, train: bool,
               key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] in [0, 255] -> (f_t, f_i), each [B, F] float32.

    `key` reaches every backbone and drives its stochastic layers in training (e.g.
    EfficientNet's stochastic depth); backbones without any ignore it.
    """
    features = self.backbone(normalize_images(images), train=train, key=key)
    global_feat = self.pool(features)
    return global_feat, self.bottleneck(global_feat, train=train)

  def embed(self, images: jax.Array, *, flip: bool = False) -> jax.Array:
    """images [B, H, W, 3] in [0, 255] -> L2-normalised post-BNNeck embeddings [B, F] float32.

    With `flip` (test-time flip), f_i of the image plus f_i of its mirror image, normalised: the
    same embedding for an image and its mirror image.
    """
    _, neck_feat = self.features(images, train=False)
    if flip:
      neck_feat = neck_feat + self.features(images[:, :, ::-1], train=False)[1]
    return unit_rows(neck_feat)


def unit_rows(x: jax.Array) -> jax.Array:
  """Each row divided by its L2 norm (a zero row stays zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def normalize_images(images: jax.Array) -> jax.Array:
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def build_model(model_config, num_classes: int, *, seed: int = 0) -> ReIDModel:
  """Builds the ReID model named by `model_config` (backbone, last_stride, width, dtype, sync_bn)."""
  rngs = nnx.Rngs(seed)
  axis_name = 'data' if model_config.get('sync_batch_norm', False) else None
  dtype = jnp.dtype(model_config.get('dtype', 'float32'))
  backbone = build_backbone(model_config.backbone, last_stride=model_config.last_stride,
                            width=model_config.get('width', 64), dtype=dtype, axis_name=axis_name,
                            drop_path_rate=model_config.get('drop_path_rate', 0.0),
                            attention=model_config.get('attention', 'xla'), rngs=rngs)
  return ReIDModel(backbone, num_classes, axis_name=axis_name,
                   pool=pooling(model_config.backbone, model_config.get('pool', '')), rngs=rngs)


def pooling(backbone: str, name: str = ''):
  """The pooling `model.pool` names for `backbone` ('' : the backbone's own default)."""
  entry = get_backbone(backbone)
  if not name:
    return entry.pool
  if name not in entry.pools:
    offered = ', '.join(entry.pools) or "none but the default ''"
    raise ValueError(f'model.pool {name!r} is not offered by {backbone} (it offers: {offered})')
  return entry.pools[name]
