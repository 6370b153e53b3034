"""Tests for fashion_jax/losses.py: hand-computed values, brute-force NumPy references,

jit equality and finite gradients on degenerate batches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax import losses

# Compiled once per shape: eager dispatch would compile every primitive separately, which
# dominates the run time of these tiny inputs.
triplet_loss = jax.jit(losses.batch_hard_triplet_loss)
quadruplet_loss = jax.jit(losses.batch_hard_quadruplet_loss)

# Six points on the x axis, three labels, chosen so that every mining decision is unique:
#   label 0: x0 = 0, x1 = 1     label 1: x2 = 3, x3 = 7     label 2: x4 = 4, x5 = 10
LINE_POINTS = np.array([[0, 0], [1, 0], [3, 0], [7, 0], [4, 0], [10, 0]], np.float32)
LINE_LABELS = np.array([0, 0, 1, 1, 2, 2])


def _brute_force_distances(x):
  return np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))


def _reference_triplet(x, labels, margin):
  d = _brute_force_distances(x)
  terms = []
  for a in range(len(x)):
    positive = max(d[a, j] for j in range(len(x)) if labels[j] == labels[a])
    negative = min(d[a, j] for j in range(len(x)) if labels[j] != labels[a])
    terms.append(max(0.0, positive - negative + margin))
  return np.mean(terms)


def _reference_quadruplet(x, labels, margin1, margin2):
  d = _brute_force_distances(x)
  n = len(x)
  terms = []
  for a in range(n):
    positive = max(d[a, j] for j in range(n) if labels[j] == labels[a])
    negative = min(d[a, j] for j in range(n) if labels[j] != labels[a])
    pairs = [d[i, j] for i in range(n) for j in range(n)
             if labels[i] != labels[j] and labels[a] not in (labels[i], labels[j])]
    pair_term = max(0.0, positive - min(pairs) + margin2) if pairs else 0.0
    terms.append(max(0.0, positive - negative + margin1) + pair_term)
  return np.mean(terms)


def _pk_batch(seed, num_ids, images_per_id, dim=8):
  rng = np.random.default_rng(seed)
  labels = np.repeat(rng.permutation(100)[:num_ids], images_per_id)
  return rng.normal(size=(len(labels), dim)).astype(np.float32), labels


def test_pairwise_euclidean_hand_values():
  # 3-4-5 triangle: d(x0, y0) = 5, d(x0, y1) = 0, d(x1, y0) = 3, d(x1, y1) = 4.
  x = jnp.array([[0.0, 0.0], [3.0, 0.0]])
  y = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(losses.pairwise_euclidean(x, y), [[5, 1e-6], [4, 3]], atol=1e-6)
  np.testing.assert_allclose(losses.pairwise_euclidean(x, y, min_squared=0.0),
                             [[5, 0], [4, 3]], atol=0)


def test_pairwise_euclidean_matches_brute_force_on_random_vectors():
  x, _ = _pk_batch(0, 6, 4)
  y, _ = _pk_batch(1, 3, 3)
  expected = np.sqrt(((x[:, None, :].astype(np.float64) - y[None, :, :]) ** 2).sum(-1))
  np.testing.assert_allclose(losses.pairwise_euclidean(x, y), expected, atol=1e-5)


def test_triplet_hand_computed():
  # margin 1.5, anchor: hardest positive, hardest negative -> hinge
  #   x0: d(0,1)=1, d(0,3)=3 -> max(0, 1 - 3 + 1.5) = 0
  #   x1: d(1,0)=1, d(1,3)=2 -> 0.5
  #   x2: d(3,7)=4, d(3,4)=1 -> 4.5
  #   x3: d(7,3)=4, d(7,4)=3 -> 2.5
  #   x4: d(4,10)=6, d(4,3)=1 -> 6.5
  #   x5: d(10,4)=6, d(10,7)=3 -> 4.5
  # mean = 18.5 / 6
  loss = triplet_loss(LINE_POINTS, LINE_LABELS, margin=1.5)
  np.testing.assert_allclose(loss, 18.5 / 6, rtol=1e-6)


def test_quadruplet_hand_computed():
  # Triplet part with margin1 = 1.5: 18.5 / 6 (see test_triplet_hand_computed).
  # Closest pair of two different labels, neither the anchor's:
  #   anchor label 0: (x2, x4) = (3, 4) -> 1
  #   anchor label 1: (3, 4) is excluded; (x1, x4) = (1, 4) -> 3
  #   anchor label 2: (3, 4) is excluded; (x1, x2) = (1, 3) -> 2
  # Pair term with margin2 = 0.5, hardest positive d_ap as in the triplet test:
  #   x0, x1: 1 - 1 + 0.5 = 0.5 each; x2, x3: 4 - 3 + 0.5 = 1.5 each; x4, x5: 6 - 2 + 0.5 = 4.5
  #   sum = 13
  # mean of both terms = (18.5 + 13) / 6 = 5.25
  loss = quadruplet_loss(LINE_POINTS, LINE_LABELS, margin1=1.5, margin2=0.5)
  np.testing.assert_allclose(loss, 5.25, rtol=1e-6)


@pytest.mark.parametrize('num_ids, images_per_id', [(2, 4), (4, 4), (8, 4), (5, 2)])
@pytest.mark.parametrize('seed', [0, 1])
def test_metric_losses_match_brute_force_on_pk_batches(seed, num_ids, images_per_id):
  x, labels = _pk_batch(seed, num_ids, images_per_id)
  np.testing.assert_allclose(triplet_loss(x, labels, 0.3),
                             _reference_triplet(x, labels, 0.3), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(quadruplet_loss(x, labels, 0.3, 0.2),
                             _reference_quadruplet(x, labels, 0.3, 0.2), rtol=1e-5, atol=1e-5)


def test_metric_losses_match_brute_force_on_uneven_labels():
  # Not a P x K layout: identities of 1 to 5 images, so lone anchors and ragged rows occur.
  rng = np.random.default_rng(3)
  labels = np.array([4, 4, 4, 4, 4, 9, 2, 2, 7, 7, 7, 1])
  x = rng.normal(size=(len(labels), 5)).astype(np.float32)
  np.testing.assert_allclose(triplet_loss(x, labels, 0.5),
                             _reference_triplet(x, labels, 0.5), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(quadruplet_loss(x, labels, 0.5, 0.25),
                             _reference_quadruplet(x, labels, 0.5, 0.25), rtol=1e-5, atol=1e-5)


def test_quadruplet_equals_triplet_with_two_identities():
  # No pair of samples avoids the anchor's label, so only the triplet term remains.
  x, labels = _pk_batch(5, 2, 4)
  np.testing.assert_allclose(quadruplet_loss(x, labels, 0.3, 10.0),
                             triplet_loss(x, labels, 0.3), rtol=1e-6)


def test_cross_entropy_hand_computed():
  # Logits [0, ln 3] -> p = [1/4, 3/4]; label 1, eps 0.1 -> q = [0.05, 0.95];
  # loss = -(0.05 ln(1/4) + 0.95 ln(3/4)) = 0.0693147 + 0.2732979 = 0.3426126.
  logits = jnp.array([[0.0, np.log(3.0)]])
  loss = losses.cross_entropy_label_smoothing(logits, jnp.array([1]), epsilon=0.1)
  np.testing.assert_allclose(loss, 0.3426126, rtol=1e-6)


def _numpy_log_softmax(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@pytest.mark.parametrize('epsilon', [0.0, 0.1, 0.5])
def test_cross_entropy_matches_numpy_formula(epsilon):
  rng = np.random.default_rng(7)
  logits = rng.normal(scale=3.0, size=(6, 11)).astype(np.float32)
  labels = rng.integers(0, 11, size=6)
  target = np.full(logits.shape, epsilon / 11)
  target[np.arange(6), labels] += 1.0 - epsilon
  expected = -(target * _numpy_log_softmax(logits)).sum(axis=1).mean()
  np.testing.assert_allclose(
      losses.cross_entropy_label_smoothing(logits, labels, epsilon), expected, rtol=1e-5)


def test_cross_entropy_without_smoothing_is_standard_cross_entropy():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([0, 3, 3, 1, 2])
  expected = -_numpy_log_softmax(logits)[np.arange(5), labels].mean()
  np.testing.assert_allclose(
      losses.cross_entropy_label_smoothing(logits, labels, epsilon=0.0), expected, rtol=1e-5)


def test_cross_entropy_computes_bf16_logits_in_float32():
  rng = np.random.default_rng(9)
  logits = jnp.asarray(rng.normal(scale=4.0, size=(8, 1000)), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 1000, size=8))
  loss = losses.cross_entropy_label_smoothing(logits, labels)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(
      loss, losses.cross_entropy_label_smoothing(logits.astype(jnp.float32), labels), rtol=1e-6)


def test_center_loss_hand_computed_and_gradient():
  # f0 - c0 = (0, 2) -> 4; f1 - c1 = (3, 4) -> 25; (4 + 25) / 2 = 14.5 (no factor 1/2).
  features = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  labels = jnp.array([0, 1])
  centers = jnp.array([[1.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
  np.testing.assert_allclose(losses.center_loss(features, labels, centers), 14.5)
  # d/dc_k = -(2/B) sum_{i: y_i = k} (f_i - c_k); the unused center 2 gets no gradient.
  grad = jax.grad(losses.center_loss, argnums=2)(features, labels, centers)
  np.testing.assert_allclose(grad, [[0.0, -2.0], [-3.0, -4.0], [0.0, 0.0]])


# Margins large enough that every hinge is active, so each sample receives a gradient.
LOSS_CALLS = {
    'triplet': lambda x, y: losses.batch_hard_triplet_loss(x, y, 10.0),
    'quadruplet': lambda x, y: losses.batch_hard_quadruplet_loss(x, y, 10.0, 5.0),
    'center': lambda x, y: losses.center_loss(x, y, jnp.ones((10, x.shape[1]))),
}


@pytest.mark.parametrize('name', sorted(LOSS_CALLS))
def test_gradients_are_finite_with_duplicate_embeddings(name):
  # Identity 1 is four copies of one vector (hardest positive at distance 0), and a sample of
  # identity 2 duplicates one of identity 0 (hardest negative at distance 0).
  rng = np.random.default_rng(11)
  x = rng.normal(size=(12, 6)).astype(np.float32)
  x[4:8] = x[4]
  x[8] = x[0]
  labels = np.repeat([0, 1, 2], 4)
  for num in (12, 8):  # 8: only two identities, the quadruplet pair term has no pair at all
    grad = jax.jit(jax.grad(LOSS_CALLS[name]))(x[:num], labels[:num])
    assert np.all(np.isfinite(grad)), name
    assert np.any(grad != 0), name


@pytest.mark.parametrize('name', sorted(LOSS_CALLS))
def test_jit_matches_eager(name):
  x, labels = _pk_batch(13, 4, 4)
  np.testing.assert_allclose(jax.jit(LOSS_CALLS[name])(x, labels), LOSS_CALLS[name](x, labels),
                             rtol=1e-6)
