"""The cosine classifier's margins, CosFace and ArcFace (docs/method.md section 10), against
NumPy written from the papers' formulas, and trained by the real step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax import configlib, losses, objective, optim
from fashion_jax import train_step as ts
from fashion_jax.models import build_model

NUM_CLASSES = 8


def _cosines(rng, batch=16, classes=NUM_CLASSES):
  cosines = rng.uniform(-1, 1, (batch, classes)).astype(np.float32)
  cosines[0, :4] = [1.0, -1.0, 0.9999999, -0.9999]  # the ends, where sin theta is 0
  return cosines


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _smoothed_cross_entropy(logits, labels, epsilon):
  log_p = _log_softmax(logits.astype(np.float64))
  target = np.full(logits.shape, epsilon / logits.shape[1])
  target[np.arange(len(labels)), labels] += 1 - epsilon
  return -np.mean(np.sum(target * log_p, axis=1))


def _reference_logits(kind, cosines, labels, scale, margin):
  """The papers' formulas by angle: CosFace s (cos theta - m); ArcFace s cos(theta + m), and
  past theta = pi - m the authors' cos theta - m sin m."""
  c = cosines.astype(np.float64)
  target = c[np.arange(len(labels)), labels]
  if kind == 'cosface':
    changed = target - margin
  else:
    theta = np.arccos(np.clip(target, -1, 1))
    changed = np.where(theta < np.pi - margin, np.cos(theta + margin),
                       target - margin * np.sin(margin))
  out = c.copy()
  out[np.arange(len(labels)), labels] = changed
  return scale * out


@pytest.mark.parametrize('kind, margin', [('cosface', 0.35), ('arcface', 0.5),
                                          ('arcface', 1.2), ('cosface', 0.0)])
def test_margin_logits_equal_the_papers_formulas(kind, margin):
  rng = np.random.default_rng(3)
  cosines = _cosines(rng)
  labels = rng.integers(0, NUM_CLASSES, len(cosines))
  labels[0] = 1  # cos theta = -1: theta = pi, past pi - m
  fn = losses.cosface_logits if kind == 'cosface' else losses.arcface_logits
  got = fn(jnp.asarray(cosines), jnp.asarray(labels), 30.0, margin)
  np.testing.assert_allclose(got, _reference_logits(kind, cosines, labels, 30.0, margin),
                             atol=2e-4)
  # Only the true class changes, and it only goes down.
  others = np.ones_like(cosines, bool)
  others[np.arange(len(labels)), labels] = False
  np.testing.assert_array_equal(np.asarray(got)[others], 30.0 * cosines[others])
  assert np.all(np.asarray(got)[~others] <= 30.0 * cosines[~others] + 1e-5)


def test_arcface_gradient_is_finite_where_the_cosine_is_one():
  labels = jnp.asarray([0, 1, 2])
  cosines = jnp.asarray([[1.0, 0.2, -0.3], [0.1, -1.0, 0.5], [0.3, 0.3, 0.9999999]])

  def loss(c):
    return losses.cross_entropy_label_smoothing(losses.arcface_logits(c, labels, 30.0, 0.5),
                                                labels, 0.1)

  assert np.all(np.isfinite(jax.grad(loss)(cosines)))


def _config(identity):
  c = configlib.base_config()
  c.dataset.name = 'fashion_synth/tiny'
  c.model.backbone, c.model.width = 'resnet10_ibn_a', 8
  c.input.image_size = (32, 32)
  c.train.batch_size, c.train.k = 16, 2
  c.loss.identity = identity
  c.optim.warmup_epochs = 0
  return c


def _batch(rng):
  return (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
          np.repeat(rng.permutation(NUM_CLASSES), 2).astype(np.int32))


@pytest.mark.parametrize('identity', ['arcface', 'cosface'])
def test_the_id_term_is_the_margin_loss_on_the_models_own_cosines(identity):
  config = _config(identity)
  model = build_model(config.model, NUM_CLASSES, seed=0)
  images, labels = _batch(np.random.default_rng(0))
  out = model(jnp.asarray(images), train=True)
  weights = np.asarray(model.classifier.kernel[...], np.float64)
  feats = np.asarray(out.neck_feat, np.float64)
  cosines = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ (
      weights / np.linalg.norm(weights, axis=0, keepdims=True))
  np.testing.assert_allclose(out.cosines, cosines, atol=1e-5)
  # The linear classifier's logits are the same weights, unnormalised.
  np.testing.assert_allclose(out.logits, feats @ weights, rtol=1e-4, atol=1e-5)
  obj = objective.Objective(config.loss)
  margin = config.loss.arcface_margin if identity == 'arcface' else config.loss.cosface_margin
  _, values = obj(obj.init_state(jax.random.key(0), NUM_CLASSES, feats.shape[1]), out,
                  jnp.asarray(labels))
  expected = _smoothed_cross_entropy(
      _reference_logits(identity, cosines, labels, config.loss.id_scale, margin), labels,
      config.loss.label_smoothing)
  np.testing.assert_allclose(values['id_loss'], expected, rtol=1e-4)


def test_the_step_trains_the_cosine_classifier():
  # 30 steps on one fixed batch: the margin loss falls and the classifier learns the batch
  # (accuracy by the cosines). CosFace differs only in its logits, checked above.
  config = _config('arcface')
  model = build_model(config.model, NUM_CLASSES, seed=0)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=10)
  graphdef, state = ts.create_train_state(model, tx, NUM_CLASSES, loss_config=config.loss)
  mesh = ts.make_mesh()
  state = ts.replicate(state, mesh)
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  batch = jax.device_put(_batch(np.random.default_rng(1)), NamedSharding(mesh, P(ts.DATA_AXIS)))
  history = []
  for _ in range(30):
    state, metrics = step(state, *batch)
    history.append(jax.device_get(metrics))
  assert all(np.isfinite(m['id_loss']) for m in history)
  assert history[-1]['id_loss'] < 0.5 * history[0]['id_loss'], [m['id_loss'] for m in history]
  assert history[-1]['accuracy'] == 1.0


def test_an_unknown_identity_loss_is_one_line():
  config = _config('sphereface')
  with pytest.raises(ValueError, match="loss.identity.*'sphereface'.*cross_entropy") as error:
    configlib.validate_config(config, num_devices=1, num_processes=1)
  assert '\n' not in str(error.value)
  for field, value in (('loss.arcface_margin', 1.6), ('loss.id_scale', 0.0)):
    config = _config('arcface')
    section, name = field.split('.')
    config[section][name] = value
    with pytest.raises(ValueError, match=field):
      configlib.validate_config(config, num_devices=1, num_processes=1)
