"""Exact Street2Shop with a Vision Transformer: ViT-B/16 from OpenAI's CLIP image tower,
256x256, fine-tuned with AdamW (no decay on norms, biases, positions and the class token),
layer-wise learning-rate decay 0.75, 5 warmup epochs then a cosine; the paper's losses
(quadruplet + label-smoothed cross-entropy + center loss), 60 epochs, bfloat16 compute.

Needs the `street2shop` TFDS dataset built from your own download (docs/datasets.md) and the
converted CLIP weights (docs/models.md, 'Vision Transformers' says where to get the file):

  python -m fashion_jax.convert_weights --arch vit_b16_clip_quickgelu \
      --src open_clip_pytorch_model.bin --out weights/vit_b16_clip_openai
  python -m fashion_jax.main --config configs/street2shop_vit.py --workdir runs/s2s_vit \
      --config.dataset.data_dir=/path/to/tensorflow_datasets

LAION or DataComp CLIP weights (GELU): add --config.model.backbone=vit_b16_clip and point
--config.model.pretrained at their converted directory. Not yet measured on Street2Shop.
"""

from fashion_jax import configlib


def get_config():
  return configlib.clip_vit_config('street2shop')
