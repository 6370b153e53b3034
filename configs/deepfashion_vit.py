"""DeepFashion Consumer-to-shop with a Vision Transformer: ViT-B/16 from OpenAI's CLIP image
tower, 256x256, fine-tuned with AdamW (no decay on norms, biases, positions and the class
token), layer-wise learning-rate decay 0.75, 5 warmup epochs then a cosine; the paper's losses
(quadruplet + label-smoothed cross-entropy + center loss), 60 epochs, bfloat16 compute.

Needs the `deepfashion_consumer2shop` TFDS dataset built from your own download
(docs/datasets.md) and the converted CLIP weights (docs/models.md, 'Vision Transformers' says
where to get the file):

  python -m fashion_jax.convert_weights --arch vit_b16_clip_quickgelu \
      --src open_clip_pytorch_model.bin --out weights/vit_b16_clip_openai
  python -m fashion_jax.main --config configs/deepfashion_vit.py --workdir runs/df_vit \
      --config.dataset.data_dir=/path/to/tensorflow_datasets

LAION or DataComp CLIP weights (GELU): add --config.model.backbone=vit_b16_clip and point
--config.model.pretrained at their converted directory. Not yet measured on DeepFashion.
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'deepfashion_consumer2shop'
  c.input.image_size = (256, 256)   # 16 x 16 patches; the 14 x 14 CLIP grid is resampled
  c.model.backbone = 'vit_b16_clip_quickgelu'
  c.model.pretrained = 'weights/vit_b16_clip_openai'
  c.model.dtype = 'bfloat16'
  c.model.drop_path_rate = 0.1
  c.loss.metric = 'quadruplet'
  c.train.batch_size = 64
  c.train.num_epochs = 60
  c.train.eval_every_epochs = 20
  c.optim.optimizer = 'adamw'
  c.optim.schedule = 'cosine'
  c.optim.cosine_epochs = c.train.num_epochs
  c.optim.base_lr = 1e-4            # the head's; block i of 12 gets 0.75 ** (12 - i) of it
  c.optim.layer_decay = 0.75
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 5
  c.optim.final_lr_factor = 0.01
  return c
