"""The data-parallel training step: pmap's programming model written with `jax.shard_map`.

Each device holds P/n whole identities of the P x K batch, so batch-hard mining sees complete
identities; gradients are averaged with `pmean`. No TensorFlow here.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax import augment
from fashion_jax.objective import Objective

DATA_AXIS = 'data'
TrainState = dict[str, Any]  # step, params, batch_stats, opt_state, loss_state, nonfinite_step


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, num_classes: int,
                       *, loss_config, seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
  """Splits `model` once into its static graph and the pure-array state the step updates.

  `loss_state` holds the state of the loss terms that have one (`objective.py`), by term name.
  """
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  # Plain arrays, not Variable objects: the state crosses jit/grad/shard_map boundaries.
  params, batch_stats = nnx.as_pure((params, batch_stats))
  state = {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'batch_stats': batch_stats,
      'opt_state': tx.init(params),
      'loss_state': Objective(loss_config).init_state(
          jax.random.key(seed), num_classes, model.backbone.out_features),
      # The first step whose loss, gradients or update were not finite; -1 while all were.
      'nonfinite_step': jnp.full((), -1, jnp.int32),
  }
  return graphdef, state


def loss_and_grads(graphdef: nnx.GraphDef, state: TrainState, images: jax.Array,
                   labels: jax.Array, loss_config, key: jax.Array | None = None):
  """Loss of one (per-device) batch and its gradients w.r.t. parameters and the loss state.

  `key` reaches the backbone's stochastic layers (e.g. model.drop_path_rate > 0). Returns
  (grads, loss_state_grads, new_batch_stats, metrics). This is the whole per-device computation;
  the step only adds the cross-device averaging and the updates.
  """
  objective = Objective(loss_config)

  def loss_fn(params, loss_state, batch_stats):
    model = nnx.merge(graphdef, params, batch_stats)
    out = model(images, train=True, key=key)
    total, metrics = objective(loss_state, out, labels)
    metrics = {'loss': total, **metrics,
               'accuracy': jnp.mean(jnp.argmax(objective.identity.class_scores(out), -1)
                                    == labels)}
    return total, (metrics, nnx.as_pure(nnx.state(model, nnx.BatchStat)))

  grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
  (grads, loss_state_grads), (metrics, batch_stats) = grad_fn(
      state['params'], state['loss_state'], state['batch_stats'])
  return grads, loss_state_grads, batch_stats, metrics


def apply_gradients(state: TrainState, grads, loss_state_grads, batch_stats,
                    tx: optax.GradientTransformation, loss_config, *,
                    loss_state=None) -> TrainState:
  """The next state. `loss_state`: the loss terms' updated state, if already computed from
  `loss_state_grads`."""
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  if loss_state is None:
    loss_state = Objective(loss_config).update_state(state['loss_state'], loss_state_grads)
  return {
      **state,
      'step': state['step'] + 1,
      'params': optax.apply_updates(state['params'], updates),
      'batch_stats': batch_stats,
      'opt_state': opt_state,
      'loss_state': loss_state,
  }


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def guarded_apply(state: TrainState, grads, loss_state_grads, batch_stats,
                  tx: optax.GradientTransformation, loss_config, loss: jax.Array) -> TrainState:
  """`apply_gradients`, unless what it is computed from is not finite; a non-finite result
  is recorded.

  A non-finite loss, gradient, BatchNorm statistic or loss-term state leaves the state as it
  was and records the step, so a NaN never reaches the parameters, and so never a checkpoint;
  the host stops training when it next looks. An update that is itself not finite from finite
  inputs (gradients large enough to overflow the optimiser's moments, an infinite learning
  rate) cannot be undone: its step is recorded too, and the host neither saves nor evaluates
  that state (`train.py`).

  The parameters' and optimiser's update runs inside one conditional, after the check: it then
  writes the state's buffers in place. Checking the updated parameters instead, and keeping
  the old ones, made XLA copy the whole new state into them on every step (672 copies for
  ResNet50-IBN-A). The updated arrays are checked inside the same branch, beside the update
  that writes them. One conditional rather than one select per array: XLA's CPU fusion pass
  takes time far worse than linear in the number of selects sharing one predicate.
  """
  loss_state = Objective(loss_config).update_state(state['loss_state'], loss_state_grads)
  finite = _all_finite((loss, grads, loss_state_grads, batch_stats, loss_state))

  def update():
    new = apply_gradients(state, grads, loss_state_grads, batch_stats, tx, loss_config,
                          loss_state=loss_state)
    return new, _all_finite((new['params'], new['opt_state']))

  def keep():
    return state, jnp.ones((), bool)

  kept, updated_finite = jax.lax.cond(finite, update, keep)
  bad = ~(finite & updated_finite)
  return {
      **kept,
      'nonfinite_step': jnp.where((state['nonfinite_step'] < 0) & bad, state['step'] + 1,
                                  state['nonfinite_step']),
  }


def step_key(seed: int, step: jax.Array, device: jax.Array) -> jax.Array:
  """The random key of one device's part of one step: a function of (seed, step, device) only,
  so a resumed run draws what the uninterrupted run drew, and devices draw independently."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), device)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh: Mesh,
                    loss_config, schedule: optax.Schedule, *, seed: int = 0,
                    augmentation: augment.Augmentation | None = None):
  """Returns step(state, images, labels) -> (state, metrics), jitted, with the state donated.

  `state` is replicated on `mesh`; `images` [B, H, W, 3] uint8 and `labels` [B] are sharded
  along the batch, identity-contiguous (each identity's K images adjacent). `seed` seeds the
  per-step random keys (stochastic depth; unused by models without it). With `augmentation`
  the images arrive resized but not augmented, and the step augments them first, each from
  the key of (seed, step, its index in the global batch) (`augment.example_keys`).
  """

  def per_device(state, images, labels):
    if augmentation is not None:
      local = images.shape[0]
      examples = jax.lax.axis_index(DATA_AXIS) * local + jnp.arange(local)
      keys = augment.example_keys(seed, state['step'], examples)
      images = augment.augment_batch(images, keys, augmentation)
    # Differentiating a replicated value inside shard_map sums its gradient over devices
    # implicitly; marking the state per-device keeps pmap's semantics (local gradients,
    # averaged explicitly below).
    local_state = jax.lax.pcast(state, DATA_AXIS, to='varying')
    key = step_key(seed, state['step'], jax.lax.axis_index(DATA_AXIS))
    grads, loss_state_grads, batch_stats, metrics = loss_and_grads(
        graphdef, local_state, images, labels, loss_config, key)
    grads, loss_state_grads = jax.lax.pmean((grads, loss_state_grads), DATA_AXIS)
    # Per-device (or synchronised) statistics are averaged so the replicated state is consistent.
    batch_stats = jax.lax.pmean(batch_stats, DATA_AXIS)
    metrics = jax.lax.pmean(metrics, DATA_AXIS)
    metrics['learning_rate'] = schedule(state['step'])
    return guarded_apply(state, grads, loss_state_grads, batch_stats, tx, loss_config,
                         metrics['loss']), metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                          out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=(0,))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def make_embed_fn(graphdef: nnx.GraphDef, mesh: Mesh, *, flip: bool = False):
  """Returns embed(params, batch_stats, images [B, H, W, 3]) -> [B, F] unit vectors, jitted;
  with `flip`, the test-time flip's (ReIDModel.embed).

  Images are sharded along the batch over `mesh`; the model runs in inference mode, so the
  compiler partitions it without collectives.
  """
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def embed(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    return model.embed(images, flip=flip)

  return embed
