"""Verification over every query-gallery pair: the true positive rate at given false positive
rates, and the ROC curve (docs/method.md section 9).

A pair is positive when query and gallery image show the same product; its score is the inner
product of the two embeddings (cosine similarity for unit vectors). Nothing of size Q x G
reaches the host: query chunks are scored on the device and reduced to histograms over the
scores' order-preserving 32-bit keys, 65,536 bins of the upper 16 bits, then, inside the bins
that matter, of the lower 16 bits. That finds the exact negative score at each FPR (a radix
select), so the figures equal a full sort of all pairs, ties included.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.retrieval import search

_BINS = 1 << 16


def score_keys(scores: jax.Array) -> jax.Array:
  """float32 -> uint32 keys in the same order (-0.0 counts as 0.0)."""
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32) + 0.0, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def key_scores(keys: np.ndarray) -> np.ndarray:
  """The inverse of score_keys, on the host."""
  keys = np.asarray(keys, np.uint32)
  bits = np.where(keys >> 31 == 1, keys & np.uint32(0x7FFFFFFF), ~keys)
  return bits.astype(np.uint32).view(np.float32)


@functools.partial(jax.jit, static_argnames=('stage',))
def _chunk(queries, gallery, query_ids, gallery_ids, query_valid, bins, thresholds, *, stage):
  """One query chunk's contribution; `stage` says which:

  'upper': (negatives, positives) counts per upper-16-bit bin, [2, 65536] int32;
  'lower': negatives per lower-16-bit value inside each of `bins` (upper bins), [T, 65536];
  'above': positives with a key above each of `thresholds` (full keys), [T] int32.
  """
  scores = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
  keys = score_keys(scores)
  same = query_ids[:, None] == gallery_ids[None, :]
  negative = ~same & query_valid[:, None]
  positive = same & query_valid[:, None]
  if stage == 'upper':
    upper = (keys >> 16).astype(jnp.int32).reshape(-1)
    counts = jnp.zeros((2, _BINS), jnp.int32)
    counts = counts.at[0, upper].add(negative.reshape(-1).astype(jnp.int32))
    return counts.at[1, upper].add(positive.reshape(-1).astype(jnp.int32))
  if stage == 'lower':
    lower = (keys & 0xFFFF).astype(jnp.int32).reshape(-1)
    upper = (keys >> 16).astype(jnp.int32).reshape(-1)

    def one(bin_):
      inside = negative.reshape(-1) & (upper == bin_)
      return jnp.zeros(_BINS, jnp.int32).at[lower].add(inside.astype(jnp.int32))

    return jax.vmap(one)(bins)
  return jnp.sum(positive[None] & (keys[None] > thresholds[:, None, None]), axis=(1, 2))


def _passes(query_emb, gallery_emb, query_ids, gallery_ids, chunk_size):
  """Runs a stage over every query chunk and sums the counts (int64)."""
  gallery = jnp.asarray(gallery_emb, jnp.float32)
  gallery_ids = jnp.asarray(gallery_ids)
  q_chunk = search.chunk_length(len(query_emb), chunk_size)
  queries = search.pad_rows(np.asarray(query_emb, np.float32), q_chunk)
  ids = search.pad_rows(np.asarray(query_ids), q_chunk)
  valid = search.pad_rows(np.ones(len(query_emb), bool), q_chunk)

  def run(stage, bins=np.zeros(1, np.int32), thresholds=np.zeros(1, np.uint32)):
    total = None
    for start in range(0, len(queries), q_chunk):
      rows = slice(start, start + q_chunk)
      counts = np.asarray(_chunk(queries[rows], gallery, ids[rows], gallery_ids, valid[rows],
                                 jnp.asarray(bins), jnp.asarray(thresholds), stage=stage),
                          np.int64)
      total = counts if total is None else total + counts
    return total

  return run


def verification(query_emb: np.ndarray, gallery_emb: np.ndarray, query_ids: np.ndarray,
                 gallery_ids: np.ndarray, fprs: Sequence[float] = (1e-4, 1e-3, 1e-2), *,
                 chunk_size: int | None = None) -> dict:
  """TPR at each FPR in `fprs` over all query-gallery pairs, and the ROC curve.

  At FPR f, with m = floor(f x negatives), the threshold is the (m + 1)-th largest negative
  score v: a pair is accepted when its score is above v, so at most m negatives are, and the
  TPR is the share of positive pairs scoring above v (1 when m covers every negative).

  Args:
    query_emb: [Q, D], gallery_emb: [G, D] float (scored in float32).
    query_ids, gallery_ids: [Q], [G] product labels of any dtype.
    fprs: false positive rates in (0, 1].
    chunk_size: queries per device call (default: about 2^24 pairs).

  Returns:
    {'tpr': {f: TPR}, 'threshold': {f: v}, 'num_positive_pairs', 'num_negative_pairs',
     'roc': (fpr [B], tpr [B]) at the 65,536 coarse score bins, from the highest score down}.
  """
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  if len(query_emb) == 0 or len(gallery_emb) == 0:
    raise ValueError('need at least one query and one gallery item')
  if not all(0 < f <= 1 for f in fprs):
    raise ValueError(f'false positive rates must be in (0, 1], got {list(fprs)}')
  codes = np.unique(np.concatenate([query_ids, gallery_ids]), return_inverse=True)[1]
  query_codes, gallery_codes = codes[:len(query_ids)], codes[len(query_ids):]
  if chunk_size is None:
    chunk_size = max(1, min(1024, (1 << 24) // len(gallery_emb)))
  run = _passes(query_emb, gallery_emb, query_codes.astype(np.int32),
                gallery_codes.astype(np.int32), chunk_size)
  negatives, positives = run('upper')
  num_negative, num_positive = int(negatives.sum()), int(positives.sum())
  # Counts from the highest bin down.
  negatives_above = np.concatenate([[0], np.cumsum(negatives[::-1])])  # above bin 65535 - i
  positives_above = np.concatenate([[0], np.cumsum(positives[::-1])])
  roc = (negatives_above[1:] / max(num_negative, 1), positives_above[1:] / max(num_positive, 1))

  selected, bins, ranks = [], [], []
  for f in fprs:
    m = int(np.floor(f * num_negative))
    if m >= num_negative:
      selected.append(None)
      continue
    # The bin (from the top) where the (m + 1)-th largest negative lies, and its rank inside.
    top = int(np.searchsorted(negatives_above[1:], m + 1))
    bins.append(_BINS - 1 - top)
    ranks.append(m - int(negatives_above[top]))
    selected.append(len(bins) - 1)
  thresholds = np.zeros(max(len(bins), 1), np.uint32)
  if bins:
    lower = run('lower', bins=np.asarray(bins, np.int32))
    for i, (bin_, rank) in enumerate(zip(bins, ranks)):
      above = np.concatenate([[0], np.cumsum(lower[i][::-1])])
      value = _BINS - 1 - int(np.searchsorted(above[1:], rank + 1))
      thresholds[i] = (bin_ << 16) | value
    accepted = run('above', thresholds=thresholds)
  tpr, threshold = {}, {}
  for f, i in zip(fprs, selected):
    if i is None:
      tpr[f], threshold[f] = (1.0 if num_positive else float('nan')), float('-inf')
    else:
      tpr[f] = float(accepted[i]) / num_positive if num_positive else float('nan')
      threshold[f] = float(key_scores(thresholds[i]))
  return {'tpr': tpr, 'threshold': threshold, 'num_positive_pairs': num_positive,
          'num_negative_pairs': num_negative, 'roc': roc}
