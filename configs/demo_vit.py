"""The demo with a Vision Transformer: a half-width ViT-Ti/16 (96 channels, 3 heads, 12 blocks)
trained from scratch on the embedded, procedurally generated dataset with the ViT recipe
(AdamW, warmup then cosine).

Runs on a laptop-class CPU in a few minutes with no download (the dataset is generated on
first use into ~/tensorflow_datasets, or --config.dataset.data_dir):

  python -m fashion_jax.main --config configs/demo_vit.py --workdir runs/demo_vit

Expected: the untrained model (step 0) reaches a low mAP; training at least doubles it
(docs/models.md, 'Vision Transformers', has a measured run).
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'fashion_synth/demo'
  c.input.image_size = (64, 64)     # 4 x 4 patches of 16 px
  c.input.pad = 4
  c.input.shuffle_buffer = 512
  c.model.backbone = 'vit_t16'
  c.model.width = 32                # half the published 192 channels: CPU-sized
  c.train.batch_size = 64           # P = 16 identities x K = 4
  c.train.num_epochs = 30
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 100
  c.train.eval_every_epochs = 15
  c.optim.optimizer = 'adamw'
  c.optim.schedule = 'cosine'
  c.optim.cosine_epochs = c.train.num_epochs
  c.optim.base_lr = 1e-3            # from scratch: a larger step than a fine-tuning run's
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 3
  c.optim.warmup_factor = 0.01
  c.eval.batch_size = 128
  return c
