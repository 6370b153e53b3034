"""The smallest complete run: fashion_synth/tiny, a width-8 ResNet10-IBN-a, 32x32 images.

Used by the end-to-end tests in-process (`get_config()`) and on the command line
(`--config tests/tiny_config.py`).
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'fashion_synth/tiny'
  c.input.image_size = (32, 32)
  c.input.pad = 2
  c.input.shuffle_buffer = 32
  c.model.backbone = 'resnet10_ibn_a'
  c.model.width = 8
  c.train.batch_size = 16           # P = 8: two whole identities on each of 4 devices
  c.train.k = 2
  c.train.num_epochs = 2            # 16 identities / P = 2 steps per epoch
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2
  c.train.eval_every_epochs = 2
  c.optim.warmup_epochs = 1
  c.eval.batch_size = 16
  c.eval.num_ranked_queries = 4
  c.eval.top_k_shown = 5
  return c
