"""ViT backbones: published sizes, token layout, the bicubic position-embedding resampling
(against PyTorch's), stochastic depth, bfloat16, and training through the data-parallel step."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fashion_jax.models import build_backbone, get_backbone, register, reid, vit
from fashion_jax.models.backbones import unregister
from fashion_jax.models.pretrained import variables

# Tiny architectures of each kind, registered for the tests (conversion builds by name).
TINY = {
    'vit_tiny_timm': vit.ViTSpec(patch=16, dim=64, depth=2, heads=4, grid=(2, 2)),
    'vit_tiny_dinov2': vit.ViTSpec(patch=14, dim=64, depth=2, heads=4, grid=(2, 2),
                                   layer_scale=True, stats=vit.IMAGENET_STATS),
    'vit_tiny_dinov2_reg4': vit.ViTSpec(patch=14, dim=64, depth=2, heads=4, grid=(2, 2),
                                        layer_scale=True, reg_tokens=4, embed_class=False,
                                        stats=vit.IMAGENET_STATS),
    'vit_tiny_clip_quickgelu': vit.ViTSpec(patch=16, dim=64, depth=2, heads=4, grid=(2, 2),
                                           norm_pre=True, patch_bias=False, eps=1e-5,
                                           act='quick_gelu', stats=vit.CLIP_STATS),
    'vit_tiny_siglip': vit.ViTSpec(patch=16, dim=64, depth=2, heads=4, grid=(2, 2),
                                   class_token=False, act='gelu_tanh'),
}


@pytest.fixture(scope='module', autouse=True)
def tiny_backbones():
  for name, spec in TINY.items():
    register(vit.entry(name, spec, pool='mean' if not spec.class_token else 'token'))
  yield
  for name in TINY:
    unregister(name)


def _pixels(seed, height, width, batch=2):
  """Random RGB in [0, 1], [B, H, W, 3] float64."""
  return np.random.default_rng(seed).uniform(size=(batch, height, width, 3))


def _ours(name, converted, pixels):
  """Our backbone with `converted` weights on `pixels` normalised as the ReID head does."""
  backbone = nnx.eval_shape(lambda: build_backbone(name, rngs=nnx.Rngs(0)))
  for key, var in variables(backbone).items():
    var.set_value(jnp.asarray(converted[key]))
  mean, std = vit.IMAGENET_STATS
  x = ((pixels - mean) / std).astype(np.float32)
  return np.asarray(backbone(jnp.asarray(x), train=False))


def _relative_error(ours, reference):
  assert ours.shape == reference.shape
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize('name,count', [('vit_s16', 22_050_664), ('vit_b16', 86_567_656),
                                        ('vit_l16', 304_326_632)])
def test_published_parameter_counts(name, count):
  """timm's ViT-S/B/L/16 at 224 px with their 1000-class head on the class token."""
  backbone = nnx.eval_shape(lambda: build_backbone(name, rngs=nnx.Rngs(0)))
  dim = backbone.out_features
  assert sum(v.size for v in variables(backbone).values()) + dim * 1000 + 1000 == count


def test_registered_names_and_token_layout():
  names = ['vit_s16', 'vit_b16', 'vit_l16', 'vit_b16_s12', 'vit_s14_dinov2', 'vit_b14_dinov2',
           'vit_l14_dinov2', 'vit_s14_dinov2_reg4', 'vit_b14_dinov2_reg4',
           'vit_l14_dinov2_reg4', 'vit_b16_clip', 'vit_b16_clip_quickgelu', 'vit_l14_clip',
           'vit_l14_clip_quickgelu', 'vit_b16_siglip']
  assert all(get_backbone(n).family == 'vit' for n in names)
  assert vit.IMAGENET_STATS == (reid.IMAGENET_MEAN, reid.IMAGENET_STD)
  backbone = nnx.eval_shape(lambda: build_backbone('vit_b14_dinov2_reg4', rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(backbone)
  for size, grid in (((224, 224), 16 * 16), ((252, 126), 18 * 9)):
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state,
                         jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
    assert out.shape == (2, 1 + 4 + grid, 768)
  # Overlapping patches (TransReID): 16 px every 12 px, (256 - 16) / 12 + 1 = 21 per side.
  backbone = nnx.eval_shape(lambda: build_backbone('vit_b16_s12', rngs=nnx.Rngs(0)))
  assert backbone.grid_for(256, 256) == (21, 21)
  with pytest.raises(ValueError, match='each side must be 16 \\+ a multiple of the patch '
                                       'stride 12'):
    backbone.grid_for(256, 128)
  with pytest.raises(ValueError, match='image size 100x96 does not fit the ViT patches: each '
                                       'side must be a multiple of the patch size 16'):
    nnx.eval_shape(lambda: build_backbone('vit_b16', rngs=nnx.Rngs(0))).grid_for(100, 96)


def test_pools_read_the_class_token_or_the_patches():
  tokens = jnp.arange(2 * 7 * 3, dtype=jnp.float32).reshape(2, 7, 3)
  np.testing.assert_array_equal(get_backbone('vit_b16').pool(tokens), tokens[:, 0])
  np.testing.assert_array_equal(get_backbone('vit_b16_siglip').pool(tokens), tokens.mean(1))
  np.testing.assert_allclose(vit.mean_patch_pool(tokens, num_prefix=5), tokens[:, 5:].mean(1))


def test_stochastic_depth_and_bfloat16():
  """Block i of N drops its branches with rate * i / (N - 1), driven by the training key only;
  bfloat16 computes in bfloat16 from float32 parameters, close to float32."""
  backbone = build_backbone('vit_tiny_timm', drop_path_rate=0.5, rngs=nnx.Rngs(0))
  assert [b.drop_rate for b in backbone.blocks] == [0.0, 0.5]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
  with pytest.raises(ValueError, match='stochastic depth \\(rate 0.5\\) needs a random key'):
    backbone(x, train=True)
  run = lambda key: np.asarray(backbone(x, train=True, key=jax.random.key(key)))
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))
  np.testing.assert_array_equal(backbone(x, train=False, key=jax.random.key(1)),
                                backbone(x, train=False))
  half = build_backbone('vit_tiny_timm', dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert all(v.dtype == jnp.float32 for v in variables(half).values())
  out, reference = half(x, train=False), build_backbone('vit_tiny_timm', rngs=nnx.Rngs(0))(
      x, train=False)
  assert out.dtype == jnp.bfloat16
  assert _relative_error(np.asarray(out, np.float32), np.asarray(reference)) < 0.05


# ---- References in PyTorch ------------------------------------------------------------------

torch = pytest.importorskip('torch', reason='the reference resampling needs torch')
F = torch.nn.functional


@pytest.mark.parametrize('old,new', [(2, 3), (14, 16), (37, 16), (7, 3), (5, 5)])
def test_resampling_is_torchs_antialiased_bicubic(old, new):
  grid = np.random.default_rng(old).normal(size=(1, 3, old, old + 1)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(grid), size=(new, new + 2), mode='bicubic',
                           antialias=True, align_corners=False).numpy()
  pos = np.concatenate([np.ones((1, 1, 3), np.float32),
                        grid[0].transpose(1, 2, 0).reshape(1, -1, 3)], axis=1)
  resampled = vit.resample_pos_embed(pos, (old, old + 1), (new, new + 2), prefix=1)
  np.testing.assert_array_equal(resampled[:, 0], 1.0)
  np.testing.assert_allclose(resampled[0, 1:].reshape(new, new + 2, 3),
                             expected[0].transpose(1, 2, 0), atol=1e-5)
  np.testing.assert_allclose(jax.jit(vit.resample_pos_embed, static_argnums=(1, 2, 3))(
      jnp.asarray(pos), (old, old + 1), (new, new + 2), 1), resampled, atol=1e-5)


# ---- Training ------------------------------------------------------------------------------


def test_tiny_vit_trains_through_the_data_parallel_step(tiny_builder):
  """Two steps of the project's training step (4 simulated devices, fashion_synth/tiny at 32x32)
  with stochastic depth: finite losses, and every backbone parameter moved."""
  import tiny_config
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from data_pipelines import input_pipeline
  from fashion_jax import optim
  from fashion_jax import train_step as ts
  from fashion_jax.models import build_model

  config = tiny_config.get_config()
  config.model.backbone, config.model.width = 'vit_tiny_timm', 64
  config.model.drop_path_rate = 0.1
  item_ids = input_pipeline.train_item_ids(tiny_builder)
  ds = input_pipeline.create_train_dataset(tiny_builder, config, item_ids=item_ids)
  batches = list(ds.take(2).as_numpy_iterator())
  model = build_model(config.model, len(item_ids), seed=0)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=2)
  graphdef, state = ts.create_train_state(model, tx, len(item_ids), loss_config=config.loss)
  before = jax.device_get(state['params'])
  mesh = ts.make_mesh()
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  state = ts.replicate(state, mesh)
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  for batch in batches:
    state, metrics = step(state, *jax.device_put((batch['images'], batch['labels']), sharding))
    assert np.isfinite(float(metrics['loss']))
  assert int(state['nonfinite_step']) == -1
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       state['params']['backbone'], before['backbone'])
  assert min(jax.tree.leaves(moved)) > 0.0
