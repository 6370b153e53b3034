"""DeepFashion Consumer-to-shop with the paper's setting: ResNet50-IBN-A, last stride 1,
320x320, quadruplet + label-smoothed cross-entropy + center loss, 120 epochs.

Needs the `deepfashion_consumer2shop` TFDS dataset built from your own download (docs/datasets.md):

  python -m fashion_jax.main --config configs/deepfashion.py --workdir runs/df \
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Where host cores are short (today's input needs several per GPU), build
`deepfashion_consumer2shop/resized320` too and add
  --config.dataset.name=deepfashion_consumer2shop/resized320 --config.input.augment_on_device=True
so the host only decodes 320x320 JPEGs (docs/datasets.md, docs/training.md).

Paper: 47.3 Acc@1, 79.0 Acc@20.
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'deepfashion_consumer2shop'
  c.loss.metric = 'quadruplet'
  c.train.batch_size = 64
  return c
