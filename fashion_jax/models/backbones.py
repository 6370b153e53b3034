"""The backbone zoo: every backbone selectable by name in `config.model.backbone`.

A name parses into a `BackboneSpec`; `build_backbone` turns it into a module with `out_features`.
"""

import dataclasses
import re
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from fashion_jax.models import efficientnet, osnet, resnet
from fashion_jax.models.efficientnet import EFFICIENTNET_SCALES, EfficientNet
from fashion_jax.models.osnet import OSNetAIN
from fashion_jax.models.resnet import IBN_CFGS, RESNET_SPECS, ResNet
from fashion_jax.models.senet import SE_RESNEXT_LAYERS, SEResNeXt

_RESNET_RE = re.compile(r'^resnet(\d+)(?:_ibn_([ab]))?$')
_SE_RESNEXT_RE = re.compile(r'^se_resnext(\d+)_32x4d$')
_EFFICIENTNET_RE = re.compile(r'^efficientnet_(b\d)$')


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  name: str
  depth: int | None         # None for OSNet and EfficientNet
  ibn: str | None           # IBN-Net's variant: None, 'a' or 'b'
  family: str = 'resnet'    # 'resnet', 'se_resnext', 'osnet_ain' or 'efficientnet'


def backbone_names() -> list[str]:
  resnets = [f'resnet{d}{"" if v is None else "_ibn_" + v}' for d in RESNET_SPECS for v in IBN_CFGS]
  return (resnets + [f'se_resnext{d}_32x4d' for d in SE_RESNEXT_LAYERS]
          + [f'efficientnet_{v}' for v in EFFICIENTNET_SCALES] + ['osnet_ain_x1_0'])


def parse_backbone(name: str) -> BackboneSpec:
  """'resnet50_ibn_a' -> BackboneSpec('resnet50_ibn_a', 50, 'a'). ValueError names the choices."""
  match = _RESNET_RE.match(name)
  if match and int(match.group(1)) in RESNET_SPECS:
    return BackboneSpec(name, int(match.group(1)), match.group(2))
  match = _SE_RESNEXT_RE.match(name)
  if match and int(match.group(1)) in SE_RESNEXT_LAYERS:
    return BackboneSpec(name, int(match.group(1)), None, 'se_resnext')
  match = _EFFICIENTNET_RE.match(name)
  if match and match.group(1) in EFFICIENTNET_SCALES:
    return BackboneSpec(name, None, None, 'efficientnet')
  if name == 'osnet_ain_x1_0':
    return BackboneSpec(name, None, None, 'osnet_ain')
  raise ValueError(f'unknown backbone {name!r}; choose one of {", ".join(backbone_names())}')


def build_backbone(name: str, *, last_stride: int = 2, width: int = 64, dtype=jnp.float32,
                   axis_name: str | None = None, drop_path_rate: float = 0.0,
                   rngs: nnx.Rngs) -> nnx.Module:
  """The backbone `name`: normalised images [B, H, W, 3] -> feature map [B, h, w, out_features].

  OSNet-AIN has no strided last stage: `last_stride` does not apply to it (always 1/16). For
  EfficientNet it is the stride of the last stride-2 stage (`features.6`). `drop_path_rate`
  (stochastic depth) exists in EfficientNet only, as in its reference; a backbone built with
  it > 0 must be called with `key=` in training.
  """
  spec = parse_backbone(name)
  if spec.family != 'resnet' and width != 64:
    # The published architectures fix their widths (e.g. 32 groups x 4 channels); no knob.
    raise ValueError(f'model.width must be 64 for {name}, got {width}')
  if not 0.0 <= drop_path_rate < 1.0:
    raise ValueError(f'model.drop_path_rate must be in [0, 1), got {drop_path_rate}')
  if drop_path_rate and spec.family != 'efficientnet':
    raise ValueError(f'model.drop_path_rate (stochastic depth) applies to EfficientNet '
                     f'backbones only, not {name}')
  if spec.family == 'osnet_ain':
    return OSNetAIN(dtype=dtype, axis_name=axis_name, rngs=rngs)
  if spec.family == 'efficientnet':
    return EfficientNet(name.removeprefix('efficientnet_'), last_stride=last_stride, dtype=dtype,
                        axis_name=axis_name, drop_path_rate=drop_path_rate, rngs=rngs)
  if spec.family == 'se_resnext':
    return SEResNeXt(spec.depth, last_stride=last_stride, dtype=dtype, axis_name=axis_name,
                     rngs=rngs)
  return ResNet(spec.depth, ibn=spec.ibn, last_stride=last_stride, width=width, dtype=dtype,
                axis_name=axis_name, rngs=rngs)


def torch_name_fn(name: str) -> Callable[[str], str]:
  """Flax variable path -> PyTorch state_dict key, in the naming of `name`'s reference code."""
  return {'osnet_ain': osnet.torch_name, 'efficientnet': efficientnet.torch_name}.get(
      parse_backbone(name).family, resnet.torch_name)
