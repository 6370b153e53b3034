"""Training losses of the ReID strong baseline (docs/method.md section 3), pure and jittable.

Label-smoothed cross-entropy, batch-hard triplet and quadruplet, center loss, the centroid
triplet loss of the follow-up paper (section 8), and the margins of the cosine classifiers
(CosFace, ArcFace; section 10).
"""

import math

import jax
import jax.numpy as jnp


def pairwise_euclidean(x: jax.Array, y: jax.Array, min_squared: float = 1e-12) -> jax.Array:
  """Euclidean (not squared) distances between two sets of vectors.

  Args:
    x: [N, D] float.
    y: [M, D] float.
    min_squared: floor on the squared distance. The derivative of sqrt at 0 is infinite, and
      the diagonal of a self-distance matrix (or a duplicated embedding) sits exactly there;
      the default keeps gradients finite. Evaluation, which takes no gradient, passes 0.

  Returns:
    [N, M] float32, entry (i, j) = ||x_i - y_j||.
  """
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  # HIGHEST keeps the matmul in full float32 on accelerators that default to TF32/bf16 passes;
  # the expansion below already loses precision to cancellation for nearby points.
  cross = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
  squared = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * cross
  return jnp.sqrt(jnp.maximum(squared, min_squared))


def cross_entropy_label_smoothing(
    logits: jax.Array, labels: jax.Array, epsilon: float = 0.1
) -> jax.Array:
  """Cross-entropy against the smoothed target q_i = (1 - eps) * 1[i == y] + eps / C.

  Args:
    logits: [B, C] float (bf16 is upcast: the log-softmax is computed in float32).
    labels: [B] int, in [0, C).
    epsilon: smoothing mass spread uniformly over the C classes.

  Returns:
    Scalar float32, mean over the batch.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  true_class = jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]
  # sum_i q_i * log p_i splits into the one-hot part and the uniform part.
  per_sample = -(1.0 - epsilon) * true_class - epsilon * jnp.mean(log_probs, axis=-1)
  return jnp.mean(per_sample)


def cosface_logits(cosines: jax.Array, labels: jax.Array, scale: float,
                   margin: float) -> jax.Array:
  """CosFace's logits (Wang et al., 2018): s * (cos theta_j - m * 1[j == y]).

  Args:
    cosines: [B, C] float, each feature's cosine with each class's weight vector.
    labels: [B] int, in [0, C).
    scale: s, the logits' scale.
    margin: m, subtracted from the cosine of the true class.

  Returns:
    [B, C] float32.
  """
  cosines = cosines.astype(jnp.float32)
  true_class = jax.nn.one_hot(labels, cosines.shape[-1], dtype=bool)
  return scale * jnp.where(true_class, cosines - margin, cosines)


def arcface_logits(cosines: jax.Array, labels: jax.Array, scale: float,
                   margin: float) -> jax.Array:
  """ArcFace's logits (Deng et al., 2019): s * cos(theta_j + m * 1[j == y]).

  cos(theta + m) falls with the angle only while theta + m <= pi. Past that (theta > pi - m,
  a feature nearly opposite its class) the true class's cosine becomes cos theta - m sin m
  instead, as in the ArcFace authors' code: still below the plain cosine and still falling
  with the angle, so the loss keeps pulling the feature towards its class.

  Args:
    cosines: [B, C] float, each feature's cosine with each class's weight vector.
    labels: [B] int, in [0, C).
    scale: s, the logits' scale.
    margin: m in radians, added to the angle of the true class, in [0, pi/2).

  Returns:
    [B, C] float32.
  """
  cosines = jnp.clip(cosines.astype(jnp.float32), -1.0, 1.0)
  # sin theta from cos theta: floored so that its gradient stays finite at cos theta = +-1.
  sines = jnp.sqrt(jnp.maximum(1.0 - cosines * cosines, 1e-12))
  shifted = cosines * math.cos(margin) - sines * math.sin(margin)
  shifted = jnp.where(cosines > math.cos(math.pi - margin), shifted,
                      cosines - margin * math.sin(margin))
  true_class = jax.nn.one_hot(labels, cosines.shape[-1], dtype=bool)
  return scale * jnp.where(true_class, shifted, cosines)


def _hardest_positive_and_negative(
    distances: jax.Array, same: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Per anchor: the largest same-label distance and the smallest other-label distance.

  Args:
    distances: [B, B] float32, non-negative.
    same: [B, B] bool, labels equal (the diagonal included).

  Returns:
    ([B], [B]) float32. An anchor with no other-label sample gets +inf as its negative
    distance, which turns every hinge built on it into 0.
  """
  # Distances are >= 0 and the anchor is its own positive, so 0 is a neutral fill for the max.
  hardest_positive = jnp.max(jnp.where(same, distances, 0.0), axis=1)
  hardest_negative = jnp.min(jnp.where(same, jnp.inf, distances), axis=1)
  return hardest_positive, hardest_negative


def batch_hard_triplet_loss(
    embeddings: jax.Array, labels: jax.Array, margin: float
) -> jax.Array:
  """Batch-hard triplet loss (Hermans et al., 2017) on Euclidean distances.

  For each anchor a: p = its farthest sample with the same label (a itself when it is alone),
  n = its closest sample with another label; the anchor contributes
  max(0, d(a, p) - d(a, n) + margin).

  Args:
    embeddings: [B, D] float, e.g. a P x K batch (P identities, K images each).
    labels: [B] int.
    margin: hinge margin (0.3 in RST).

  Returns:
    Scalar float32, mean over the B anchors.
  """
  distances = pairwise_euclidean(embeddings, embeddings)
  same = labels[:, None] == labels[None, :]
  hardest_positive, hardest_negative = _hardest_positive_and_negative(distances, same)
  return jnp.mean(jax.nn.relu(hardest_positive - hardest_negative + margin))


def _closest_pair_without_label(distances: jax.Array, labels: jax.Array) -> jax.Array:
  """Per anchor a: min d(i, j) over pairs with l_i != l_j, l_i != l_a and l_j != l_a.

  For every row i the two closest samples of two distinct other labels are found once (the
  closest other-label sample j1, then the closest sample whose label is neither l_i nor l_j1);
  whichever of the two does not carry the anchor's label is the best partner of i for that
  anchor. This takes O(B^2) memory instead of the O(B^3) of masking every (a, i, j) triple.

  Args:
    distances: [B, B] float32.
    labels: [B] int.

  Returns:
    [B] float32; +inf for an anchor when no such pair exists (fewer than three labels).
  """
  other = labels[:, None] != labels[None, :]
  other_distances = jnp.where(other, distances, jnp.inf)
  first_index = jnp.argmin(other_distances, axis=1)
  first = jnp.take_along_axis(other_distances, first_index[:, None], axis=1)[:, 0]
  first_label = labels[first_index]
  neither_label = other & (labels[None, :] != first_label[:, None])
  second = jnp.min(jnp.where(neither_label, distances, jnp.inf), axis=1)
  # [anchor, i]: the best partner of row i once the anchor's label is ruled out.
  partner = jnp.where(first_label[None, :] != labels[:, None], first[None, :], second[None, :])
  anchor_label_row = labels[:, None] == labels[None, :]
  return jnp.min(jnp.where(anchor_label_row, jnp.inf, partner), axis=1)


def batch_hard_quadruplet_loss(
    embeddings: jax.Array, labels: jax.Array, margin1: float, margin2: float
) -> jax.Array:
  """Batch-hard quadruplet loss (Chen et al., CVPR 2017) on Euclidean distances.

  For each anchor a, mined inside the batch:
    p: the farthest sample with a's label (as in the triplet loss);
    n: the closest sample with another label (as in the triplet loss);
    (n1, n2): the closest pair of samples whose labels differ from each other and from a's
      label (n1 need not be n).
  The anchor contributes max(0, d(a, p) - d(a, n) + margin1)
                      + max(0, d(a, p) - d(n1, n2) + margin2).
  The second term is 0 for an anchor when the batch has fewer than three labels.

  Args:
    embeddings: [B, D] float, e.g. a P x K batch.
    labels: [B] int.
    margin1: margin of the anchor-negative term.
    margin2: margin of the negative-pair term (the original uses margin2 < margin1).

  Returns:
    Scalar float32, mean over the B anchors of the sum of both terms.
  """
  distances = pairwise_euclidean(embeddings, embeddings)
  same = labels[:, None] == labels[None, :]
  hardest_positive, hardest_negative = _hardest_positive_and_negative(distances, same)
  closest_pair = _closest_pair_without_label(distances, labels)
  triplet_term = jax.nn.relu(hardest_positive - hardest_negative + margin1)
  pair_term = jax.nn.relu(hardest_positive - closest_pair + margin2)
  return jnp.mean(triplet_term + pair_term)


def centroid_triplet_loss(
    embeddings: jax.Array, labels: jax.Array, margin: float
) -> jax.Array:
  """Centroid triplet loss (Wieczorek et al., 2021) as the authors' training code computes it.

  An image's round is its rank among the images of its label, in batch order (the r-th image of
  every label is in round r); its centroid is the mean of the other images of its label. Each
  round's queries and their centroids, labelled, go through the batch-hard triplet loss
  together: anchors, positives and negatives are queries and centroids alike. A label with a
  single image has no centroid and takes no part; a round with fewer than two labels taking part
  is skipped. The loss is the mean over the remaining rounds, 0 when none remains.

  Rounds come from the labels, not from a K: on a P x K batch (any order) round r holds the P
  r-th images, and a label with fewer images simply misses the later rounds, its centroids
  made of the images it has. All rounds are mined at once on the [2B, 2B] distances, pairs
  from different rounds masked out.

  Args:
    embeddings: [B, D] float, e.g. a P x K batch.
    labels: [B] int.
    margin: hinge margin, the triplet loss's.

  Returns:
    Scalar float32.
  """
  count = embeddings.shape[0]
  embeddings = embeddings.astype(jnp.float32)
  same = labels[:, None] == labels[None, :]
  others = same & ~jnp.eye(count, dtype=bool)
  num_others = jnp.sum(others, axis=1)
  # HIGHEST: the 0/1 matrix must sum the features in full float32, as pairwise_euclidean does.
  centroids = jnp.matmul(others.astype(jnp.float32), embeddings,
                         precision=jax.lax.Precision.HIGHEST)
  centroids = centroids / jnp.maximum(num_others, 1)[:, None]
  rounds = jnp.sum(jnp.tril(same, -1), axis=1)
  has_centroid = num_others > 0

  # Queries [0, B) and centroids [B, 2B), the centroid of query i at B + i.
  points = jnp.concatenate([embeddings, centroids])
  point_labels = jnp.tile(labels, 2)
  point_rounds = jnp.where(jnp.tile(has_centroid, 2), jnp.tile(rounds, 2), -1)
  together = (point_rounds[:, None] == point_rounds[None, :]) & (point_rounds[:, None] >= 0)
  distances = jnp.where(together, pairwise_euclidean(points, points), jnp.inf)
  same_point_label = point_labels[:, None] == point_labels[None, :]
  hardest_positive, hardest_negative = _hardest_positive_and_negative(
      distances, together & same_point_label)
  # 0 for an anchor outside every round or alone in its round (no negative: +inf).
  per_anchor = jax.nn.relu(hardest_positive - hardest_negative + margin)

  # [round, query]: the queries of each round, one per label taking part.
  in_round = (jnp.arange(count)[:, None] == rounds[None, :]) & has_centroid[None, :]
  num_labels = jnp.sum(in_round, axis=1)
  round_sums = jnp.matmul(in_round.astype(jnp.float32), per_anchor[:count] + per_anchor[count:],
                          precision=jax.lax.Precision.HIGHEST)
  round_losses = round_sums / (2 * jnp.maximum(num_labels, 1))
  kept = num_labels >= 2
  return jnp.sum(jnp.where(kept, round_losses, 0.0)) / jnp.maximum(jnp.sum(kept), 1)


def center_loss(features: jax.Array, labels: jax.Array, centers: jax.Array) -> jax.Array:
  """Center loss (Wen et al., 2016) as the strong baseline computes it: mean_i ||f_i - c_{y_i}||^2.

  No factor 1/2 (Wen et al. write one; the reference code does not, and the loss weight and the
  centers' learning rate are tuned for this form).

  Args:
    features: [B, D] float.
    labels: [B] int, in [0, C).
    centers: [C, D] float, one learned center per class.

  Returns:
    Scalar float32 (squared norm summed over D, averaged over B).
  """
  difference = features.astype(jnp.float32) - centers.astype(jnp.float32)[labels]
  return jnp.mean(jnp.sum(difference * difference, axis=1))
