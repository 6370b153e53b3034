"""Stochastic depth from the config to the training step: model.drop_path_rate and step keys."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fashion_jax import configlib
from fashion_jax import train_step as ts
from fashion_jax.models import build_model


def _model_config(backbone: str, rate: float):
  config = configlib.base_config().model
  config.backbone, config.drop_path_rate = backbone, rate
  return config


@pytest.mark.parametrize('backbone, rate, problem', [
    ('resnet18_ibn_b', 0.2, 'take it (efficientnet_b2, efficientnet_b4, vit_t16, '),
    ('efficientnet_b2', 1.0, 'must be in [0, 1), got 1.0'),
])
def test_bad_drop_path_rates_are_refused_by_name(backbone, rate, problem):
  with pytest.raises(ValueError, match=re.escape(problem)):
    build_model(_model_config(backbone, rate), num_classes=4)


def test_the_config_rate_reaches_the_backbone_and_the_key_decides_the_drops():
  model = build_model(_model_config('efficientnet_b2', 0.5), num_classes=4)
  images = jax.random.randint(jax.random.key(0), (8, 32, 32, 3), 0, 256).astype(jnp.uint8)
  # Jitted: one compilation per distinct call instead of one per operation.
  call = nnx.jit(lambda model, images, key, train: model(images, train=train, key=key).global_feat,
                 static_argnames='train')
  first = np.asarray(call(model, images, jax.random.key(1), train=True))
  again = np.asarray(call(model, images, jax.random.key(1), train=True))
  other = np.asarray(call(model, images, jax.random.key(2), train=True))
  np.testing.assert_array_equal(first, again)  # the drops are a function of the key alone
  assert np.abs(first - other).max() > 1e-3    # another key drops other blocks
  # Without a key, training stops at tracing with the reason (inference needs none: see
  # test_efficientnet.py).
  with pytest.raises(ValueError, match='needs a random key'):
    call(model, images, None, train=True)


def test_step_keys_depend_on_seed_step_and_device_only():
  keys = {(seed, step, device): jax.random.key_data(ts.step_key(seed, jnp.int32(step),
                                                                jnp.int32(device))).tobytes()
          for seed in (0, 1) for step in (0, 1, 2) for device in (0, 1, 3)}
  assert len(set(keys.values())) == len(keys)  # all distinct
  assert jax.random.key_data(ts.step_key(1, jnp.int32(2), jnp.int32(3))).tobytes() == keys[1, 2, 3]
