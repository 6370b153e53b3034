"""The strong baseline's optimiser: Adam with coupled L2 weight decay and a warmup multi-step schedule.

Coupled decay (PyTorch `Adam(weight_decay=...)`) adds `wd * param` to the gradient before Adam's
moments, which is not AdamW's decoupled decay.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import optax


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


def make_optimizer(optim_config, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
  schedule = warmup_multistep_schedule(
      optim_config.base_lr, steps_per_epoch, warmup_epochs=optim_config.warmup_epochs,
      warmup_factor=optim_config.warmup_factor, milestones=optim_config.milestones,
      gamma=optim_config.gamma)
  tx = optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale_by_learning_rate(schedule),
  )
  return tx, schedule
