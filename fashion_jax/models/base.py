"""What the rest of the code knows about a backbone: one `Backbone` entry per selectable name.

A backbone module maps normalised images [B, H, W, 3] to features and is called as
`module(images, train=..., key=...)`; `key` (None outside training) drives its stochastic layers,
and a backbone without any ignores it. The entry's `pool` turns those features into [B, F].
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# The build options a config can set (model.<option>); a backbone that does not take one needs
# it at its neutral value. `last_stride` has none: a backbone without a strided last stage (OSNet)
# ignores it.
NEUTRAL_OPTIONS = {'width': 64, 'drop_path_rate': 0.0, 'attention': 'xla'}


def global_average_pool(features: jax.Array) -> jax.Array:
  """Feature map [B, h, w, F] -> [B, F] float32: the strong baseline's GAP."""
  return jnp.mean(features.astype(jnp.float32), axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A registered backbone.

  Attributes:
    name: the `model.backbone` value, e.g. 'resnet50_ibn_a'.
    family: the implementation it belongs to ('resnet', 'efficientnet', ...).
    build: build(**options, dtype, axis_name, rngs) -> nnx.Module with `out_features`; it gets
      exactly the options named in `options`.
    torch_name: Flax variable path -> the PyTorch state_dict key of the reference code, for
      `fashion_jax.convert_weights`.
    pool: the backbone's output -> [B, out_features] float32 (the global feature f_t).
    pools: other poolings the backbone offers, by name (`model.pool`; e.g. a ViT's 'token' and
      'mean'); empty when `pool` is the only one.
    options: which of 'last_stride', 'width', 'drop_path_rate' the backbone takes.
    arch: facts of the family that other code may need (e.g. {'depth': 50, 'ibn': 'a'}).
  """
  name: str
  family: str
  build: Callable[..., nnx.Module]
  torch_name: Callable[[str], str]
  pool: Callable[[jax.Array], jax.Array] = global_average_pool
  pools: Mapping[str, Callable[[jax.Array], jax.Array]] = dataclasses.field(default_factory=dict)
  options: tuple[str, ...] = ('last_stride',)
  arch: Mapping[str, Any] = dataclasses.field(default_factory=dict)
