"""The centroid triplet loss (docs/method.md section 8): against a NumPy reference written round
by round, inside the objective, and trained end to end on fashion_synth/tiny."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config
from fashion_jax import configlib, losses, objective, train
from fashion_jax.models.reid import ReIDOutput

MARGIN = 0.5
centroid_triplet_loss = jax.jit(losses.centroid_triplet_loss)


def _reference_round(points, labels, margin):
  """Batch-hard triplet loss, one anchor at a time, in float64."""
  d = np.sqrt(np.maximum(((points[:, None] - points[None]) ** 2).sum(-1), 1e-12))
  terms = []
  for a in range(len(points)):
    positive = max(d[a, j] for j in range(len(points)) if labels[j] == labels[a])
    negative = min(d[a, j] for j in range(len(points)) if labels[j] != labels[a])
    terms.append(max(0.0, positive - negative + margin))
  return np.mean(terms)


def _reference(x, labels, margin):
  """As the authors' code: round r takes the r-th image of each label (in batch order) as its
  query and the mean of the label's other images as its centroid."""
  x = x.astype(np.float64)
  images = {}
  for i, label in enumerate(labels):
    images.setdefault(label, []).append(i)
  round_losses = []
  for r in range(max(len(rows) for rows in images.values())):
    taking_part = [rows for rows in images.values() if len(rows) > r and len(rows) > 1]
    if len(taking_part) < 2:
      continue
    queries = [x[rows[r]] for rows in taking_part]
    centroids = [np.mean([x[i] for i in rows if i != rows[r]], axis=0) for rows in taking_part]
    round_labels = [labels[rows[0]] for rows in taking_part] * 2
    round_losses.append(_reference_round(np.array(queries + centroids), round_labels, margin))
  return np.mean(round_losses) if round_losses else 0.0


def _pk_batch(seed, p, k, dim=8):
  rng = np.random.default_rng(seed)
  labels = np.repeat(rng.permutation(100)[:p], k).astype(np.int32)
  return rng.normal(size=(p * k, dim)).astype(np.float32), labels


@pytest.mark.parametrize('seed, p, k', [(0, 2, 2), (1, 5, 2), (2, 2, 4), (3, 6, 4), (4, 3, 3),
                                        (5, 14, 4)])
def test_matches_reference_on_pk_batches(seed, p, k):
  x, labels = _pk_batch(seed, p, k)
  np.testing.assert_allclose(centroid_triplet_loss(x, labels, MARGIN),
                             _reference(x, labels, MARGIN), rtol=1e-5, atol=1e-6)


def test_matches_reference_on_uneven_interleaved_labels():
  # Label 3 has three images, 1 two, 7 one (no centroid: never takes part), 9 four; rounds 2
  # and 3 keep fewer labels, round 4 only label 9 and is skipped. Order decides the rounds.
  labels = np.array([3, 9, 3, 1, 7, 9, 1, 9, 3, 9], np.int32)
  x = np.random.default_rng(6).normal(size=(len(labels), 5)).astype(np.float32)
  np.testing.assert_allclose(centroid_triplet_loss(x, labels, MARGIN),
                             _reference(x, labels, MARGIN), rtol=1e-5, atol=1e-6)


def test_with_two_images_per_label_every_round_is_the_whole_batch():
  # K = 2: a query's centroid is its label's other image, so each round holds the batch itself.
  x, labels = _pk_batch(7, 4, 2)
  np.testing.assert_allclose(centroid_triplet_loss(x, labels, MARGIN),
                             losses.batch_hard_triplet_loss(x, labels, MARGIN), rtol=1e-6)


@pytest.mark.parametrize('labels', [[4, 4, 4, 4], [0, 1, 2, 3], [0, 0, 1, 2]])
def test_is_zero_without_two_labels_with_centroids(labels):
  x = np.random.default_rng(8).normal(size=(4, 3)).astype(np.float32)
  assert float(centroid_triplet_loss(x, np.array(labels, np.int32), MARGIN)) == 0.0


@pytest.mark.parametrize('k', [2, 4])
def test_duplicated_features_match_reference_with_finite_gradients(k):
  # Every image of label 0 is one vector (query = centroid, zero distances), and labels 1 and 2
  # share a vector across labels.
  x, labels = _pk_batch(9, 3, k)
  x[:k] = x[0]
  x[2 * k] = x[k]
  np.testing.assert_allclose(centroid_triplet_loss(x, labels, MARGIN),
                             _reference(x, labels, MARGIN), rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(losses.centroid_triplet_loss))(x, labels, MARGIN)
  assert np.all(np.isfinite(grads)) and np.any(grads != 0)


def test_all_images_identical_has_finite_gradients():
  x = np.ones((8, 4), np.float32)
  labels = np.repeat(np.arange(4), 2).astype(np.int32)
  grads = jax.grad(losses.centroid_triplet_loss)(jnp.asarray(x), labels, MARGIN)
  assert np.all(np.isfinite(grads))


def test_jit_matches_eager():
  x, labels = _pk_batch(10, 4, 4)
  np.testing.assert_allclose(centroid_triplet_loss(x, labels, MARGIN),
                             losses.centroid_triplet_loss(x, labels, MARGIN), rtol=1e-6)


def test_objective_adds_triplet_and_centroid_terms_with_their_weights():
  config = configlib.base_config().loss
  config.metric = 'centroid_triplet'
  config.triplet_margin = MARGIN
  config.id_weight, config.metric_weight, config.centroid_weight = 0.5, 2.0, 3.0
  obj = objective.Objective(config)
  assert [(t.name, t.weight) for t in obj.terms] == [
      ('id', 0.5), ('metric', 2.0), ('centroid', 3.0), ('center', config.center_weight)]
  x, labels = _pk_batch(11, 4, 4)
  logits = np.random.default_rng(11).normal(size=(len(labels), 100)).astype(np.float32)
  outputs = ReIDOutput(logits=jnp.asarray(logits), global_feat=jnp.asarray(x),
                       neck_feat=jnp.asarray(x), cosines=jnp.tanh(logits))
  state = obj.init_state(jax.random.key(0), 100, x.shape[1])
  total, values = obj(state, outputs, labels)
  np.testing.assert_allclose(values['metric_loss'],
                             losses.batch_hard_triplet_loss(x, labels, MARGIN), rtol=1e-6)
  np.testing.assert_allclose(values['centroid_loss'], _reference(x, labels, MARGIN), rtol=1e-5)
  np.testing.assert_allclose(
      total, 0.5 * values['id_loss'] + 2.0 * values['metric_loss']
      + 3.0 * values['centroid_loss'] + config.center_weight * values['center_loss'], rtol=1e-6)


def test_training_raises_the_untrained_map_by_half(tiny_data_dir, tmp_path):
  # 88 steps of P = 8 x K = 4 at a from-scratch learning rate, on the test session's 4 devices:
  # mAP 0.182 -> 0.341 at seed 0, and 1.87x-2.98x over seeds 0-4. The 14 tiny queries make mAP
  # coarse and the run is chaotic: a change of rounding in one gradient (max pooling's, summed
  # in another order) moved seed 0 from 2.7x to 1.87x, and on an AMD EPYC without AVX-512,
  # where XLA's CPU code rounds differently, seed 0 gives 1.49x (0.182 -> 0.272). So the floor
  # is 1.3x; no learning is 1x.
  c = tiny_config.get_config()
  c.dataset.data_dir = tiny_data_dir
  c.loss.metric = 'centroid_triplet'
  c.train.batch_size, c.train.k = 32, 4
  c.train.num_epochs = c.train.eval_every_epochs = 44
  c.train.checkpoint_every_steps = 1000
  c.train.log_every_steps = 1000
  c.optim.base_lr = 1e-2
  c.optim.milestones = (1000,)
  final = train.train_and_evaluate(c, str(tmp_path))
  with open(os.path.join(tmp_path, 'eval', 'history.jsonl')) as f:
    untrained = json.loads(f.readline())
  assert untrained['step'] == 0
  assert final['mAP'] >= 1.3 * untrained['mAP'], (untrained['mAP'], final['mAP'])
