"""Exact Street2Shop with the paper's best setting: ResNet50-IBN-A, last stride 1, 320x320,
quadruplet + label-smoothed cross-entropy + center loss, 120 epochs (docs/method.md sections 2-4).

Needs the `street2shop` TFDS dataset built from your own download (docs/datasets.md):

  python -m fashion_jax.main --config configs/street2shop.py --workdir runs/s2s \
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Where host cores are short (today's input needs several per GPU), build `street2shop/resized320`
too and add
  --config.dataset.name=street2shop/resized320 --config.input.augment_on_device=True
so the host only decodes 320x320 JPEGs (docs/datasets.md, docs/training.md).

Paper (with re-ranking): 54.8 mAP, 72.9 Acc@20.
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'street2shop'
  c.loss.metric = 'quadruplet'
  c.train.batch_size = 64
  return c
