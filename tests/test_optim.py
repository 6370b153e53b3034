"""Tests for the learning-rate schedule and the coupled-L2 Adam of the strong baseline."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fashion_jax import optim


def _optim_config(**overrides):
  c = ml_collections.ConfigDict(dict(base_lr=3.5e-4, weight_decay=5e-4, warmup_epochs=10,
                                     warmup_factor=0.01, milestones=(40, 70), gamma=0.1))
  c.update(overrides)
  return c


@pytest.mark.parametrize('epoch,expected_factor', [
    (0, 0.01),                       # warmup starts at 0.01 x base
    (5, 0.01 * 0.5 + 0.5),           # linear in the epoch
    (9, 0.01 * 0.1 + 0.9),
    (10, 1.0), (39, 1.0),
    (40, 0.1), (69, 0.1),            # x0.1 at epoch 40
    (70, 0.01), (119, 0.01),         # and again at 70
])
def test_warmup_multistep_schedule(epoch, expected_factor):
  steps_per_epoch = 7
  _, schedule = optim.make_optimizer(_optim_config(), steps_per_epoch)
  for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):
    np.testing.assert_allclose(schedule(step), 3.5e-4 * expected_factor, rtol=1e-6)


def _torch_adam_reference(param, grads, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
  """PyTorch Adam(weight_decay=wd): L2 added to the gradient before the moments."""
  m = np.zeros_like(param)
  v = np.zeros_like(param)
  for t, g in enumerate(grads, start=1):
    g = g + weight_decay * param
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    param = param - lr * m_hat / (np.sqrt(v_hat) + eps)
  return param


def test_adam_with_coupled_weight_decay_matches_reference():
  rng = np.random.default_rng(0)
  param = rng.normal(size=(5,)).astype(np.float64)
  grads = [rng.normal(size=(5,)) for _ in range(4)]
  # A large decay makes coupled and decoupled (AdamW) clearly different.
  config = _optim_config(weight_decay=0.5, warmup_epochs=0, milestones=(100,), base_lr=0.1)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  p = jnp.asarray(param, jnp.float32)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
    p = optax.apply_updates(p, updates)
  expected = _torch_adam_reference(param, grads, lr=0.1, weight_decay=0.5)
  np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)
  adamw = optax.adamw(0.1, weight_decay=0.5)
  q, s = jnp.asarray(param, jnp.float32), None
  s = adamw.init(q)
  for g in grads:
    u, s = adamw.update(jnp.asarray(g, jnp.float32), s, q)
    q = optax.apply_updates(q, u)
  assert not np.allclose(q, expected, atol=1e-3)


def test_schedule_is_jittable():
  _, schedule = optim.make_optimizer(_optim_config(), steps_per_epoch=3)
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(45 * 3)), 3.5e-5, rtol=1e-6)
