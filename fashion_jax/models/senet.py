"""SE-ResNeXt backbones (Hu et al., Squeeze-and-Excitation Networks; ResNeXt, Xie et al.), NHWC.

Module names mirror the PyTorch reference that published the ImageNet weights (Cadene's
pretrainedmodels `senet.py`: `layer0`, `se_module.fc1/fc2`), so `resnet.torch_name` maps them.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fashion_jax.models.base import Backbone
from fashion_jax.models.layers import BatchNorm
from fashion_jax.models.pooling import max_pool
from fashion_jax.models.resnet import CONV_INIT, Downsample, conv, torch_name

SE_RESNEXT_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class SEModule(nnx.Module):
  """Channel gating: x * sigmoid(fc2(relu(fc1(GAP(x))))); fc1/fc2 are 1x1 convs with bias."""

  def __init__(self, channels: int, reduction: int, *, rngs: nnx.Rngs, dtype):
    hidden = channels // reduction
    self.fc1 = nnx.Conv(channels, hidden, (1, 1), kernel_init=CONV_INIT, dtype=dtype,
                        param_dtype=jnp.float32, rngs=rngs)
    self.fc2 = nnx.Conv(hidden, channels, (1, 1), kernel_init=CONV_INIT, dtype=dtype,
                        param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # The pooled mean in float32: in bfloat16 a sum over thousands of positions loses digits.
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    return x * jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(pooled))))


class SEResNeXtBottleneck(nnx.Module):
  """ResNeXt bottleneck (grouped 3x3 carries the stride) whose residual branch is SE-gated."""
  expansion = 4

  def __init__(self, in_ch, planes, stride, *, groups, base_width, reduction, rngs, dtype,
               axis_name):
    width = (planes * base_width // 64) * groups
    out_ch = planes * self.expansion
    self.conv1 = conv(in_ch, width, 1, 1, rngs, dtype)
    self.bn1 = BatchNorm(width, axis_name=axis_name)
    self.conv2 = nnx.Conv(width, width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                          feature_group_count=groups, use_bias=False, kernel_init=CONV_INIT,
                          dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.bn2 = BatchNorm(width, axis_name=axis_name)
    self.conv3 = conv(width, out_ch, 1, 1, rngs, dtype)
    self.bn3 = BatchNorm(out_ch, axis_name=axis_name)
    self.se_module = SEModule(out_ch, reduction, rngs=rngs, dtype=dtype)
    needs_proj = stride != 1 or in_ch != out_ch
    self.downsample = (Downsample(in_ch, out_ch, stride, rngs=rngs, dtype=dtype,
                                  axis_name=axis_name) if needs_proj else None)

  def __call__(self, x, *, train):
    out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    out = jax.nn.relu(self.bn2(self.conv2(out), train=train))
    out = self.se_module(self.bn3(self.conv3(out), train=train))
    shortcut = x if self.downsample is None else self.downsample(x, train=train)
    return jax.nn.relu(out + shortcut)


class Stem(nnx.Module):
  """`layer0`: 7x7/2 conv, BatchNorm, ReLU, then 3x3/2 max pooling in PyTorch's ceil mode."""

  def __init__(self, *, rngs, dtype, axis_name):
    self.conv1 = nnx.Conv(3, 64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                          use_bias=False, kernel_init=CONV_INIT, dtype=dtype,
                          param_dtype=jnp.float32, rngs=rngs)
    self.bn1 = BatchNorm(64, axis_name=axis_name)

  def __call__(self, x, *, train):
    x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
    # MaxPool2d(3, 2, ceil_mode=True) without padding: windows start at 0 and a partial last
    # window is kept, i.e. -inf padding on the bottom/right only, and only where needed.
    pads = [(0, max(-(-(n - 3) // 2) * 2 + 3 - n, 0)) for n in x.shape[1:3]]
    return max_pool(x, (3, 3), (2, 2), pads)


class SEResNeXt(nnx.Module):
  """SE-ResNeXt-{50,101} (32x4d): images [B, H, W, 3] -> feature map [B, H/s, W/s, 2048].

  `last_stride` 1 keeps stage 4 at stride 1, so s = 16 instead of 32.
  """

  def __init__(self, depth: int, *, groups: int = 32, base_width: int = 4, reduction: int = 16,
               last_stride: int = 2, dtype=jnp.float32, axis_name: str | None = None,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.layer0 = Stem(rngs=rngs, dtype=dtype, axis_name=axis_name)
    in_ch = 64
    for stage, (num_blocks, stride) in enumerate(zip(SE_RESNEXT_LAYERS[depth],
                                                     (1, 2, 2, last_stride))):
      planes = 64 * 2 ** stage
      blocks = []
      for b in range(num_blocks):
        blocks.append(SEResNeXtBottleneck(in_ch, planes, stride if b == 0 else 1, groups=groups,
                                          base_width=base_width, reduction=reduction, rngs=rngs,
                                          dtype=dtype, axis_name=axis_name))
        in_ch = planes * SEResNeXtBottleneck.expansion
      setattr(self, f'layer{stage + 1}', nnx.List(blocks))
    self.out_features = in_ch

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    del key  # no stochastic layers
    x = self.layer0(x.astype(self.dtype), train=train)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x, train=train)
    return x


BACKBONES = tuple(
    Backbone(name=f'se_resnext{depth}_32x4d', family='se_resnext',
             build=functools.partial(SEResNeXt, depth), torch_name=torch_name,
             arch={'depth': depth})
    for depth in SE_RESNEXT_LAYERS)
