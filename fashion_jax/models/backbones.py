"""The backbone zoo: every backbone selectable by name in `config.model.backbone`.

A name parses into a `BackboneSpec`; `build_backbone` turns it into a module with `out_features`.
"""

import dataclasses
import re

import jax.numpy as jnp
from flax import nnx

from fashion_jax.models.resnet import IBN_CFGS, RESNET_SPECS, ResNet

_RESNET_RE = re.compile(r'^resnet(\d+)(?:_ibn_([ab]))?$')


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  name: str
  depth: int
  ibn: str | None  # IBN-Net's variant: None, 'a' or 'b'


def backbone_names() -> list[str]:
  return [f'resnet{d}{"" if v is None else "_ibn_" + v}' for d in RESNET_SPECS for v in IBN_CFGS]


def parse_backbone(name: str) -> BackboneSpec:
  """'resnet50_ibn_a' -> BackboneSpec('resnet50_ibn_a', 50, 'a'). ValueError names the choices."""
  match = _RESNET_RE.match(name)
  if not match or int(match.group(1)) not in RESNET_SPECS:
    raise ValueError(f'unknown backbone {name!r}; choose one of {", ".join(backbone_names())}')
  return BackboneSpec(name, int(match.group(1)), match.group(2))


def build_backbone(name: str, *, last_stride: int = 2, width: int = 64, dtype=jnp.float32,
                   axis_name: str | None = None, rngs: nnx.Rngs) -> nnx.Module:
  """The backbone `name`: images [B, H, W, 3] (normalised) -> feature map [B, h, w, out_features]."""
  spec = parse_backbone(name)
  return ResNet(spec.depth, ibn=spec.ibn, last_stride=last_stride, width=width, dtype=dtype,
                axis_name=axis_name, rngs=rngs)
