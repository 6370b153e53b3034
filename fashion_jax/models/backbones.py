"""The backbone registry: every backbone selectable by name in `config.model.backbone`.

Each family module lists its `BACKBONES` (`models/base.py`'s `Backbone` entries); adding a family
is one new module and one line in `FAMILIES`. The model, the weight converter, the config check
and the docs all read this table.
"""

import jax.numpy as jnp
from flax import nnx

from fashion_jax.models import efficientnet, osnet, resnet, senet, vit
from fashion_jax.models.base import NEUTRAL_OPTIONS, Backbone
from fashion_jax.models.vit import ATTENTION

FAMILIES = (resnet, senet, efficientnet, osnet, vit)

_REGISTRY: dict[str, Backbone] = {}


def register(entry: Backbone) -> Backbone:
  """Adds `entry` to the table (its name must be new); returns it."""
  if entry.name in _REGISTRY:
    raise ValueError(f'backbone {entry.name!r} is already registered')
  unknown = set(entry.options) - {'last_stride', *NEUTRAL_OPTIONS}
  if unknown:
    raise ValueError(f'backbone {entry.name!r} declares unknown options {sorted(unknown)}')
  _REGISTRY[entry.name] = entry
  return entry


def unregister(name: str) -> None:
  _REGISTRY.pop(name, None)


for _family in FAMILIES:
  for _entry in _family.BACKBONES:
    register(_entry)


def backbone_names() -> list[str]:
  return list(_REGISTRY)


def get_backbone(name: str) -> Backbone:
  """The registry entry of `name`. ValueError names the choices."""
  if name not in _REGISTRY:
    raise ValueError(f'unknown backbone {name!r}; choose one of {", ".join(_REGISTRY)}')
  return _REGISTRY[name]


def check_options(name: str, *, width: int = 64, drop_path_rate: float = 0.0,
                  attention: str = 'xla') -> Backbone:
  """One-line ValueError for options `name` cannot take or out of range; returns the entry."""
  entry = get_backbone(name)
  if not 0.0 <= drop_path_rate < 1.0:
    raise ValueError(f'model.drop_path_rate must be in [0, 1), got {drop_path_rate}')
  if width <= 0:
    raise ValueError(f'model.width must be positive, got {width}')
  if attention not in ATTENTION:
    raise ValueError(f'model.attention {attention!r} is not one of {", ".join(ATTENTION)}')
  values = {'width': width, 'drop_path_rate': drop_path_rate, 'attention': attention}
  for option, neutral in NEUTRAL_OPTIONS.items():
    if option in entry.options or values[option] == neutral:
      continue
    if option == 'width':
      # The published architectures fix their widths (e.g. 32 groups x 4 channels); no knob.
      raise ValueError(f'model.width must be 64 for {name}, got {width}')
    takers = ', '.join(n for n, e in _REGISTRY.items() if option in e.options)
    raise ValueError(f'model.{option} applies only to the backbones that take it ({takers}), '
                     f'not {name}')
  return entry


def build_backbone(name: str, *, last_stride: int = 2, width: int = 64, dtype=jnp.float32,
                   axis_name: str | None = None, drop_path_rate: float = 0.0,
                   attention: str = 'xla', rngs: nnx.Rngs) -> nnx.Module:
  """The backbone `name`: normalised images [B, H, W, 3] -> its features (see `Backbone.pool`).

  Options a backbone does not take must stay neutral (width 64, drop_path_rate 0); OSNet-AIN has
  no strided last stage and ignores `last_stride` (always 1/16). For EfficientNet it is the
  stride of the last stride-2 stage (`features.6`). A backbone built with `drop_path_rate` > 0
  (stochastic depth) must be called with `key=` in training.
  """
  entry = check_options(name, width=width, drop_path_rate=drop_path_rate, attention=attention)
  values = {'last_stride': last_stride, 'width': width, 'drop_path_rate': drop_path_rate,
            'attention': attention}
  return entry.build(**{o: values[o] for o in entry.options}, dtype=dtype, axis_name=axis_name,
                     rngs=rngs)
