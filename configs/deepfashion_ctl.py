"""DeepFashion Consumer-to-shop with the follow-up paper's CTL setting (docs/method.md
section 8): ResNet50-IBN-A, last stride 1, 320x320, label-smoothed cross-entropy + triplet +
centroid triplet loss (margin 0.5) + center loss, Adam at 1e-4, P = 12 x K = 4, 120 epochs,
scored by product centroids (the 'centroids' section of the reports) besides images.

Needs the `deepfashion_consumer2shop` TFDS dataset built from your own download
(docs/datasets.md); one accelerator, as the authors trained (P = 12 also splits evenly over 2
or 4 devices):

  python -m fashion_jax.main --config configs/deepfashion_ctl.py --workdir runs/df_ctl \
      --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'deepfashion_consumer2shop'
  c.loss.metric = 'centroid_triplet'
  c.loss.triplet_margin = 0.5
  c.optim.base_lr = 1e-4
  c.train.batch_size = 48           # P = 12 identities x K = 4
  c.eval.centroids = True
  return c
