"""The optimisers, by `optim.optimizer` and `optim.schedule`: the strong baseline's Adam with
coupled L2 weight decay and a warmup multi-step schedule (the defaults), and the ViT fine-tuning
recipe: AdamW, layer-wise learning-rate decay, warmup then cosine.

Coupled decay (PyTorch `Adam(weight_decay=...)`) adds `wd * param` to the gradient before Adam's
moments, which is not AdamW's decoupled decay.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adam', 'adamw')
SCHEDULES = ('multistep', 'cosine')
# Parameters of more than one dimension that AdamW does not decay (timm's no_weight_decay()):
# learned positions and tokens, like the norms and biases, are not weights of a mapping.
NO_DECAY = ('pos_embed', 'cls_token', 'reg_token')
# Backbone parameters before the first block, in layer 0 of the layer-wise decay.
EMBEDDINGS = ('patch_embed', 'cls_token', 'reg_token', 'pos_embed', 'norm_pre')


def warmup_multistep_schedule(base_lr: float, steps_per_epoch: int, *, warmup_epochs: int,
                              warmup_factor: float, milestones: Sequence[int],
                              gamma: float) -> optax.Schedule:
  """Per-epoch learning rate as the ReID strong baseline steps it (once per epoch).

  Epoch e < warmup_epochs: base * (warmup_factor + (1 - warmup_factor) * e / warmup_epochs);
  afterwards base * gamma ** (number of milestones <= e).
  """
  milestones = jnp.asarray(sorted(milestones), jnp.int32)

  def schedule(step):
    epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
    alpha = epoch.astype(jnp.float32) / max(warmup_epochs, 1)
    warmup = jnp.where(epoch < warmup_epochs, warmup_factor * (1 - alpha) + alpha, 1.0)
    decays = jnp.sum(epoch >= milestones)
    return base_lr * warmup * gamma ** decays.astype(jnp.float32)

  return schedule


def warmup_cosine_schedule(base_lr: float, steps_per_epoch: int, *, warmup_epochs: int,
                           warmup_factor: float, cosine_epochs: int,
                           final_lr_factor: float) -> optax.Schedule:
  """Per-step learning rate: linear from base * warmup_factor to base over the warmup epochs,
  then half a cosine down to base * final_lr_factor at the end of epoch `cosine_epochs`, and
  constant after it."""
  warmup = warmup_epochs * steps_per_epoch
  decay = max(cosine_epochs * steps_per_epoch - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = warmup_factor + (1 - warmup_factor) * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
    cosine = final_lr_factor + (1 - final_lr_factor) * 0.5 * (1 + jnp.cos(math.pi * progress))
    return base_lr * jnp.where(step < warmup, ramp, cosine)

  return schedule


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
               for key in path)


def decay_mask(params):
  """True where AdamW decays: weights of two or more dimensions, but not NO_DECAY's."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and _names(path)[-1] not in NO_DECAY, params)


def layer_scales(params, decay: float):
  """Each parameter's learning-rate factor decay ** (L + 1 - layer) (BEiT, timm): layer 0 the
  backbone's embeddings (EMBEDDINGS), i + 1 its `blocks.i`, L + 1 the rest (final norm, ReID
  head), L the number of blocks. ValueError when the backbone has no `blocks.N`."""
  paths = [_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  blocks = [int(p[2]) for p in paths if p[:2] == ('backbone', 'blocks')]
  if not blocks:
    raise ValueError('optim.layer_decay needs a backbone built of blocks.N (the ViTs)')
  depth = max(blocks) + 1

  def layer(names):
    if names[0] != 'backbone':
      return depth + 1
    if names[1] == 'blocks':
      return int(names[2]) + 1
    return 0 if names[1] in EMBEDDINGS else depth + 1

  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay ** (depth + 1 - layer(_names(path))), params)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its `layer_scales` factor (constants of the tree's paths)."""

  def init(params):
    layer_scales(params, decay)  # refuses a backbone without blocks before training starts
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scales = layer_scales(updates, decay)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(init, update)


def make_schedule(optim_config, steps_per_epoch: int) -> optax.Schedule:
  common = dict(warmup_epochs=optim_config.warmup_epochs,
                warmup_factor=optim_config.warmup_factor)
  if optim_config.get('schedule', 'multistep') == 'cosine':
    return warmup_cosine_schedule(optim_config.base_lr, steps_per_epoch,
                                  cosine_epochs=optim_config.cosine_epochs,
                                  final_lr_factor=optim_config.final_lr_factor, **common)
  return warmup_multistep_schedule(optim_config.base_lr, steps_per_epoch,
                                   milestones=optim_config.milestones,
                                   gamma=optim_config.gamma, **common)


def make_optimizer(optim_config, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
  """`optim.optimizer` 'adam': coupled L2 on every parameter (the strong baseline); 'adamw':
  decoupled decay on `decay_mask`'s weights, scaled by the learning rate. `optim.layer_decay`
  below 1 scales each update (decay included) by `layer_scales`."""
  schedule = make_schedule(optim_config, steps_per_epoch)
  layer_decay = optim_config.get('layer_decay', 1.0)
  per_layer = [scale_by_layer_decay(layer_decay)] if layer_decay != 1.0 else []
  if optim_config.get('optimizer', 'adam') == 'adamw':
    steps = [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
             optax.add_decayed_weights(optim_config.weight_decay, mask=decay_mask)]
  else:
    steps = [optax.add_decayed_weights(optim_config.weight_decay),
             optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)]
  return optax.chain(*steps, *per_layer, optax.scale_by_learning_rate(schedule)), schedule
