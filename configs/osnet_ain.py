"""The paper's second model: OSNet-AIN (x1.0) trained with the classification loss alone
(label-smoothed cross-entropy; no metric or center loss), on Exact Street2Shop.

Start from torchreid's ImageNet weights converted with `fashion_jax.convert_weights`
(docs/models.md), then:

  python -m fashion_jax.main --config configs/osnet_ain.py --workdir runs/s2s_osnet \
      --config.dataset.data_dir=/path/to/tensorflow_datasets \
      --config.model.pretrained=/path/to/osnet_ain_x1_0/backbone.npz
"""

from fashion_jax import configlib


def get_config():
  c = configlib.base_config()
  c.dataset.name = 'street2shop'
  c.model.backbone = 'osnet_ain_x1_0'
  c.loss.metric = 'none'
  c.loss.center_weight = 0.0
  return c
