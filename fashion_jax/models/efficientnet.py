"""EfficientNet-B2 / -B4 (Tan & Le, EfficientNet: Rethinking Model Scaling for CNNs, 2019), NHWC.

The architecture and module names follow torchvision's `efficientnet_b2` / `efficientnet_b4`
(`features.{stage}.{block}.block.{layer}`), so their ImageNet checkpoints map one to one
(`torch_name`). Padding is symmetric, (k - 1) // 2, as in torchvision (not TensorFlow's 'SAME').
The backbone ends after `features.8`, the 1x1 head convolution; torchvision's dropout and
`classifier` are replaced by the ReID head.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from fashion_jax.models.base import Backbone
from fashion_jax.models.layers import BatchNorm
from fashion_jax.models.resnet import CONV_INIT, TORCH_LEAF

# EfficientNet-B0's MBConv stages (the paper's Table 1): (expand ratio, kernel, stride,
# input channels, output channels, blocks). The others scale channels and block counts.
B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# (width multiplier, depth multiplier) per variant.
EFFICIENTNET_SCALES = {'b2': (1.1, 1.2), 'b4': (1.4, 1.8)}
# The last stage whose first block has stride 2 (index into B0_STAGES): `last_stride` sets it.
LAST_STRIDED_STAGE = 5


def make_divisible(value: float, divisor: int = 8) -> int:
  """Channels rounded to the nearest multiple of `divisor`, never more than 10% below `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def stage_settings(variant: str, last_stride: int = 2) -> list[tuple[int, int, int, int, int, int]]:
  """B0_STAGES scaled for `variant`: channels by make_divisible(c * width), blocks by
  ceil(n * depth); the stride of stage LAST_STRIDED_STAGE replaced by `last_stride`."""
  width, depth = EFFICIENTNET_SCALES[variant]
  stages = []
  for index, (expand, kernel, stride, cin, cout, blocks) in enumerate(B0_STAGES):
    if index == LAST_STRIDED_STAGE:
      stride = last_stride
    stages.append((expand, kernel, stride, make_divisible(cin * width),
                   make_divisible(cout * width), int(math.ceil(blocks * depth))))
  return stages


def _conv(in_ch, out_ch, kernel, *, stride=1, groups=1, use_bias=False, rngs, dtype):
  pad = (kernel - 1) // 2
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                  use_bias=use_bias, kernel_init=CONV_INIT, dtype=dtype,
                  param_dtype=jnp.float32, rngs=rngs)


class ConvNormAct(nnx.Module):
  """conv (no bias) -> BatchNorm -> optional SiLU: torchvision's Conv2dNormActivation."""

  def __init__(self, in_ch, out_ch, kernel, *, stride=1, groups=1, act=True, rngs, dtype,
               axis_name):
    self.conv = _conv(in_ch, out_ch, kernel, stride=stride, groups=groups, rngs=rngs, dtype=dtype)
    self.bn = BatchNorm(out_ch, axis_name=axis_name)
    self.act = act

  def __call__(self, x, *, train):
    x = self.bn(self.conv(x), train=train)
    return jax.nn.silu(x) if self.act else x


class SqueezeExcitation(nnx.Module):
  """x * sigmoid(fc2(silu(fc1(GAP(x))))); fc1/fc2 are 1x1 convs with bias."""

  def __init__(self, channels, squeeze, *, rngs, dtype):
    self.fc1 = _conv(channels, squeeze, 1, use_bias=True, rngs=rngs, dtype=dtype)
    self.fc2 = _conv(squeeze, channels, 1, use_bias=True, rngs=rngs, dtype=dtype)

  def __call__(self, x, *, train):
    del train
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    return x * jax.nn.sigmoid(self.fc2(jax.nn.silu(self.fc1(pooled))))


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Stochastic depth, per sample: the branch is zeroed with probability `rate`, else scaled by
  1 / (1 - rate), so its expectation is unchanged (torchvision's StochasticDepth, mode 'row')."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


class MBConv(nnx.Module):
  """Inverted residual: [1x1 expand, BN, SiLU] -> depthwise kxk (carries the stride), BN, SiLU
  -> squeeze-excitation (squeeze = input channels / 4) -> 1x1 project, BN; identity shortcut
  when the shape is kept, its branch subject to stochastic depth at `drop_rate`."""

  def __init__(self, in_ch, out_ch, *, expand, kernel, stride, drop_rate, rngs, dtype, axis_name):
    kw = dict(rngs=rngs, dtype=dtype, axis_name=axis_name)
    hidden = make_divisible(in_ch * expand)
    layers = []
    if hidden != in_ch:
      layers.append(ConvNormAct(in_ch, hidden, 1, **kw))
    layers.append(ConvNormAct(hidden, hidden, kernel, stride=stride, groups=hidden, **kw))
    layers.append(SqueezeExcitation(hidden, max(1, in_ch // 4), rngs=rngs, dtype=dtype))
    layers.append(ConvNormAct(hidden, out_ch, 1, act=False, **kw))
    self.block = nnx.List(layers)
    self.residual = stride == 1 and in_ch == out_ch
    self.drop_rate = drop_rate

  def __call__(self, x, *, train, key=None):
    out = x
    for layer in self.block:
      out = layer(out, train=train)
    if not self.residual:
      return out
    if train and self.drop_rate > 0:
      if key is None:
        raise ValueError(f'stochastic depth (rate {self.drop_rate:g}) needs a random key in '
                         'training: call the backbone with key=...')
      out = drop_path(out, self.drop_rate, key)
    return out + x


class EfficientNet(nnx.Module):
  """EfficientNet `variant` ('b2' or 'b4'): images [B, H, W, 3] -> [B, H/s, W/s, out_features].

  `last_stride` is the stride of the last stride-2 stage (`features.6`, whose first block's
  depthwise conv downsamples): 2 gives s = 32 as published, 1 keeps that stage at the previous
  resolution, s = 16 (what "last stride 1" means for ResNets). Parameters are the same either way.
  `drop_path_rate` scales stochastic depth: block i of N drops its branch with probability
  drop_path_rate * i / N (torchvision trains ImageNet with 0.2). It acts only in training calls,
  which must then pass `key`; 0 (the default) switches it off.
  """

  def __init__(self, variant: str, *, last_stride: int = 2, drop_path_rate: float = 0.0,
               dtype=jnp.float32, axis_name: str | None = None, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, axis_name=axis_name)
    stages = stage_settings(variant, last_stride)
    total_blocks = sum(s[-1] for s in stages)
    self.dtype = dtype
    self.drop_path_rate = drop_path_rate
    features = [ConvNormAct(3, stages[0][3], 3, stride=2, **kw)]
    block_id = 0
    for expand, kernel, stride, cin, cout, num_blocks in stages:
      blocks = []
      for b in range(num_blocks):
        blocks.append(MBConv(cin if b == 0 else cout, cout, expand=expand, kernel=kernel,
                             stride=stride if b == 0 else 1,
                             drop_rate=drop_path_rate * block_id / total_blocks, **kw))
        block_id += 1
      features.append(nnx.List(blocks))
    last_in = stages[-1][4]
    features.append(ConvNormAct(last_in, 4 * last_in, 1, **kw))
    self.features = nnx.List(features)
    self.out_features = 4 * last_in

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    stem, *stages, head = self.features
    x = stem(x.astype(self.dtype), train=train)
    block_id = 0
    for stage in stages:
      for block in stage:
        block_key = None if key is None else jax.random.fold_in(key, block_id)
        x = block(x, train=train, key=block_key)
        block_id += 1
    return head(x, train=train)


def torch_name(path: str) -> str:
  """Flax variable path -> torchvision state_dict key: a ConvNormAct's `conv` / `bn` are its
  Sequential indices 0 / 1, e.g. 'features.2.0.block.1.bn.mean' ->
  'features.2.0.block.1.1.running_mean'; 'features.1.0.block.1.fc1.kernel' keeps its names."""
  *modules, leaf = path.split('.')
  modules = [{'conv': '0', 'bn': '1'}.get(m, m) for m in modules]
  return '.'.join(modules + [TORCH_LEAF[leaf]])


BACKBONES = tuple(
    Backbone(name=f'efficientnet_{variant}', family='efficientnet',
             build=functools.partial(EfficientNet, variant), torch_name=torch_name,
             options=('last_stride', 'drop_path_rate'), arch={'variant': variant})
    for variant in EFFICIENTNET_SCALES)
