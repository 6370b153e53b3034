"""fashion_jax/models/pooling.py: max pooling whose gradient is computed without a scatter,
against XLA's own gradient (select-and-scatter) and PyTorch's MaxPool2d, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fashion_jax.models import pooling

# ResNet's stem pool (3x3, stride 2, padding 1), SENet's (ceil mode: bottom/right padding only
# where a partial window remains) and a 2x2 one without overlap.
CASES = [((3, 3), (2, 2), ((1, 1), (1, 1)), (9, 8)),
         ((3, 3), (2, 2), ((0, 1), (0, 0)), (8, 9)),
         ((2, 2), (2, 2), ((0, 0), (0, 0)), (6, 6))]


def _tied(shape, seed):
  """Small integers: many equal values in a window, as after a ReLU."""
  return jax.random.randint(jax.random.key(seed), shape, -2, 3).astype(jnp.float32)


@pytest.mark.parametrize('window,strides,padding,size', CASES)
def test_function_and_gradient_equal_xla_s_with_ties(window, strides, padding, size):
  x = _tied((2, *size, 3), 0)
  reference = lambda x: nnx.max_pool(x, window, strides=strides, padding=padding)
  ours = lambda x: pooling.max_pool(x, window, strides, padding)
  np.testing.assert_array_equal(ours(x), reference(x))
  # Integer output gradients: the sums where windows overlap are exact in any order.
  g = _tied(reference(x).shape, 1)
  grad = lambda f: jax.vjp(f, x)[1](g)[0]
  np.testing.assert_array_equal(jax.jit(lambda x: grad(ours))(x), grad(reference))


def test_bfloat16_gradient_is_the_float32_one_rounded_once():
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 8)).astype(jnp.bfloat16)
  window, strides, padding = CASES[0][:3]
  reference = lambda x: nnx.max_pool(x, window, strides=strides, padding=padding)
  g = jax.random.normal(jax.random.key(3), reference(x).shape).astype(jnp.bfloat16)
  ours = jax.vjp(lambda x: pooling.max_pool(x, window, strides, padding), x)[1](g)[0]
  # Where windows overlap, the gradients are summed in float32 (exactly, for a few bfloat16
  # values) and rounded once; XLA's own bfloat16 gradient rounds after each addition.
  exact = jax.vjp(reference, x.astype(jnp.float32))[1](g.astype(jnp.float32))[0]
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ours, np.float32),
                                np.asarray(exact.astype(jnp.bfloat16), np.float32))


def test_gradient_goes_where_pytorch_s_goes():
  torch = pytest.importorskip('torch')
  x = _tied((2, 9, 8, 3), 4)
  y = pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  g = _tied(y.shape, 5)
  dx = jax.vjp(lambda x: pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))), x)[1](g)[0]
  xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
  yt = torch.nn.functional.max_pool2d(xt, 3, 2, padding=1)
  yt.backward(torch.tensor(np.asarray(g).transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1))
