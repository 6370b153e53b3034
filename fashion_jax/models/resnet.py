"""ResNet backbones, plain or with IBN-a / IBN-b normalisation (IBN-Net, Pan et al. 2018), NHWC.

Module names mirror torchvision / IBN-Net (`conv1`, `bn1`, `layer1..4`, `downsample`, `IN`) so that
PyTorch checkpoints map onto them one to one (see `torch_name`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fashion_jax.models.base import Backbone
from fashion_jax.models.layers import (IBN, BatchNorm, InstanceNorm, conv_padded_channels,
                                       stem_channel_multiple)
from fashion_jax.models.pooling import max_pool


def kaiming_normal_fan_out(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """torchvision's init for convolutions: N(0, 2 / fan_out), fan_out = kh * kw * out channels.

  The normal draws are made by NumPy, seeded by `key`: drawing them with jax.random compiles
  one program per kernel shape, which made building ResNet-50 take 18 s on a CPU, and
  EfficientNet-B2 43 s, against 2 and 3 s this way. Under tracing (eval_shape, jit), where the
  key has no value, they come from jax.random: the same distribution, other numbers.
  """
  std = np.sqrt(2.0 / (int(np.prod(shape[:-2])) * shape[-1]))
  if isinstance(key, jax.core.Tracer):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  generator = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  return jnp.asarray(np.float32(std) * generator.standard_normal(shape, np.float32), dtype)


CONV_INIT = kaiming_normal_fan_out


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  block: str  # 'basic' or 'bottleneck'
  layers: tuple[int, int, int, int]


# IBN-Net's ibn_cfg: which IBN type each of the 4 stages uses.
IBN_CFGS = {
    None: (None, None, None, None),
    'a': ('a', 'a', 'a', None),
    'b': ('b', 'b', None, None),
}

RESNET_SPECS = {
    10: ResNetSpec('basic', (1, 1, 1, 1)),
    18: ResNetSpec('basic', (2, 2, 2, 2)),
    34: ResNetSpec('basic', (3, 4, 6, 3)),
    50: ResNetSpec('bottleneck', (3, 4, 6, 3)),
    101: ResNetSpec('bottleneck', (3, 4, 23, 3)),
    152: ResNetSpec('bottleneck', (3, 8, 36, 3)),
}


def conv(in_ch: int, out_ch: int, kernel: int, stride: int, rngs: nnx.Rngs, dtype) -> nnx.Conv:
  pad = kernel // 2
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=CONV_INIT,
                  dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Downsample(nnx.Module):
  """The projection shortcut: 1x1 conv with stride, then BatchNorm (torch `downsample.0/.1`)."""

  def __init__(self, in_ch, out_ch, stride, *, rngs, dtype, axis_name):
    self.conv = conv(in_ch, out_ch, 1, stride, rngs, dtype)
    self.bn = BatchNorm(out_ch, axis_name=axis_name)

  def __call__(self, x, *, train):
    return self.bn(self.conv(x), train=train)


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_ch, planes, stride, *, ibn: str | None, rngs, dtype, axis_name):
    self.conv1 = conv(in_ch, planes, 3, stride, rngs, dtype)
    self.bn1 = (IBN(planes, axis_name=axis_name) if ibn == 'a'
                else BatchNorm(planes, axis_name=axis_name))
    self.conv2 = conv(planes, planes, 3, 1, rngs, dtype)
    self.bn2 = BatchNorm(planes, axis_name=axis_name)
    self.IN = InstanceNorm(planes) if ibn == 'b' else None
    needs_proj = stride != 1 or in_ch != planes
    self.downsample = (Downsample(in_ch, planes, stride, rngs=rngs, dtype=dtype, axis_name=axis_name)
                       if needs_proj else None)

  def __call__(self, x, *, train):
    out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    out = self.bn2(self.conv2(out), train=train)
    shortcut = x if self.downsample is None else self.downsample(x, train=train)
    return _finish(self, out + shortcut)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (carries the stride, as in torchvision v1.5 and IBN-Net) -> 1x1, expansion 4.

  `ibn` 'a': `bn1` is an IBN layer; 'b': InstanceNorm (`IN`) on the residual sum, before the ReLU.
  """
  expansion = 4

  def __init__(self, in_ch, planes, stride, *, ibn: str | None, rngs, dtype, axis_name):
    out_ch = planes * self.expansion
    self.conv1 = conv(in_ch, planes, 1, 1, rngs, dtype)
    self.bn1 = (IBN(planes, axis_name=axis_name) if ibn == 'a'
                else BatchNorm(planes, axis_name=axis_name))
    self.conv2 = conv(planes, planes, 3, stride, rngs, dtype)
    self.bn2 = BatchNorm(planes, axis_name=axis_name)
    self.conv3 = conv(planes, out_ch, 1, 1, rngs, dtype)
    self.bn3 = BatchNorm(out_ch, axis_name=axis_name)
    self.IN = InstanceNorm(out_ch) if ibn == 'b' else None
    needs_proj = stride != 1 or in_ch != out_ch
    self.downsample = (Downsample(in_ch, out_ch, stride, rngs=rngs, dtype=dtype, axis_name=axis_name)
                       if needs_proj else None)

  def __call__(self, x, *, train):
    out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    out = jax.nn.relu(self.bn2(self.conv2(out), train=train))
    out = self.bn3(self.conv3(out), train=train)
    shortcut = x if self.downsample is None else self.downsample(x, train=train)
    return _finish(self, out + shortcut)


def _finish(block, x):
  """A block's end: IBN-b's InstanceNorm on the residual sum (where present), then ReLU."""
  if block.IN is not None:
    x = block.IN(x)
  return jax.nn.relu(x)


class ResNet(nnx.Module):
  """ResNet feature extractor: images [B, H, W, 3] -> feature map [B, H/s, W/s, out_features].

  `ibn` None, 'a' or 'b' selects IBN-Net's ibn_cfg (`IBN_CFGS`). IBN-b also swaps the stem's
  BatchNorm for InstanceNorm. `last_stride` 1 keeps stage 4 at stride 1, so s = 16 instead of 32.
  """

  def __init__(self, depth: int, *, ibn: str | None = None,
               last_stride: int = 2, width: int = 64, dtype=jnp.float32,
               axis_name: str | None = None, rngs: nnx.Rngs):
    spec = RESNET_SPECS[depth]
    ibn_cfg = IBN_CFGS[ibn]
    block_cls = BasicBlock if spec.block == 'basic' else Bottleneck
    self.dtype = dtype
    self.conv1 = nnx.Conv(3, width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                          use_bias=False, kernel_init=CONV_INIT, dtype=dtype,
                          param_dtype=jnp.float32, rngs=rngs)
    self.bn1 = (InstanceNorm(width) if ibn_cfg[0] == 'b'
                else BatchNorm(width, axis_name=axis_name))
    in_ch = width
    strides = (1, 2, 2, last_stride)
    for stage, (num_blocks, stride, stage_ibn) in enumerate(zip(spec.layers, strides, ibn_cfg)):
      planes = width * 2 ** stage
      blocks = []
      for b in range(num_blocks):
        blocks.append(block_cls(in_ch, planes, stride if b == 0 else 1,
                                ibn=_block_ibn(stage_ibn, b, num_blocks), rngs=rngs,
                                dtype=dtype, axis_name=axis_name))
        in_ch = planes * block_cls.expansion
      setattr(self, f'layer{stage + 1}', nnx.List(blocks))
    self.out_features = in_ch

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del key  # no stochastic layers
    # The image's 3 channels are padded with zeros for cuDNN's tensor cores where that helps.
    x = conv_padded_channels(self.conv1, x.astype(self.dtype), stem_channel_multiple(self.dtype))
    x = jax.nn.relu(self.bn1(x, train=train))
    # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as pooling.max_pool does.
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x, train=train)
    return x


def _block_ibn(stage_ibn: str | None, index: int, num_blocks: int) -> str | None:
  """IBN-Net's rule: IBN-b's IN only in the last block of a stage, and never in its first."""
  if stage_ibn == 'b':
    return 'b' if 0 < index == num_blocks - 1 else None
  return stage_ibn


def torch_name(path: str) -> str:
  """Flax variable path -> its PyTorch state_dict key (torchvision / IBN-Net naming), e.g.
  'layer1.0.downsample.conv.kernel' -> 'layer1.0.downsample.0.weight'."""
  *modules, leaf = path.split('.')
  if len(modules) >= 2 and modules[-2] == 'downsample':
    modules[-1] = {'conv': '0', 'bn': '1'}[modules[-1]]
  return '.'.join(modules + [TORCH_LEAF[leaf]])


TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}


def _entry(depth: int, ibn: str | None) -> Backbone:
  return Backbone(name=f'resnet{depth}' + ('' if ibn is None else f'_ibn_{ibn}'), family='resnet',
                  build=functools.partial(ResNet, depth, ibn=ibn), torch_name=torch_name,
                  options=('last_stride', 'width'), arch={'depth': depth, 'ibn': ibn})


BACKBONES = tuple(_entry(depth, ibn) for depth in RESNET_SPECS for ibn in IBN_CFGS)
