"""The backbone registry: a toy family registered here is built, checked, trained and converted
like the shipped ones, with its own pooling and a random key in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax import configlib, convert_weights, optim
from fashion_jax import train_step as ts
from fashion_jax.models import Backbone, backbone_names, build_model, get_backbone, register
from fashion_jax.models.backbones import unregister

NAME = 'toy_tokens'


class ToyTokens(nnx.Module):
  """4x4 patches -> tokens [B, N, width]; in training a key drops whole tokens (p = 0.25)."""

  def __init__(self, *, width: int, dtype=jnp.float32, axis_name=None, rngs: nnx.Rngs):
    del axis_name
    self.patch = nnx.Conv(3, width, (4, 4), strides=(4, 4), dtype=dtype, rngs=rngs)
    self.out_features = width

  def __call__(self, x, *, train, key=None):
    tokens = self.patch(x)
    tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    if train and key is not None:
      keep = jax.random.bernoulli(key, 0.75, tokens.shape[:2])[..., None]
      tokens = jnp.where(keep, tokens / 0.75, 0.0)
    return tokens


def _torch_name(path: str) -> str:
  return 'encoder.' + path.replace('kernel', 'weight')


@pytest.fixture
def toy_backbone():
  entry = register(Backbone(name=NAME, family='toy', build=ToyTokens, torch_name=_torch_name,
                            pool=lambda tokens: jnp.mean(tokens.astype(jnp.float32), axis=1),
                            options=('width',)))
  yield entry
  unregister(NAME)
  assert NAME not in backbone_names()


def _config():
  c = configlib.base_config()
  c.dataset.name = 'fashion_synth/tiny'
  c.model.backbone, c.model.width = NAME, 12
  c.input.image_size = (32, 32)
  c.train.batch_size, c.train.k = 16, 2
  c.optim.warmup_epochs = 0
  return c


def test_a_registered_backbone_is_checked_built_trained_and_embedded(toy_backbone):
  config = _config()
  configlib.validate_config(config, num_devices=4)
  assert get_backbone(NAME) is toy_backbone
  model = build_model(config.model, 8, seed=0)
  assert isinstance(model.backbone, ToyTokens) and model.backbone.out_features == 12

  # The key reaches the backbone in training and decides what it drops; inference ignores it.
  images = jax.random.randint(jax.random.key(0), (4, 32, 32, 3), 0, 256).astype(jnp.uint8)
  feats = lambda key, train: np.asarray(model(images, train=train, key=key).global_feat)
  assert feats(jax.random.key(1), True).shape == (4, 12)  # the entry's pool: tokens -> [B, F]
  np.testing.assert_array_equal(feats(jax.random.key(1), True), feats(jax.random.key(1), True))
  assert not np.array_equal(feats(jax.random.key(1), True), feats(jax.random.key(2), True))

  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=2)
  graphdef, state = ts.create_train_state(model, tx, 8, loss_config=config.loss)
  mesh = ts.make_mesh()
  state = ts.replicate(state, mesh)
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  rng = np.random.default_rng(0)
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  before = np.asarray(state['params']['backbone']['patch']['kernel'])
  for _ in range(2):
    batch = (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             np.repeat(rng.permutation(8), 2).astype(np.int32))
    state, metrics = step(state, *jax.device_put(batch, sharding))
    assert np.isfinite(float(metrics['loss']))
  assert int(state['nonfinite_step']) == -1
  assert np.abs(np.asarray(state['params']['backbone']['patch']['kernel']) - before).max() > 0

  embed = ts.make_embed_fn(graphdef, mesh)
  embeddings = np.asarray(embed(state['params'], state['batch_stats'],
                                jax.device_put(batch[0], sharding)))
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)


def test_a_registered_backbone_converts_with_its_own_torch_names(toy_backbone):
  kernel = np.random.default_rng(0).normal(size=(16, 3, 4, 4)).astype(np.float32)  # OIHW
  tensors = {'encoder.patch.weight': kernel, 'encoder.patch.bias': np.zeros(16, np.float32)}
  # The family's default width (64) would not fit: the converter builds the default backbone.
  with pytest.raises(convert_weights.ConversionError, match='mis-shaped'):
    convert_weights.convert_state_dict(NAME, tensors)
  tensors = {'encoder.patch.weight': np.zeros((64, 3, 4, 4), np.float32),
             'encoder.patch.bias': np.zeros(64, np.float32)}
  converted, dropped = convert_weights.convert_state_dict(NAME, tensors)
  assert sorted(converted) == ['patch.bias', 'patch.kernel'] and dropped == []
  assert converted['patch.kernel'].shape == (4, 4, 3, 64)  # HWIO


def test_options_a_backbone_does_not_take_are_refused_by_name(toy_backbone):
  config = _config()
  config.model.drop_path_rate = 0.1
  with pytest.raises(ValueError, match=r'model.drop_path_rate applies only to the backbones '
                                       r'that take it \(efficientnet_b2, efficientnet_b4, '
                                       r'vit_t16, .*\), not toy_tokens'):
    configlib.validate_config(config, num_devices=4)
  config = _config()
  config.model.backbone, config.model.width = 'osnet_ain_x1_0', 32
  with pytest.raises(ValueError, match='model.width must be 64 for osnet_ain_x1_0, got 32'):
    configlib.validate_config(config, num_devices=4)
  config.model.width = 0
  with pytest.raises(ValueError, match='model.width must be positive, got 0'):
    configlib.validate_config(config, num_devices=4)
  with pytest.raises(ValueError, match="backbone 'toy_tokens' is already registered"):
    register(toy_backbone)
  with pytest.raises(ValueError, match='unknown options'):
    register(Backbone(name='toy_other', family='toy', build=ToyTokens, torch_name=_torch_name,
                      options=('depth',)))
