"""Exact Street2Shop with the follow-up paper's CTL setting (docs/method.md section 8):
ResNet50-IBN-A, last stride 1, 320x320, label-smoothed cross-entropy + triplet + centroid
triplet loss (margin 0.5) + center loss, Adam at 1e-4, P = 14 x K = 4, 120 epochs, scored by
product centroids (the 'centroids' section of the reports) besides images.

Needs the `street2shop` TFDS dataset built from your own download (docs/datasets.md); one
accelerator, as the authors trained (P = 14 splits evenly over 2 devices, not 4 or 8):

  python -m fashion_jax.main --config configs/street2shop_ctl.py --workdir runs/s2s_ctl \
      --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'street2shop'
  c.loss.metric = 'centroid_triplet'
  c.loss.triplet_margin = 0.5
  c.optim.base_lr = 1e-4
  c.train.batch_size = 56           # P = 14 identities x K = 4
  c.eval.centroids = True
  return c
