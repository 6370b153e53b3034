"""OSNet-AIN (Zhou et al., Learning Generalisable Omni-Scale Representations for Person Re-ID).

Module names mirror torchreid's `osnet_ain.py` so its checkpoints map one to one (`torch_name`).
The backbone ends at `conv5` (the feature map); torchreid's `fc` / `classifier` head is not used.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fashion_jax.models.base import Backbone
from fashion_jax.models.layers import BatchNorm, InstanceNorm
from fashion_jax.models.pooling import max_pool
from fashion_jax.models.resnet import CONV_INIT, TORCH_LEAF

# osnet_ain_x1_0: per stage, whether each of its 2 blocks is the IN variant; and the widths.
OSNET_AIN_BLOCKS = ((True, True), (False, True), (True, False))
OSNET_AIN_CHANNELS = (64, 256, 384, 512)


def _conv(in_ch, out_ch, kernel, *, stride=1, groups=1, use_bias=False, rngs, dtype):
  pad = kernel // 2
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                  use_bias=use_bias, kernel_init=CONV_INIT, dtype=dtype,
                  param_dtype=jnp.float32, rngs=rngs)


class ConvLayer(nnx.Module):
  """conv -> BatchNorm (or affine InstanceNorm) -> optional ReLU: torchreid's ConvLayer,
  Conv1x1 and (relu=False) Conv1x1Linear; `norm=None` is Conv1x1Linear(bn=False)."""

  def __init__(self, in_ch, out_ch, kernel=1, *, stride=1, norm='bn', relu=True, rngs, dtype,
               axis_name):
    self.conv = _conv(in_ch, out_ch, kernel, stride=stride, rngs=rngs, dtype=dtype)
    if norm == 'bn':
      self.bn = BatchNorm(out_ch, axis_name=axis_name)
    elif norm == 'in':
      self.bn = InstanceNorm(out_ch)
    else:
      self.bn = None
    self.relu = relu

  def __call__(self, x, *, train):
    x = self.conv(x)
    if self.bn is not None:
      x = self.bn(x, train=train)
    return jax.nn.relu(x) if self.relu else x


class LightConv3x3(nnx.Module):
  """1x1 conv (linear), depthwise 3x3 conv, BatchNorm, ReLU."""

  def __init__(self, in_ch, out_ch, *, rngs, dtype, axis_name):
    self.conv1 = _conv(in_ch, out_ch, 1, rngs=rngs, dtype=dtype)
    self.conv2 = _conv(out_ch, out_ch, 3, groups=out_ch, rngs=rngs, dtype=dtype)
    self.bn = BatchNorm(out_ch, axis_name=axis_name)

  def __call__(self, x, *, train):
    return jax.nn.relu(self.bn(self.conv2(self.conv1(x)), train=train))


class LightConvStream(nnx.Module):
  """`depth` stacked LightConv3x3: receptive field 1 + 2 * depth (one scale of the block)."""

  def __init__(self, channels, depth, *, rngs, dtype, axis_name):
    self.layers = nnx.List([LightConv3x3(channels, channels, rngs=rngs, dtype=dtype,
                                         axis_name=axis_name) for _ in range(depth)])

  def __call__(self, x, *, train):
    for layer in self.layers:
      x = layer(x, train=train)
    return x


class ChannelGate(nnx.Module):
  """Unified aggregation gate, shared by all streams: x * sigmoid(fc2(relu(fc1(GAP(x)))))."""

  def __init__(self, channels, *, reduction=16, rngs, dtype):
    self.fc1 = _conv(channels, channels // reduction, 1, use_bias=True, rngs=rngs, dtype=dtype)
    self.fc2 = _conv(channels // reduction, channels, 1, use_bias=True, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    return x * jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(pooled))))


class OSBlock(nnx.Module):
  """Omni-scale residual block with T = 4 streams; `instance_norm` makes it OSBlockINin (affine
  IN on the residual branch, replacing conv3's BatchNorm)."""

  def __init__(self, in_ch, out_ch, *, instance_norm: bool, rngs, dtype, axis_name):
    mid = out_ch // 4
    kw = dict(rngs=rngs, dtype=dtype, axis_name=axis_name)
    self.conv1 = ConvLayer(in_ch, mid, **kw)
    self.conv2 = nnx.List([LightConvStream(mid, t, **kw) for t in range(1, 5)])
    self.gate = ChannelGate(mid, rngs=rngs, dtype=dtype)
    self.conv3 = ConvLayer(mid, out_ch, norm=None if instance_norm else 'bn', relu=False, **kw)
    self.IN = InstanceNorm(out_ch) if instance_norm else None
    self.downsample = ConvLayer(in_ch, out_ch, relu=False, **kw) if in_ch != out_ch else None

  def __call__(self, x, *, train):
    x1 = self.conv1(x, train=train)
    x2 = sum(self.gate(stream(x1, train=train)) for stream in self.conv2)
    x3 = self.conv3(x2, train=train)
    if self.IN is not None:
      x3 = self.IN(x3)
    identity = x if self.downsample is None else self.downsample(x, train=train)
    return jax.nn.relu(x3 + identity)


class OSNetAIN(nnx.Module):
  """osnet_ain_x1_0 feature extractor: images [B, H, W, 3] -> [B, H/16, W/16, 512].

  OSNet has no strided last stage, so there is no last-stride option.
  """

  def __init__(self, *, dtype=jnp.float32, axis_name: str | None = None, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=dtype, axis_name=axis_name)
    c = OSNET_AIN_CHANNELS
    self.dtype = dtype
    self.conv1 = ConvLayer(3, c[0], 7, stride=2, norm='in', **kw)
    for stage, blocks in enumerate(OSNET_AIN_BLOCKS):
      ins = (c[stage], c[stage + 1])
      setattr(self, f'conv{stage + 2}', nnx.List(
          [OSBlock(ins[min(i, 1)], c[stage + 1], instance_norm=use_in, **kw)
           for i, use_in in enumerate(blocks)]))
    # pool2 / pool3: a 1x1 ConvLayer then 2x2 average pooling (torch Sequential index 0).
    self.pool2 = nnx.List([ConvLayer(c[1], c[1], **kw)])
    self.pool3 = nnx.List([ConvLayer(c[2], c[2], **kw)])
    self.conv5 = ConvLayer(c[3], c[3], **kw)
    self.out_features = c[3]

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del key  # no stochastic layers
    x = self.conv1(x.astype(self.dtype), train=train)
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for blocks, pool in ((self.conv2, self.pool2), (self.conv3, self.pool3), (self.conv4, None)):
      for block in blocks:
        x = block(x, train=train)
      if pool is not None:
        x = nnx.avg_pool(pool[0](x, train=train), (2, 2), strides=(2, 2))
    return self.conv5(x, train=train)


def torch_name(path: str) -> str:
  """Flax variable path -> torchreid state_dict key: the module path is the same."""
  *modules, leaf = path.split('.')
  return '.'.join(modules + [TORCH_LEAF[leaf]])


BACKBONES = (Backbone(name='osnet_ain_x1_0', family='osnet_ain', build=OSNetAIN,
                      torch_name=torch_name, options=()),)
