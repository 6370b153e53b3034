"""The search's resize of one photo: the compiled host kernel against the JAX resize on this
machine's default device, milliseconds per photo, and how many pixel values differ.

For each (photo size, model input size): `preprocessing.resize_on_host` (data_pipelines'
compiled 'triangle' kernel, what `SearchModel.prepare` uses where it is built) and
`preprocessing.preprocess` (the JAX resize, compiled per bucket of sizes; the first call,
which compiles, is not timed), one photo at a time as a service resizes them, stretched and
letterboxed; the photo is random noise (the cost does not depend on the content).

  PYTHONPATH=. .venv/bin/python bench/resize_bench.py
  PYTHONPATH=. .venv/bin/python bench/resize_bench.py --photos=640x480,3000x4000 --sizes=320x320
"""

import argparse
import time

import jax
import numpy as np

from fashion_jax import preprocessing


def per_call_ms(fn, repeats: int) -> float:
  fn()  # compiles (JAX) or warms the caches
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return 1e3 * (time.perf_counter() - start) / repeats


def _size(text: str) -> tuple[int, int]:
  first, second = (int(v) for v in text.split('x'))
  return first, second


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--photos', default='640x480,1280x960', help='WxH of the photos')
  parser.add_argument('--sizes', default='64x64,320x320,256x128', help='HxW of the model input')
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args()
  if not preprocessing.host_resize_applies('triangle'):
    raise SystemExit('data_pipelines._resample is not built (pip install -e . with a C compiler)')
  print(f'# {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, JAX on '
        f'{jax.devices()[0].device_kind}, {args.repeats} photos per row')
  print('| photo (WxH) | model input (HxW) | mode | host kernel (ms) | JAX (ms) | ratio '
        '| values differing | largest difference |')
  print('|---|---|---|---|---|---|---|---|')
  rng = np.random.default_rng(0)
  for photo in args.photos.split(','):
    width, height = _size(photo)
    image = rng.integers(0, 256, (height, width, 3), np.uint8)
    for size in args.sizes.split(','):
      target = _size(size)
      for mode in preprocessing.RESIZE_MODES:
        host = lambda: preprocessing.resize_on_host(image, target, mode)
        on_jax = lambda: np.asarray(preprocessing.preprocess(image[None], target, mode))[0]
        host_ms, jax_ms = per_call_ms(host, args.repeats), per_call_ms(on_jax, args.repeats)
        difference = np.abs(host().astype(np.int32) - on_jax())
        print(f'| {photo} | {size} | {mode} | {host_ms:.2f} | {jax_ms:.2f} | '
              f'{jax_ms / host_ms:.0f}x | {np.mean(difference > 0):.4%} | {difference.max()} |',
              flush=True)


if __name__ == '__main__':
  main()
