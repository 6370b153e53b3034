"""The demo: a small ResNet-IBN-a trained on the embedded, procedurally generated dataset.

Runs on a laptop-class CPU in a few minutes with no download (the dataset is generated on
first use into ~/tensorflow_datasets, or --config.dataset.data_dir):

  python -m fashion_jax.main --config configs/demo.py --workdir runs/demo

Expected: the untrained model (step 0) reaches a low mAP; training at least doubles it.
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'fashion_synth/demo'
  c.input.image_size = (64, 64)
  c.input.pad = 4                  # 10 px at 256x128 scaled to the demo's 64x64
  c.input.shuffle_buffer = 512
  c.model.backbone = 'resnet18_ibn_a'
  c.model.width = 16
  c.train.batch_size = 64          # P = 16 identities x K = 4
  c.train.num_epochs = 30
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 100
  c.train.eval_every_epochs = 15
  c.optim.warmup_epochs = 3
  c.optim.milestones = (20, 26)
  c.optim.base_lr = 2e-3          # from scratch (no ImageNet weights): a larger step than RST
  c.eval.batch_size = 128
  return c
