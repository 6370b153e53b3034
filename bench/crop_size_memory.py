"""Search service memory under uploads of many crop sizes: RSS after 10 and after 100 distinct
crop sizes, each crop prepared and embedded as a query is (target: within 50 MB).

  PYTHONPATH=. .venv/bin/python bench/crop_size_memory.py [--workdir runs/demo]
      [--resize bucketed|per-size]

The model is the demo's from --workdir, or the demo architecture with untrained weights when
there is no checkpoint there (as bench/search_bench.py does). Crops are random uint8 of 100
distinct sizes, each side 200-1,200 pixels (seeded). A warm-up crop compiles the model first,
so both figures include it. --resize per-size resizes as the search did before the buckets
(jax.jit of resize_images, one compilation per crop size), for comparison. RSS is VmRSS from
/proc/self/status after a garbage collection.
"""

import argparse
import gc
import os
import sys
import time

import numpy as np

import fashion_jax.search

fashion_jax.search.use_every_cpu_core()  # as the search command line does, before JAX starts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from search_bench import demo_workdir  # noqa: E402


def rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  raise RuntimeError('no VmRSS in /proc/self/status')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--resize', choices=('bucketed', 'per-size'), default='bucketed')
  args = parser.parse_args()

  import jax
  from fashion_jax import preprocessing
  from fashion_jax.search.model import SearchModel

  workdir, which = demo_workdir(args.workdir)
  model = SearchModel(workdir)
  if args.resize == 'bucketed':
    resize = preprocessing.preprocess
    compiled = preprocessing.preprocess_compilations
  else:
    resize = jax.jit(preprocessing.resize_images,
                     static_argnames=('image_size', 'resize_mode', 'resize_filter'))
    compiled = resize._cache_size

  def query(crop):
    prepared = np.asarray(resize(crop[None], model.image_size, model.resize_mode,
                                 model.resize_filter))
    return model.embed_prepared(prepared)

  rng = np.random.default_rng(0)
  sizes = []
  while len(sizes) < 100:
    size = tuple(int(v) for v in rng.integers(200, 1201, 2))
    if size not in sizes:
      sizes.append(size)
  query(rng.integers(0, 256, (64, 48, 3), np.uint8))
  print(f'model: {which}; image_size {model.image_size}, {model.resize_mode}, '
        f'{model.resize_filter}; resize: {args.resize}; devices: {jax.devices()[0].platform} x '
        f'{jax.device_count()}')
  print('| distinct crop sizes | RSS (MB) | compiled resizes | seconds |')
  print('|---|---|---|---|')
  gc.collect()
  figures = {0: rss_mb()}
  print(f'| 0 (after warm-up) | {figures[0]:.0f} | {compiled()} | - |')
  start = time.perf_counter()
  for done, (height, width) in enumerate(sizes, 1):
    query(rng.integers(0, 256, (height, width, 3), np.uint8))
    if done in (10, 100):
      gc.collect()
      figures[done] = rss_mb()
      print(f'| {done} | {figures[done]:.0f} | {compiled()} | '
            f'{time.perf_counter() - start:.1f} |', flush=True)
  growth = figures[100] - figures[10]
  print(f'RSS after 100 sizes - after 10: {growth:+.1f} MB (target: within 50 MB): '
        f'{"PASS" if abs(growth) <= 50 else "FAIL"}')


if __name__ == '__main__':
  main()
