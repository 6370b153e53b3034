"""Max pooling over NHWC activations whose gradient is computed without a scatter.

The forward is flax's `max_pool` (lax.reduce_window with -inf padding). Differentiated as it is,
XLA computes the gradient with select-and-scatter, which its GPU compiler turns into a scatter:
on an H200 that scatter took 0.66 ms of a ResNet50-IBN-A step at 320x320, batch 64, more than any
operation but one convolution (bench/README.md, "Training step profile"). Here the gradient is
written as one comparison per window position instead: each output's gradient goes to the first
position of its window, in row-major order, that holds the window's maximum. That is the element
select-and-scatter picks (it keeps the first maximum) and the one PyTorch's MaxPool2d records,
so the function and its gradient are the same; only where windows overlap are the gradients of
several windows added in another order (in float32 here).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """Max pooling of x [N, H, W, C] over `window` with `strides`, -inf `padding` ((top, bottom),
  (left, right)), as flax's nnx.max_pool computes it."""
  window, strides = tuple(window), tuple(strides)
  padding = tuple(tuple(p) for p in padding)
  return _max_pool(x, window, strides, padding)


def _reduce(x, window, strides, padding):
  return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1),
                           (1, *strides, 1), ((0, 0), *padding, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return _reduce(x, window, strides, padding)


def _forward(x, window, strides, padding):
  y = _reduce(x, window, strides, padding)
  return y, (x, y)


def _backward(window, strides, padding, residuals, g):
  x, y = residuals
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  n, hp, wp, c = xp.shape
  ho, wo = y.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, jnp.float32)
  g32 = g.astype(jnp.float32)
  for i in range(window[0]):
    for j in range(window[1]):
      # The inputs at window position (i, j) of every output, [N, Ho, Wo, C].
      end = (i + (ho - 1) * strides[0] + 1, j + (wo - 1) * strides[1] + 1)
      seen = lax.slice(xp, (0, i, j, 0), (n, *end, c), (1, *strides, 1))
      chosen = (seen == y) & ~taken
      taken = taken | chosen
      # Back to those inputs' places: interior padding spreads the outputs by the strides.
      dxp = dxp + lax.pad(jnp.where(chosen, g32, 0.0), jnp.float32(0),
                          ((0, 0, 0), (i, hp - end[0], strides[0] - 1),
                           (j, wp - end[1], strides[1] - 1), (0, 0, 0)))
  (top, _), (left, _) = padding
  dx = dxp[:, top:top + x.shape[1], left:left + x.shape[2], :]
  return (dx.astype(x.dtype),)


_max_pool.defvjp(_forward, _backward)
