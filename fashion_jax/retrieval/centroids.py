"""Centroid retrieval (docs/method.md section 8): one gallery vector per product, its images' mean.

The centroids are L2-normalised again and evaluated with the same metrics as single images.
"""

import numpy as np


def gallery_centroids(gallery_emb: np.ndarray, gallery_ids: np.ndarray,
                      gallery_cams: np.ndarray | None = None, **labels: np.ndarray) -> dict:
  """Averages the gallery embeddings of each item (of each (item, camera) when cams are given).

  Keeping cameras apart keeps the same-id-same-camera rule exact: a centroid never mixes
  images the rule would drop with images it would keep. Fashion galleries have one domain,
  so they still get one centroid per product.

  Args:
    gallery_emb: [G, D] float.
    gallery_ids: [G] labels of any dtype.
    gallery_cams: [G] or None.
    **labels: other [G] per-image labels constant within an item (e.g. category=...); each
      centroid takes the label of its item's first image.

  Returns:
    {'embeddings': [C, D] float32 unit vectors, 'ids': [C], 'cams': [C] (when given),
     'count': [C] images per centroid, and each of `labels`: [C]}, in order of first appearance.
  """
  gallery_emb = np.asarray(gallery_emb)
  gallery_ids = np.asarray(gallery_ids)
  if gallery_emb.ndim != 2 or gallery_ids.shape != (len(gallery_emb),):
    raise ValueError(f'gallery_emb must be [G, D] and gallery_ids [G], got {gallery_emb.shape} '
                     f'and {gallery_ids.shape}')
  keys = [gallery_ids] if gallery_cams is None else [gallery_ids, np.asarray(gallery_cams)]
  _, first, group = np.unique(np.stack([np.unique(k, return_inverse=True)[1] for k in keys],
                                       axis=1), axis=0, return_index=True, return_inverse=True)
  group = group.reshape(-1)
  # Renumber groups by first appearance, so centroids keep the gallery's order.
  appearance = np.argsort(np.argsort(first, kind='stable'), kind='stable')
  group = appearance[group]
  first = np.sort(first)
  sums = np.zeros((len(first), gallery_emb.shape[1]), np.float64)
  np.add.at(sums, group, gallery_emb.astype(np.float64))
  norms = np.linalg.norm(sums, axis=1, keepdims=True)
  out = {'embeddings': (sums / np.maximum(norms, 1e-12)).astype(np.float32),
         'ids': gallery_ids[first], 'count': np.bincount(group, minlength=len(first))}
  if gallery_cams is not None:
    out['cams'] = np.asarray(gallery_cams)[first]
  for name, values in labels.items():
    out[name] = np.asarray(values)[first]
  return out
