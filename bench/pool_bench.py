"""Max pooling's forward and gradient: XLA's select-and-scatter against fashion_jax.models.pooling.

ResNet's stem pool (3x3, stride 2, padding 1) over a [batch, size, size, 64] activation, jitted,
timed after one call that compiles; the gradient is that of a sum of squares of the output.

  PYTHONPATH=. python bench/pool_bench.py                    # batch 64, 160x160, bfloat16
  PYTHONPATH=. python bench/pool_bench.py --batch=16 --repeat=5   # a CPU-sized run
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from fashion_jax.models import pooling

WINDOW, STRIDES, PADDING = (3, 3), (2, 2), ((1, 1), (1, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=160, help='the pooled activation is size x size')
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--repeat', type=int, default=20)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 64)).astype(
      args.dtype)
  pools = {'XLA (select-and-scatter gradient)':
               lambda x: nnx.max_pool(x, WINDOW, strides=STRIDES, padding=PADDING),
           'pooling.max_pool (comparison gradient)':
               lambda x: pooling.max_pool(x, WINDOW, STRIDES, PADDING)}
  print(f'# {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {jax.devices()[0].device_kind}, '
        f'x [{args.batch}, {args.size}, {args.size}, 64] {args.dtype}, mean of {args.repeat}')
  print('| pool | forward and gradient (ms) |')
  print('|---|---|')
  for name, pool in pools.items():
    step = jax.jit(jax.grad(lambda x: jnp.sum(jnp.square(pool(x).astype(jnp.float32)))))
    step(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(args.repeat):
      out = step(x)
    out.block_until_ready()
    print(f'| {name} | {(time.perf_counter() - start) / args.repeat * 1e3:.2f} |')


if __name__ == '__main__':
  main()
