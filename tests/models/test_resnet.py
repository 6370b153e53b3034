"""Tests for the ResNet / IBN backbones' structure, the normalisation layers and the ReID head.

Numerical equivalence with PyTorch lives in test_torch_reference.py.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fashion_jax import configlib
from fashion_jax import train_step as ts
from fashion_jax.models import backbone_names, build_backbone, build_model, get_backbone
from fashion_jax.models import layers, resnet
from fashion_jax.models.layers import IBN, BatchNorm, InstanceNorm


def _model_config(**overrides):
  # The architecture test_torch_reference's file test builds too: random init compiles once.
  c = ml_collections.ConfigDict(dict(backbone='resnet18_ibn_b', last_stride=1, width=64,
                                     dtype='float32', sync_batch_norm=False))
  c.update(overrides)
  return c


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@functools.cache
def _abstract(name, **kwargs):
  # Shapes only: building ResNet-101 for real costs tens of seconds of random init on CPU.
  return nnx.eval_shape(lambda: build_backbone(name, rngs=nnx.Rngs(0), **kwargs))


_FC = 2048 * 1000 + 1000  # the ImageNet classifier of the reference counts, absent here


# Published parameter counts with the 1000-class fc: torchvision's resnet18/34/50/101/152. IBN-a
# gives half of some BatchNorms' channels to InstanceNorms, same number of affine parameters;
# IBN-b adds InstanceNorm(256) and InstanceNorm(512) after the sums of layer1.2 and layer2.3
# (IBN-Net's resnet50_ibn_b: 25,558,568; resnet101_ibn_b: 44,550,696).
# ResNet-10 (BasicBlock x [1, 1, 1, 1], torchvision's layout; this project's small model) has no
# published figure: 5,418,792 is counted by hand (checked by the same count giving ResNet-18's).
# With basic blocks IBN-b's two InstanceNorms are IN(64) and IN(128).
@pytest.mark.parametrize('name,count,fc', [
    ('resnet10', 5_418_792, 512 * 1000 + 1000),
    ('resnet10_ibn_a', 5_418_792, 512 * 1000 + 1000),
    # One block per stage, and IBN-Net puts IBN-b's IN in no stage's first block: none here.
    ('resnet10_ibn_b', 5_418_792, 512 * 1000 + 1000),
    ('resnet18', 11_689_512, 512 * 1000 + 1000),
    ('resnet18_ibn_a', 11_689_512, 512 * 1000 + 1000),
    ('resnet18_ibn_b', 11_689_512 + 2 * 64 + 2 * 128, 512 * 1000 + 1000),
    ('resnet34', 21_797_672, 512 * 1000 + 1000),
    ('resnet34_ibn_a', 21_797_672, 512 * 1000 + 1000),
    ('resnet34_ibn_b', 21_797_672 + 2 * 64 + 2 * 128, 512 * 1000 + 1000),
    ('resnet50', 25_557_032, _FC),
    ('resnet50_ibn_a', 25_557_032, _FC),
    ('resnet50_ibn_b', 25_557_032 + 2 * 256 + 2 * 512, _FC),
    ('resnet101', 44_549_160, _FC),
    ('resnet101_ibn_a', 44_549_160, _FC),
    ('resnet101_ibn_b', 44_550_696, _FC),
    ('resnet152', 60_192_808, _FC),
    ('resnet152_ibn_a', 60_192_808, _FC),
    ('resnet152_ibn_b', 60_192_808 + 2 * 256 + 2 * 512, _FC),
    ('se_resnext50_32x4d', 27_559_896, _FC),  # Cadene's pretrainedmodels, with last_linear
    ('se_resnext101_32x4d', 48_955_416, _FC),  # (timm's tables: 48.96M)
    # torchvision's efficientnet_b2 / _b4 (EfficientNet_B*_Weights.meta['num_params']), whose
    # classifier is Linear(1408 or 1792, 1000).
    ('efficientnet_b2', 9_109_994, 1408 * 1000 + 1000),
    ('efficientnet_b4', 19_341_616, 1792 * 1000 + 1000),
    # torchreid's osnet_ain_x1_0 without classifier: 2,169,508 ("2.2M" in the OSNet papers),
    # of which its 512-d fc layer (Linear 512x512 + BatchNorm1d) holds 263,680; we end at conv5.
    ('osnet_ain_x1_0', 2_169_508, 512 * 512 + 512 + 2 * 512),
])
def test_parameter_counts_match_published(name, count, fc):
  assert _count(nnx.state(_abstract(name), nnx.Param)) == count - fc


def test_ibn_a_layout():
  ibn = _abstract('resnet50_ibn_a')
  # Each bn1 of stages 1-3 is IBN: half = int(planes / 2) channels in the IN branch.
  assert isinstance(ibn.layer3[0].bn1, IBN) and ibn.layer3[0].bn1.half == 128
  assert all(isinstance(b.bn1, IBN) for s in (ibn.layer1, ibn.layer2, ibn.layer3) for b in s)
  assert isinstance(ibn.layer4[0].bn1, BatchNorm) and isinstance(ibn.bn1, BatchNorm)
  assert all(b.IN is None for s in (ibn.layer1, ibn.layer2, ibn.layer3, ibn.layer4) for b in s)


@pytest.mark.parametrize('name', ['se_resnext50_32x4d', 'efficientnet_b2', 'osnet_ain_x1_0'])
def test_fixed_width_architectures_reject_width(name):
  with pytest.raises(ValueError, match=f'model.width must be 64 for {name}, got 8'):
    build_backbone(name, width=8, rngs=nnx.Rngs(0))


def test_ibn_b_layout():
  ibn = _abstract('resnet50_ibn_b')
  assert isinstance(ibn.bn1, InstanceNorm)  # the stem
  with_in = [f'layer{i + 1}.{j}' for i, s in enumerate((ibn.layer1, ibn.layer2, ibn.layer3,
                                                          ibn.layer4))
             for j, b in enumerate(s) if b.IN is not None]
  assert with_in == ['layer1.2', 'layer2.3']  # last block of stages 1 and 2 only
  assert not any(isinstance(b.bn1, IBN) for s in (ibn.layer1, ibn.layer2) for b in s)


def _out_channels(name):
  entry = get_backbone(name)
  if entry.family == 'efficientnet':
    return {'efficientnet_b2': 1408, 'efficientnet_b4': 1792}[name]  # 4x the last stage's
  return 512 if entry.family == 'osnet_ain' or entry.arch['depth'] < 50 else 2048


# Every convolutional backbone, both input sizes of the paper per case (the ViTs return tokens:
# tests/models/test_vit.py).
@pytest.mark.parametrize('name', [n for n in backbone_names() if get_backbone(n).family != 'vit'])
@pytest.mark.parametrize('last_stride', [1, 2])
def test_feature_map_shapes(name, last_stride):
  backbone = _abstract(name, last_stride=last_stride)
  graphdef, state = nnx.split(backbone)
  # OSNet has no strided last stage: always 1/16.
  stride = 16 if last_stride == 1 or get_backbone(name).family == 'osnet_ain' else 32
  channels = _out_channels(name)
  assert backbone.out_features == channels
  for size in ((256, 128), (320, 320)):
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state,
                         jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
    assert out.shape == (2, size[0] // stride, size[1] // stride, channels)


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


@pytest.fixture(scope='module')
def small_model():
  return build_model(_model_config(), num_classes=7)


def test_reid_head_bnneck_and_classifier(small_model):
  model = small_model
  assert model.bottleneck.bias is None  # BNNeck: shift frozen at zero
  assert model.classifier.bias is None
  kernel = np.asarray(model.classifier.kernel[...])
  assert kernel.shape == (model.backbone.out_features, 7)
  assert 0.0005 < kernel.std() < 0.002
  images = jax.random.randint(jax.random.key(0), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images):
    model = nnx.merge(graphdef, state)
    return model(images, train=True), model.embed(images), model.features(images, train=False)

  out, emb, (_, neck) = run(state, images)
  assert out.global_feat.shape == out.neck_feat.shape == (4, model.backbone.out_features)
  assert out.logits.shape == (4, 7)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  # The embedding is the post-BNNeck feature in inference mode, normalised.
  np.testing.assert_allclose(emb, neck / jnp.linalg.norm(neck, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize('use_bias,multiple', [(False, 8), (True, 4)])
def test_conv_padded_channels_is_the_same_function_and_kernel_gradient(use_bias, multiple):
  conv = nnx.Conv(3, 16, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=use_bias,
                  bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 20, 20, 3))
  weights = jax.random.normal(jax.random.key(2), (2, 10, 10, 16))

  def loss(conv, padded):
    y = layers.conv_padded_channels(conv, x, multiple) if padded else conv(x)
    return jnp.sum(y * weights), y

  (plain, y), plain_grads = nnx.value_and_grad(loss, has_aux=True)(conv, False)
  (padded, y_padded), padded_grads = nnx.value_and_grad(loss, has_aux=True)(conv, True)
  assert conv.kernel.shape == (7, 7, 3, 16)
  np.testing.assert_allclose(y_padded, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(padded, plain, rtol=1e-5)
  for name in ('kernel', 'bias') if use_bias else ('kernel',):
    np.testing.assert_allclose(getattr(padded_grads, name)[...], getattr(plain_grads, name)[...],
                               rtol=1e-5, atol=1e-4)
  dilated = nnx.Conv(3, 16, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='plain 2-D convolution'):
    layers.conv_padded_channels(dilated, x, multiple)
  same = nnx.Conv(3, 16, (3, 3), padding='SAME', rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layers.conv_padded_channels(same, x, multiple), same(x),
                             rtol=1e-5, atol=1e-5)


def test_resnet_with_its_stem_padded_computes_the_same_features(monkeypatch):
  # As on GPUs in 16-bit (layers.stem_channel_multiple), forced here in float32. A BatchNorm
  # stem in inference mode passes any change of the convolution on (an InstanceNorm would
  # normalise a shift away).
  model = build_backbone('resnet18', width=16, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  graphdef, state = nnx.split(model)
  features = lambda state: nnx.merge(graphdef, state)(images, train=False)
  plain = jax.jit(features)(state)
  monkeypatch.setattr(resnet, 'stem_channel_multiple', lambda dtype: 8)
  padded = jax.jit(lambda state: features(state))(state)
  np.testing.assert_allclose(padded, plain, rtol=1e-4, atol=1e-4)
  assert layers.stem_channel_multiple(jnp.bfloat16) == (8 if jax.default_backend() == 'gpu'
                                                         else 1)


def test_bfloat16_step_matches_float32(small_model):
  """Mixed precision: same parameters, bf16 compute; loss within 2e-2, embeddings cos > 0.99."""
  config = configlib.base_config()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
  labels = jnp.asarray(np.repeat(np.arange(4), 2), jnp.int32)
  model_bf16 = nnx.eval_shape(lambda: build_model(_model_config(dtype='bfloat16'), num_classes=7))
  nnx.update(model_bf16, nnx.state(small_model))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model_bf16, nnx.Param)))
  results = {}
  for name, model in (('float32', small_model), ('bfloat16', model_bf16)):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = {'params': nnx.as_pure(params), 'batch_stats': nnx.as_pure(stats),
             'loss_state': {'center': {'centers': jax.random.normal(
                 jax.random.key(0), (7, model.backbone.out_features))}}}

    @jax.jit
    def step(state, graphdef=graphdef):
      _, _, _, metrics = ts.loss_and_grads(graphdef, state, images, labels, config.loss)
      model = nnx.merge(graphdef, state['params'], state['batch_stats'])
      return metrics['loss'], model.embed(images)

    results[name] = step(state)
  (loss32, emb32), (loss16, emb16) = results['float32'], results['bfloat16']
  assert emb16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  assert float(jnp.min(jnp.sum(emb32 * emb16, axis=1))) > 0.99


def _described(name):
  entry = get_backbone(name)
  return entry.name, entry.family, dict(entry.arch)


def test_get_backbone_rejects_unknown_names():
  assert _described('resnet50_ibn_a') == ('resnet50_ibn_a', 'resnet', {'depth': 50, 'ibn': 'a'})
  assert _described('resnet50_ibn_b') == ('resnet50_ibn_b', 'resnet', {'depth': 50, 'ibn': 'b'})
  assert _described('resnet101_ibn_a') == ('resnet101_ibn_a', 'resnet',
                                           {'depth': 101, 'ibn': 'a'})
  assert _described('resnet18') == ('resnet18', 'resnet', {'depth': 18, 'ibn': None})
  assert _described('se_resnext50_32x4d') == ('se_resnext50_32x4d', 'se_resnext', {'depth': 50})
  assert _described('osnet_ain_x1_0') == ('osnet_ain_x1_0', 'osnet_ain', {})
  assert _described('efficientnet_b4') == ('efficientnet_b4', 'efficientnet', {'variant': 'b4'})
  assert all(get_backbone(name).name == name for name in backbone_names())
  with pytest.raises(ValueError, match="unknown backbone 'resnet51'"):
    get_backbone('resnet51')
  for bad in ('vit_b15', 'resnet50_ibn_c', 'resnet50_ibn_', 'se_resnext50',
              'se_resnext34_32x4d', 'efficientnet_b3', 'efficientnet_b22', 'efficientnet'):
    with pytest.raises(ValueError, match='unknown backbone'):
      get_backbone(bad)


def test_conv_init_is_kaiming_normal_fan_out_and_a_function_of_the_key():
  from fashion_jax.models.resnet import kaiming_normal_fan_out
  shape = (3, 3, 64, 128)  # [kh, kw, in, out]: fan_out = 3 * 3 * 128
  w = np.asarray(kaiming_normal_fan_out(jax.random.key(0), shape))
  assert w.shape == shape and w.dtype == np.float32
  assert abs(w.std() - np.sqrt(2.0 / (9 * 128))) < 0.02 * np.sqrt(2.0 / (9 * 128))
  assert abs(w.mean()) < 3 * w.std() / np.sqrt(w.size)
  np.testing.assert_array_equal(w, kaiming_normal_fan_out(jax.random.key(0), shape))
  assert not np.array_equal(w, kaiming_normal_fan_out(jax.random.key(1), shape))
  # Traced (jit, eval_shape): the same distribution from jax.random.
  traced = np.asarray(jax.jit(lambda k: kaiming_normal_fan_out(k, shape, jnp.bfloat16))(
      jax.random.key(0)).astype(jnp.float32))
  assert abs(traced.std() - w.std()) < 0.03 * w.std()
