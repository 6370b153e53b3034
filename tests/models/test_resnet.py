"""Tests for the ResNet-IBN-a backbone, its normalisation layers and the ReID head."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fashion_jax.models import build_model, parse_backbone
from fashion_jax.models.layers import IBN, BatchNorm
from fashion_jax.models.resnet import ResNet


def _model_config(**overrides):
  c = ml_collections.ConfigDict(dict(backbone='resnet18_ibn_a', last_stride=1, width=8,
                                     dtype='float32', sync_batch_norm=False))
  c.update(overrides)
  return c


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_resnet50_parameter_count_matches_torchvision():
  # torchvision's resnet50 has 25,557,032 parameters, of which fc holds 2048 * 1000 + 1000.
  backbone = ResNet(50, rngs=nnx.Rngs(0))
  assert _count(nnx.state(backbone, nnx.Param)) == 25_557_032 - 2_049_000
  # IBN-a swaps half of some BatchNorms for InstanceNorms with the same affine parameters.
  ibn = ResNet(50, ibn_stages=(True, True, True, False), rngs=nnx.Rngs(0))
  assert _count(nnx.state(ibn, nnx.Param)) == 25_557_032 - 2_049_000
  # Each bn1 of stages 1-3 is IBN: half = int(planes / 2) channels in the IN branch.
  assert isinstance(ibn.layer3[0].bn1, IBN) and ibn.layer3[0].bn1.half == 128
  assert isinstance(ibn.layer4[0].bn1, BatchNorm)


@pytest.mark.parametrize('last_stride,expected', [(1, 4), (2, 2)])
def test_last_stride_sets_output_resolution(last_stride, expected):
  backbone = ResNet(10, last_stride=last_stride, width=8, rngs=nnx.Rngs(0))
  fmap = backbone(jnp.zeros((2, 64, 64, 3)), train=False)
  assert fmap.shape == (2, expected, expected, backbone.out_features)


def test_batchnorm_matches_torch_semantics():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (6, 5, 4)).astype(np.float32)
  bn = BatchNorm(4)
  y = bn(jnp.asarray(x), train=True)
  flat = x.reshape(-1, 4)
  expected = (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)  # biased variance to normalise
  np.testing.assert_allclose(y, expected, atol=1e-4)
  # Running estimates: momentum 0.1, unbiased variance (n / (n - 1)).
  np.testing.assert_allclose(bn.mean[...], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  y_eval = bn(jnp.asarray(x), train=False)
  np.testing.assert_allclose(
      y_eval, (x - bn.mean[...]) / np.sqrt(bn.var[...] + 1e-5), atol=1e-5)


def test_ibn_normalises_instance_half_and_batch_half():
  rng = np.random.default_rng(1)
  x = rng.normal(1.0, 2.0, (3, 4, 4, 6)).astype(np.float32)
  y = np.asarray(IBN(6)(jnp.asarray(x), train=True))
  inst = x[..., :3]
  expected_in = (inst - inst.mean((1, 2), keepdims=True)) / np.sqrt(
      inst.var((1, 2), keepdims=True) + 1e-5)
  np.testing.assert_allclose(y[..., :3], expected_in, atol=1e-4)
  batch = x[..., 3:]
  expected_bn = (batch - batch.mean((0, 1, 2))) / np.sqrt(batch.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(y[..., 3:], expected_bn, atol=1e-4)


def test_reid_head_bnneck_and_classifier():
  model = build_model(_model_config(), num_classes=7)
  assert model.bottleneck.bias is None  # BNNeck: shift frozen at zero
  assert model.classifier.bias is None
  kernel = np.asarray(model.classifier.kernel[...])
  assert kernel.shape == (model.backbone.out_features, 7)
  assert 0.0005 < kernel.std() < 0.002
  images = jax.random.randint(jax.random.key(0), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
  out = model(images, train=True)
  assert out.global_feat.shape == out.neck_feat.shape == (4, model.backbone.out_features)
  assert out.logits.shape == (4, 7)
  emb = model.embed(images)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  # The embedding is the post-BNNeck feature in inference mode, normalised.
  _, neck = model.features(images, train=False)
  np.testing.assert_allclose(emb, neck / jnp.linalg.norm(neck, axis=1, keepdims=True), atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters():
  model = build_model(_model_config(dtype='bfloat16'), num_classes=3)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  out = model(jnp.zeros((2, 32, 32, 3), jnp.uint8), train=True)
  assert out.global_feat.dtype == jnp.float32


def test_parse_backbone_rejects_unknown_names():
  assert parse_backbone('resnet50_ibn_a') == (50, True)
  assert parse_backbone('resnet18') == (18, False)
  with pytest.raises(ValueError, match="unknown backbone 'resnet51'"):
    parse_backbone('resnet51')
  with pytest.raises(ValueError, match='unknown backbone'):
    parse_backbone('vit_b16')
