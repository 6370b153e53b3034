"""EfficientNet pieces the PyTorch comparison cannot see: channel rounding and stochastic depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fashion_jax.models.efficientnet import MBConv, drop_path, make_divisible, stage_settings


def test_channels_and_depths_follow_the_scaling_rule():
  # B2: width 1.1 -> 32*1.1 = 35.2 rounds to 32; 320*1.1 = 352; blocks ceil(n * 1.2).
  assert [s[4] for s in stage_settings('b2')] == [16, 24, 48, 88, 120, 208, 352]
  assert [s[5] for s in stage_settings('b2')] == [2, 3, 3, 4, 4, 5, 2]
  assert [s[5] for s in stage_settings('b4')] == [2, 4, 4, 6, 6, 8, 2]
  assert [s[2] for s in stage_settings('b4', last_stride=1)] == [1, 2, 2, 2, 1, 1, 1]
  assert make_divisible(35.2) == 32 and make_divisible(44.8) == 48 and make_divisible(3.0) == 8
  assert make_divisible(20.0) == 24  # 16 would be more than 10% below 20


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
  x = jnp.ones((4000, 2, 2, 3))
  y = np.asarray(drop_path(x, 0.25, jax.random.key(0)))
  per_sample = y.reshape(4000, -1)
  assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
  assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}
  assert abs(np.mean(per_sample[:, 0] == 0) - 0.25) < 0.03
  assert abs(y.mean() - 1.0) < 0.05


def test_mbconv_stochastic_depth_drops_whole_branches():
  block = MBConv(8, 8, expand=6, kernel=3, stride=1, drop_rate=0.5, rngs=nnx.Rngs(0),
                 dtype=jnp.float32, axis_name=None)
  x = jax.random.normal(jax.random.key(1), (64, 4, 4, 8))
  # Jitted: one compilation per call instead of one per operation.
  call = nnx.jit(lambda block, x, key, train: block(x, train=train, key=key),
                 static_argnames='train')
  out = np.asarray(call(block, x, jax.random.key(2), train=True))
  dropped = np.all(out == np.asarray(x), axis=(1, 2, 3))  # the branch was skipped
  assert 10 < dropped.sum() < 54
  with pytest.raises(ValueError, match='stochastic depth .* needs a random key'):
    call(block, x, None, train=True)
