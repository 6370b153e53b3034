"""The data-parallel step on 4 simulated CPU devices against per-shard work on one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax import configlib, optim
from fashion_jax import train_step as ts
from fashion_jax.models import build_model

NUM_CLASSES = 8


def _config(metric='triplet', sync=False):
  c = configlib.base_config()
  c.model.backbone = 'resnet10_ibn_a'
  c.model.width = 8
  c.model.sync_batch_norm = sync
  c.loss.metric = metric
  c.optim.warmup_epochs = 0
  c.optim.base_lr = 1e-3
  return c


def _batch(k=2):
  # 8 identities x K, identity-contiguous: each of 4 devices holds 2 whole identities.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_CLASSES * k, 32, 32, 3), dtype=np.uint8)
  labels = np.repeat(rng.permutation(NUM_CLASSES), k).astype(np.int32)
  return images, labels


def _fresh_state(config):
  model = build_model(config.model, NUM_CLASSES, seed=0)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=10)
  graphdef, state = ts.create_train_state(model, tx, NUM_CLASSES, loss_config=config.loss, seed=0)
  return graphdef, state, tx, schedule


# K = 4 for the centroid triplet loss: with K = 2 each of its rounds is the whole shard, and the
# loss equals the plain triplet loss.
@pytest.mark.parametrize('metric, k', [('triplet', 2), ('quadruplet', 2),
                                       ('centroid_triplet', 4)])
def test_sharded_step_equals_averaged_per_shard_gradients(metric, k):
  assert jax.device_count() == 4, 'tests/conftest.py sets 4 simulated CPU devices'
  config = _config(metric)
  images, labels = _batch(k)
  graphdef, state, tx, schedule = _fresh_state(config)

  # Reference: the four shards one after another on one device, gradients averaged by hand.
  shard = len(labels) // 4
  shards = [(images[i * shard:(i + 1) * shard], labels[i * shard:(i + 1) * shard])
            for i in range(4)]
  per_shard = jax.jit(lambda s, x, y: ts.loss_and_grads(graphdef, s, x, y, config.loss))
  results = [per_shard(state, jnp.asarray(x), jnp.asarray(y)) for x, y in shards]
  mean = lambda trees: jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *trees)
  expected = ts.apply_gradients(state, mean([r[0] for r in results]),
                                mean([r[1] for r in results]), mean([r[2] for r in results]),
                                tx, config.loss)
  expected_loss = np.mean([float(r[3]['loss']) for r in results])
  if metric == 'centroid_triplet':
    # Each shard's centroids are its own; a nonzero term shows the step includes it.
    assert min(float(r[3]['centroid_loss']) for r in results) > 0

  params_before = state['params']
  mesh = ts.make_mesh()
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  # A host copy goes in: the step donates (deletes) its input state.
  new_state, metrics = step(ts.replicate(jax.device_get(state), mesh),
                            jax.device_put(images, sharding), jax.device_put(labels, sharding))

  np.testing.assert_allclose(metrics['loss'], expected_loss, rtol=1e-5)
  assert int(new_state['step']) == 1
  assert int(new_state['nonfinite_step']) == -1
  flat_new = dict(jax.tree_util.tree_leaves_with_path(new_state))
  for path, value in jax.tree_util.tree_leaves_with_path(expected):
    np.testing.assert_allclose(flat_new[path], value, atol=1e-5, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # The update must have moved the parameters, or the comparison above proves nothing.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state['params'],
                       params_before)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_synchronised_batch_norm_uses_global_statistics():
  images, labels = _batch()
  config = _config(sync=True)
  graphdef, state, tx, schedule = _fresh_state(config)
  mesh = ts.make_mesh()
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  new_state, _ = step(ts.replicate(state, mesh), jax.device_put(images, sharding),
                      jax.device_put(labels, sharding))
  # Synchronised statistics equal those of the whole batch on one device.
  local = build_model(_config().model, NUM_CLASSES, seed=0)
  local(jnp.asarray(images), train=True)
  expected = nnx.as_pure(nnx.state(local, nnx.BatchStat))
  for path, value in jax.tree_util.tree_leaves_with_path(new_state['batch_stats']):
    np.testing.assert_allclose(value, dict(jax.tree_util.tree_leaves_with_path(expected))[path],
                               atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_center_update_is_independent_of_the_loss_weight():
  images, labels = _batch()
  centers_after = []
  for beta in (5e-4, 5e-2):
    config = _config()
    config.loss.center_weight = beta
    graphdef, state, tx, _ = _fresh_state(config)
    x, y = jnp.asarray(images[:4]), jnp.asarray(labels[:4])
    grads, center_grads, stats, _ = ts.loss_and_grads(graphdef, state, x, y, config.loss)
    new = ts.apply_gradients(state, grads, center_grads, stats, tx, config.loss)
    centers_after.append(np.asarray(new['loss_state']['center']['centers']))
    # SGD with lr 0.5 on the center loss alone: c -= 0.5 * d(center_loss)/dc = 0.5 * 2 (c - f) / B.
    model = nnx.merge(graphdef, state['params'], state['batch_stats'])
    feats = model(x, train=True).global_feat
    c = np.asarray(state['loss_state']['center']['centers'])
    expected = c.copy()
    for f, label in zip(np.asarray(feats), np.asarray(y)):
      expected[label] -= 0.5 * 2.0 * (c[label] - f) / len(y)
    np.testing.assert_allclose(centers_after[-1], expected, atol=1e-4)
  np.testing.assert_allclose(centers_after[0], centers_after[1], atol=1e-4)


def test_nonfinite_step_keeps_the_state_and_records_the_step():
  images, labels = _batch()
  config = _config()
  graphdef, state, tx, schedule = _fresh_state(config)
  kernel = state['params']['classifier']['kernel']
  state['params']['classifier']['kernel'] = kernel.at[0, 0].set(jnp.inf)
  before = jax.device_get(state)
  mesh = ts.make_mesh()
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  new_state, metrics = step(ts.replicate(state, mesh), jax.device_put(images, sharding),
                            jax.device_put(labels, sharding))
  assert not np.isfinite(metrics['loss'])
  assert int(new_state['nonfinite_step']) == 1
  assert int(new_state['step']) == 0
  for a, b in zip(jax.tree.leaves(new_state['params']), jax.tree.leaves(before['params'])):
    np.testing.assert_array_equal(a, b)


# Finite loss and gradients, but an update that is not finite: an infinite learning rate makes
# the parameters so; gradients scaled past float32's range inside the optimiser overflow Adam's
# second moment and leave the parameters finite (their update is then 0). Neither can be undone
# (the step writes the state in place), but both are recorded, so the host stops and never saves
# or evaluates that state.
@pytest.mark.parametrize('tx, parameters_finite', [
    (optax.adam(float('inf')), False),
    (optax.chain(optax.scale(1e20), optax.adam(1e-3)), True)], ids=['parameters', 'moments'])
def test_an_update_that_is_not_finite_is_recorded(tx, parameters_finite):
  images, labels = _batch()
  config = _config()
  model = build_model(config.model, NUM_CLASSES, seed=0)
  graphdef, state = ts.create_train_state(model, tx, NUM_CLASSES, loss_config=config.loss)
  mesh = ts.make_mesh()
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, lambda _: 0.0)
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  new_state, metrics = step(ts.replicate(state, mesh), jax.device_put(images, sharding),
                            jax.device_put(labels, sharding))
  assert np.isfinite(metrics['loss'])
  assert int(new_state['nonfinite_step']) == 1
  finite = lambda tree: all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))
  assert finite(new_state['params']) == parameters_finite
  assert finite(new_state['opt_state']) != parameters_finite


def test_the_step_updates_the_state_in_place():
  # Checking the new parameters and then keeping the old ones made XLA copy every parameter and
  # optimiser array once per step; the update now runs after the check, into the donated state.
  images, labels = _batch()
  config = _config()
  graphdef, state, tx, schedule = _fresh_state(config)
  mesh = ts.make_mesh()
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  hlo = step.lower(ts.replicate(state, mesh), jax.device_put(images, sharding),
                   jax.device_put(labels, sharding)).compile().as_text()
  # Copies that run as operations of their own: those outside fusions' bodies.
  fused = set(re.findall(r'\bfusion\(.*?calls=%?([\w.\-]+)', hlo))
  copies, computation = 0, None
  for line in hlo.splitlines():
    if line and not line[0].isspace():
      computation = line.split()[0].lstrip('%') if line.rstrip().endswith('{') else None
    elif computation not in fused and re.search(r'\scopy\(', line):
      copies += 1
  # What may still be copied: the values the step passes through unchanged into its conditional
  # (the BatchNorm statistics, the loss terms' state) and a few scalars; the old guard copied
  # every parameter and both of Adam's moments of each (164 copies here).
  passed_through = len(jax.tree.leaves((state['batch_stats'], state['loss_state'])))
  assert copies <= passed_through + 8 < len(jax.tree.leaves(state['params'])) * 3, copies


def test_classification_only_leaves_metric_and_centers_out():
  images, labels = _batch()
  config = _config()
  config.loss.metric = 'none'
  config.loss.center_weight = 0.0
  graphdef, state, tx, _ = _fresh_state(config)
  x, y = jnp.asarray(images[:4]), jnp.asarray(labels[:4])
  grads, center_grads, stats, metrics = ts.loss_and_grads(graphdef, state, x, y, config.loss)
  assert float(metrics['metric_loss']) == 0.0
  np.testing.assert_allclose(metrics['loss'], metrics['id_loss'], rtol=1e-6)
  new = ts.apply_gradients(state, grads, center_grads, stats, tx, config.loss)
  np.testing.assert_array_equal(new['loss_state']['center']['centers'],
                                state['loss_state']['center']['centers'])
