"""Layers the backbones share: normalisation with PyTorch semantics, so imported weights behave
as in the reference, and the convolution of a stem on few input channels.

BatchNorm here follows torch.nn.BatchNorm (biased variance to normalise, unbiased to update the
running estimate, momentum 0.1), which flax's BatchNorm does not; IBN is IBN-Net's mixed IN/BN layer.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.Module):
  """BatchNorm over all axes but the last: x [..., C].

  Statistics are computed in float32 whatever the input dtype. With `axis_name` set, a training
  call averages the batch statistics over that mapped axis (synchronised BatchNorm).
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               use_bias: bool = True, axis_name: str | None = None):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    # BNNeck freezes the shift at zero: no parameter at all is the same function.
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32)) if use_bias else None
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.momentum = momentum
    self.epsilon = epsilon
    self.axis_name = axis_name

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    # The scope names this layer's operations, forward and backward, in the compiled program's
    # metadata (bench/step_profile.py counts them); it changes nothing else.
    with jax.named_scope('batch_norm'):
      return self._normalise(x, train)

  def _normalise(self, x: jax.Array, train: bool) -> jax.Array:
    if train:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axes)
      mean_sq = jnp.mean(jnp.square(x32), axes)
      count = jnp.asarray(x.size // x.shape[-1], jnp.float32)
      if self.axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
        count = jax.lax.psum(count, self.axis_name)
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
      unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
      self.mean[...] = (1 - self.momentum) * self.mean[...] + self.momentum * jax.lax.stop_gradient(mean)
      self.var[...] = (1 - self.momentum) * self.var[...] + self.momentum * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = self.mean[...], self.var[...]
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    shift = -mean * inv
    if self.bias is not None:
      shift = shift + self.bias[...]
    return (x * inv.astype(x.dtype) + shift.astype(x.dtype)).astype(x.dtype)


class InstanceNorm(nnx.Module):
  """Affine InstanceNorm over the spatial axes of x [B, H, W, C] (no running statistics)."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.epsilon = epsilon

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    # `train` is accepted so IN can stand where a BatchNorm would (IBN-b's stem); without running
    # statistics, training and inference compute the same function.
    del train
    with jax.named_scope('instance_norm'):
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
      var = jnp.var(x32, axis=(1, 2), keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]
      return y.astype(x.dtype)


class IBN(nnx.Module):
  """IBN-a layer: InstanceNorm on the first int(C * ratio) channels, BatchNorm on the rest."""

  def __init__(self, num_features: int, *, ratio: float = 0.5, axis_name: str | None = None):
    self.half = int(num_features * ratio)
    self.IN = InstanceNorm(self.half)
    self.BN = BatchNorm(num_features - self.half, axis_name=axis_name)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    with jax.named_scope('ibn'):
      return jnp.concatenate(
          [self.IN(x[..., :self.half]), self.BN(x[..., self.half:], train=train)], axis=-1)


def stem_channel_multiple(dtype) -> int:
  """What a stem's input channels are padded to a multiple of (1: not padded).

  8 for 16-bit convolutions on GPUs: cuDNN's tensor-core kernels take channels in multiples of
  8, and XLA pads float16 convolutions for them but not bfloat16 ones. On an H200 the
  ResNet50-IBN-A stem (7x7, 3 -> 64 channels, bfloat16, 320x320, batch 64) took 0.91 ms
  forward and 0.58 ms for its kernel's gradient unpadded, 5.7% of the step's device time
  (bench/README.md, "Training step profile").
  """
  return 8 if jax.default_backend() == 'gpu' and jnp.dtype(dtype).itemsize == 2 else 1


def conv_padded_channels(conv: nnx.Conv, x: jax.Array, multiple: int) -> jax.Array:
  """conv(x) for x [N, H, W, C], with C and the kernel's input channels padded with zeros to a
  multiple of `multiple`: the same function (the zeros add nothing) and, through the padding's
  transpose, the same kernel gradient; the kernel parameter keeps its shape.

  For a stem's plain convolution: one group, no dilation or mask, explicit or 'SAME'/'VALID'
  padding.
  """
  extra = -x.shape[-1] % multiple
  if not extra:
    return conv(x)
  dilations = [v for d in (conv.input_dilation, conv.kernel_dilation) if d is not None
               for v in (d if isinstance(d, (tuple, list)) else (d,))]
  if (conv.feature_group_count != 1 or conv.mask is not None or x.ndim != 4
      or any(v != 1 for v in dilations)):
    raise ValueError('conv_padded_channels takes a plain 2-D convolution (one group, no '
                     'dilation, no mask)')
  padding = conv.padding
  if isinstance(padding, int):
    padding = ((padding, padding),) * 2
  elif not isinstance(padding, str):
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  kernel = conv.kernel[...]
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
  kernel = jnp.pad(kernel, [(0, 0)] * (kernel.ndim - 2) + [(0, extra), (0, 0)])
  dtype = conv.dtype or jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  strides = conv.strides if isinstance(conv.strides, tuple) else (conv.strides,) * 2
  y = jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   precision=conv.precision,
                                   preferred_element_type=conv.preferred_element_type)
  return y if conv.bias is None else y + conv.bias[...].astype(y.dtype)
