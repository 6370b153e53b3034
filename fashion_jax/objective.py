"""The training objective: a weighted sum of loss terms, some with state of their own.

Each term maps the model's outputs and the labels to a scalar (docs/method.md section 3). A term
with state (the center loss's centers) declares how to initialise it and how to update it from
its gradient, so the training step, its non-finite guard and the checkpoint treat every term's
state alike: `state['loss_state'][term.name]`.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fashion_jax import losses
from fashion_jax.models.reid import ReIDOutput

LossState = dict[str, jax.Array]


class LossTerm:
  """One weighted term of the objective. Subclasses set `name` and implement `__call__`.

  `name` keys the term's value in the step's metrics (`<name>_loss`) and its state in the train
  state. A term without state keeps the defaults below.
  """

  name: str = ''

  def __init__(self, weight: float = 1.0):
    self.weight = weight

  def init_state(self, key: jax.Array, num_classes: int, num_features: int) -> LossState:
    """The term's initial state (arrays); {} for a stateless term.

    Every term gets the same `key` (the run's seed): the center loss draws from it directly, any
    other term that draws folds in a number of its own first (`jax.random.fold_in(key, n)`).
    """
    del key, num_classes, num_features
    return {}

  def __call__(self, state: LossState, outputs: ReIDOutput, labels: jax.Array) -> jax.Array:
    """Scalar float32 loss of a (per-device) batch; differentiable in `state`."""
    raise NotImplementedError

  def update_state(self, state: LossState, grads: LossState) -> LossState:
    """The state after one step, given its gradient of the weighted total loss."""
    del grads
    return state


class IdentityLoss(LossTerm):
  """Label-smoothed cross-entropy on the classifier's logits (after the BNNeck)."""

  name = 'id'

  def __init__(self, epsilon: float, weight: float = 1.0):
    super().__init__(weight)
    self.epsilon = epsilon

  def class_scores(self, outputs: ReIDOutput) -> jax.Array:
    """[B, C]: the classifier's prediction is their argmax (the training accuracy's)."""
    return outputs.logits

  def __call__(self, state, outputs, labels):
    return losses.cross_entropy_label_smoothing(outputs.logits, labels, self.epsilon)


class MarginIdentityLoss(IdentityLoss):
  """Label-smoothed cross-entropy on the cosine classifier's scaled cosines, the true class's
  lowered by a margin: CosFace or ArcFace (docs/method.md section 10)."""

  def __init__(self, margin_logits: Callable[..., jax.Array], scale: float, margin: float,
               epsilon: float, weight: float = 1.0):
    super().__init__(epsilon, weight)
    self.margin_logits, self.scale, self.margin = margin_logits, scale, margin

  def class_scores(self, outputs):
    return outputs.cosines

  def __call__(self, state, outputs, labels):
    logits = self.margin_logits(outputs.cosines, labels, self.scale, self.margin)
    return losses.cross_entropy_label_smoothing(logits, labels, self.epsilon)


# loss.identity -> the classification term: the paper's linear classifier, or the cosine
# classifier on the same weights with CosFace's or ArcFace's margin. Each keeps the name 'id'.
IDENTITY: dict[str, Callable[..., IdentityLoss]] = {
    'cross_entropy': lambda c: IdentityLoss(c.label_smoothing, c.id_weight),
    'cosface': lambda c: MarginIdentityLoss(losses.cosface_logits, c.id_scale, c.cosface_margin,
                                            c.label_smoothing, c.id_weight),
    'arcface': lambda c: MarginIdentityLoss(losses.arcface_logits, c.id_scale, c.arcface_margin,
                                            c.label_smoothing, c.id_weight),
}


class FeatureLoss(LossTerm):
  """A stateless metric-learning loss on the global feature f_t (before the BNNeck)."""

  def __init__(self, name: str, fn: Callable[[jax.Array, jax.Array], jax.Array],
               weight: float = 1.0):
    super().__init__(weight)
    self.name = name
    self.fn = fn

  def __call__(self, state, outputs, labels):
    return self.fn(outputs.global_feat, labels)


class CenterLoss(LossTerm):
  """Center loss on f_t; the centers are its state, moved by their own SGD.

  The centers' gradient of the total loss carries the loss weight; dividing it out makes their
  step independent of the weight, as the strong baseline does (docs/method.md section 3). A zero
  weight switches the term off: it is still reported, and the centers stay where they are.
  """

  name = 'center'

  def __init__(self, weight: float, lr: float):
    super().__init__(weight)
    self.lr = lr

  def init_state(self, key, num_classes, num_features):
    # N(0, 1), as the strong baseline initialises its centers.
    return {'centers': jax.random.normal(key, (num_classes, num_features), jnp.float32)}

  def __call__(self, state, outputs, labels):
    return losses.center_loss(outputs.global_feat, labels, state['centers'])

  def update_state(self, state, grads):
    if self.weight <= 0:
      return state
    return {'centers': state['centers'] - self.lr * grads['centers'] / self.weight}


def _zero(features: jax.Array, labels: jax.Array) -> jax.Array:
  del features, labels
  return jnp.zeros((), jnp.float32)


def _triplet(c) -> LossTerm:
  return FeatureLoss('metric', functools.partial(
      losses.batch_hard_triplet_loss, margin=c.triplet_margin), c.metric_weight)


# loss.metric -> the terms it adds between the cross-entropy and the center loss. The triplet
# and quadruplet terms keep the name 'metric' ('metric_loss' in the logs); 'none' trains with
# the classification loss alone (as the paper trains OSNet-AIN) and reports a zero there.
# 'centroid_triplet' adds the centroid triplet loss ('centroid_loss', docs/method.md section 8)
# to the triplet loss, with the triplet's margin, as the follow-up paper trains. Every term but
# the zero takes its weight from the config (loss.*_weight, 1 in the papers).
METRICS: dict[str, Callable[..., list[LossTerm]]] = {
    'triplet': lambda c: [_triplet(c)],
    'quadruplet': lambda c: [FeatureLoss('metric', functools.partial(
        losses.batch_hard_quadruplet_loss, margin1=c.quadruplet_margins[0],
        margin2=c.quadruplet_margins[1]), c.metric_weight)],
    'none': lambda c: [FeatureLoss('metric', _zero)],
    'centroid_triplet': lambda c: [_triplet(c), FeatureLoss('centroid', functools.partial(
        losses.centroid_triplet_loss, margin=c.triplet_margin), c.centroid_weight)],
}


def register_metric(name: str, make_terms: Callable[..., list[LossTerm]]) -> None:
  """Makes `loss.metric=name` select make_terms(loss_config) (a list of terms)."""
  if name in METRICS:
    raise ValueError(f'metric loss {name!r} is already registered')
  METRICS[name] = make_terms


def unregister_metric(name: str) -> None:
  METRICS.pop(name, None)


def check_metric(name: str) -> None:
  if name not in METRICS:
    raise ValueError(f'unknown metric loss {name!r}; choose one of {", ".join(METRICS)}')


class Objective:
  """The configured terms: the `loss.identity` classification term, the `loss.metric` terms,
  the center loss, in order."""

  def __init__(self, loss_config):
    check_metric(loss_config.metric)
    if loss_config.identity not in IDENTITY:
      raise ValueError(f'unknown identity loss {loss_config.identity!r}; choose one of '
                       f'{", ".join(IDENTITY)}')
    self.identity = IDENTITY[loss_config.identity](loss_config)
    self.terms: list[LossTerm] = [
        self.identity,
        *METRICS[loss_config.metric](loss_config),
        CenterLoss(loss_config.center_weight, loss_config.center_lr),
    ]
    names = [t.name for t in self.terms]
    if len(set(names)) != len(names):
      raise ValueError(f'loss terms need distinct names, got {names}')

  def init_state(self, key: jax.Array, num_classes: int,
                 num_features: int) -> dict[str, LossState]:
    """{term name: its state} for the terms that have state."""
    state = {t.name: t.init_state(key, num_classes, num_features) for t in self.terms}
    return {name: term_state for name, term_state in state.items() if term_state}

  def __call__(self, loss_state: dict[str, LossState], outputs: ReIDOutput,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-> (weighted total, {'<name>_loss': each term's unweighted value})."""
    values = {t.name: t(loss_state.get(t.name, {}), outputs, labels) for t in self.terms}
    total = sum(t.weight * values[t.name] for t in self.terms)
    return total, {f'{name}_loss': value for name, value in values.items()}

  def update_state(self, loss_state: dict[str, LossState],
                   grads: dict[str, LossState]) -> dict[str, LossState]:
    return {t.name: t.update_state(loss_state[t.name], grads[t.name])
            for t in self.terms if t.name in loss_state}
