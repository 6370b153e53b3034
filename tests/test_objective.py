"""Loss terms that own their state: a toy stateful term registered here is initialised, trained,
guarded and checkpointed by the step exactly as the center loss is."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax import checkpointing, configlib, losses, objective, optim
from fashion_jax import train_step as ts
from fashion_jax.models import build_model

NUM_CLASSES = 8


class ProxyLoss(objective.LossTerm):
  """One learned proxy per class; pulls each normalised feature to its proxy. Own SGD step."""

  name = 'proxy'

  def __init__(self, lr):
    super().__init__(weight=0.5)
    self.lr = lr

  def init_state(self, key, num_classes, num_features):
    return {'proxies': jax.random.normal(jax.random.fold_in(key, 7), (num_classes, num_features))}

  def __call__(self, state, outputs, labels):
    f = outputs.global_feat / jnp.linalg.norm(outputs.global_feat, axis=1, keepdims=True)
    return jnp.mean(jnp.sum((f - state['proxies'][labels]) ** 2, axis=1))

  def update_state(self, state, grads):
    return {'proxies': state['proxies'] - self.lr * grads['proxies']}


@pytest.fixture
def proxy_metric():
  objective.register_metric('toy_proxy', lambda c: [
      objective.FeatureLoss('metric', lambda f, y: losses.batch_hard_triplet_loss(f, y, 0.3)),
      ProxyLoss(c.get('proxy_lr', 1.0))])
  yield
  objective.unregister_metric('toy_proxy')
  with pytest.raises(ValueError, match="unknown metric loss 'toy_proxy'"):
    objective.check_metric('toy_proxy')


def _config(proxy_lr=1.0):
  c = configlib.base_config()
  c.dataset.name = 'fashion_synth/tiny'
  c.model.backbone, c.model.width = 'resnet10_ibn_a', 8
  c.input.image_size = (32, 32)
  c.train.batch_size, c.train.k = 16, 2
  c.loss.metric = 'toy_proxy'
  c.loss.proxy_lr = proxy_lr
  c.optim.warmup_epochs = 0
  return c


def _train(config, steps=2):
  model = build_model(config.model, NUM_CLASSES, seed=0)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=10)
  graphdef, state = ts.create_train_state(model, tx, NUM_CLASSES, loss_config=config.loss)
  initial = jax.device_get(state)
  mesh = ts.make_mesh()
  state = ts.replicate(state, mesh)
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  rng = np.random.default_rng(0)
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  for _ in range(steps):
    batch = (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             np.repeat(rng.permutation(NUM_CLASSES), 2).astype(np.int32))
    state, metrics = step(state, *jax.device_put(batch, sharding))
  return initial, jax.device_get(state), jax.device_get(metrics)


def test_a_registered_stateful_loss_is_initialised_trained_and_checkpointed(proxy_metric,
                                                                          tmp_path):
  config = _config()
  configlib.validate_config(config, num_devices=4)
  initial, state, metrics = _train(config)
  assert sorted(state['loss_state']) == ['center', 'proxy']
  assert state['loss_state']['proxy']['proxies'].shape == (NUM_CLASSES, 64)
  assert set(metrics) >= {'loss', 'id_loss', 'metric_loss', 'proxy_loss', 'center_loss'}
  # The weighted total is the sum of the terms, the proxy's weight 0.5 included.
  expected = (metrics['id_loss'] + metrics['metric_loss'] + 0.5 * metrics['proxy_loss']
              + config.loss.center_weight * metrics['center_loss'])
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
  moved = np.abs(state['loss_state']['proxy']['proxies']
                 - initial['loss_state']['proxy']['proxies']).max()
  assert int(state['nonfinite_step']) == -1 and moved > 0

  checkpointer = checkpointing.Checkpointer(str(tmp_path / 'ckpt'))
  checkpointer.save(2, state)
  checkpointer.wait()
  restored = checkpointer.restore(jax.device_get(initial))
  np.testing.assert_array_equal(restored['loss_state']['proxy']['proxies'],
                                state['loss_state']['proxy']['proxies'])
  checkpointer.close()


def test_the_guard_covers_a_stateful_loss(proxy_metric):
  # An infinite learning rate makes the proxies' update non-finite: the step is not applied.
  initial, state, _ = _train(_config(proxy_lr=float('inf')), steps=1)
  assert int(state['nonfinite_step']) == 1 and int(state['step']) == 0
  np.testing.assert_array_equal(state['loss_state']['proxy']['proxies'],
                                initial['loss_state']['proxy']['proxies'])


def test_terms_and_their_metric_names_for_the_shipped_losses():
  for metric in ('triplet', 'quadruplet', 'none'):
    config = configlib.base_config().loss
    config.metric = metric
    terms = objective.Objective(config).terms
    assert [t.name for t in terms] == ['id', 'metric', 'center']
    assert [t.weight for t in terms] == [1.0, 1.0, config.center_weight]
  with pytest.raises(ValueError, match="unknown metric loss 'contrastive'; choose one of "
                                       "triplet, quadruplet, none, centroid_triplet"):
    objective.check_metric('contrastive')
  with pytest.raises(ValueError, match="'triplet' is already registered"):
    objective.register_metric('triplet', lambda c: [])


def test_a_checkpoint_with_the_centers_at_the_top_level_restores(tmp_path):
  config = _config()
  config.loss.metric = 'triplet'
  model = build_model(config.model, NUM_CLASSES, seed=0)
  tx, _ = optim.make_optimizer(config.optim, steps_per_epoch=10)
  _, state = ts.create_train_state(model, tx, NUM_CLASSES, loss_config=config.loss)
  state = jax.device_get(state)
  old = {k: v for k, v in state.items() if k != 'loss_state'}
  old['centers'] = state['loss_state']['center']['centers'] + 1.0
  checkpointer = checkpointing.Checkpointer(str(tmp_path / 'ckpt'))
  checkpointer.save(5, old)
  checkpointer.wait()
  restored = checkpointer.restore(state)
  assert sorted(restored) == sorted(state)
  np.testing.assert_array_equal(restored['loss_state']['center']['centers'], old['centers'])
  np.testing.assert_array_equal(restored['params']['classifier']['kernel'],
                                state['params']['classifier']['kernel'])
  checkpointer.close()
