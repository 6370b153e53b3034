"""Indexing a catalogue of photos: `python -m fashion_jax.search index` from a CSV of JPEG files,
images/s and peak RSS, optionally beside the library as committed at another revision.

Writes --images JPEG photos (WxH --photo, smooth random colour fields, quality 90) of
--images / 4 products in 5 categories and their catalogue CSV, then indexes them with the
demo model (the trained one in --workdir, else the demo architecture with untrained weights)
into a new exact index, in a fresh process per run. Seconds are the command's wall time,
start-up and compilation included (given apart: the same command on 8 images).

  PYTHONPATH=. .venv/bin/python bench/index_bench.py
  PYTHONPATH=. .venv/bin/python bench/index_bench.py --images=2000 --baseline=HEAD~1
"""

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_bench  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_catalogue(folder: str, count: int, size: tuple[int, int], seed: int = 0) -> str:
  """`count` JPEG photos of `size` (W, H) and their catalogue CSV; returns the CSV's path."""
  rng = np.random.default_rng(seed)
  width, height = size
  lines = ['image,product_id,category']
  for number in range(count):
    # A smooth field: an 8 x 6 grid of random colours enlarged, plus fine noise.
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize(
        (width, height), Image.BILINEAR)
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    encoded = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(encoded, 'JPEG', quality=90)
    name = f'{number:06d}.jpg'
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(encoded.getvalue())
    lines.append(f'{name},p{number // 4},c{number // 4 % 5}')
  path = os.path.join(folder, 'catalogue.csv')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


# Runs the command in argv and prints its own peak RSS (kB) and CPU seconds: each run's figures
# are then its own, not the largest of every child this process ever had.
_MEASURED = ('import resource, subprocess, sys\n'
             'code = subprocess.run(sys.argv[1:]).returncode\n'
             'usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n'
             'print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime)\n'
             'sys.exit(code)\n')


def index_once(csv: str, workdir: str, index_dir: str, pythonpath: str) -> dict:
  """Runs the index command in a fresh process: wall seconds, CPU seconds, peak RSS."""
  shutil.rmtree(index_dir, ignore_errors=True)
  env = dict(os.environ, PYTHONPATH=pythonpath)
  start = time.perf_counter()
  done = subprocess.run([sys.executable, '-c', _MEASURED, sys.executable, '-m',
                         'fashion_jax.search', 'index', '--workdir', workdir, '--catalogue', csv,
                         '--index', index_dir], env=env, capture_output=True, text=True,
                        cwd=os.path.dirname(index_dir))  # not the repository: -m would import it
  seconds = time.perf_counter() - start
  if done.returncode:
    raise SystemExit(f'index failed: {done.stderr.strip().splitlines()[-1:]}')
  rss_kb, cpu = done.stdout.split()[-2:]
  return {'seconds': seconds, 'cpu': float(cpu), 'rss_gb': int(rss_kb) / 1e6}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=1000)
  parser.add_argument('--photo', default='640x480', help='WxH of the photos')
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--baseline', help='a git revision: index with the library at it too')
  args = parser.parse_args()
  size = tuple(int(v) for v in args.photo.split('x'))
  with tempfile.TemporaryDirectory(prefix='index-bench-') as tmp:
    workdir, which = search_bench.demo_workdir(os.path.abspath(args.workdir), tmp)
    photos = os.path.join(tmp, 'photos')
    os.makedirs(photos)
    csv = write_catalogue(photos, args.images, size)
    small = os.path.join(photos, 'small.csv')
    with open(csv) as f, open(small, 'w') as out:
      out.writelines(f.readlines()[:9])
    libraries = {'this tree': _REPO}
    if args.baseline:
      previous = os.path.join(tmp, 'baseline')
      os.makedirs(previous)
      archive = subprocess.run(['git', '-C', _REPO, 'archive', args.baseline, 'fashion_jax',
                                'data_pipelines'], stdout=subprocess.PIPE, check=True).stdout
      subprocess.run(['tar', '-x', '-C', previous], input=archive, check=True)
      # The compiled resize is not in the archive: the baseline uses this tree's build of it.
      for name in os.listdir(os.path.join(_REPO, 'data_pipelines')):
        if name.startswith('_resample') and name.endswith('.so'):
          shutil.copy(os.path.join(_REPO, 'data_pipelines', name),
                      os.path.join(previous, 'data_pipelines', name))
      libraries[f'at {args.baseline}'] = previous
    print(f'# {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {os.cpu_count()} CPUs, '
          f'load {os.getloadavg()[0]:.2f}; {args.images} JPEG photos {args.photo}; model: {which}')
    print('| library | images | seconds | images/s | CPU seconds | peak RSS (GB) '
          '| seconds for 8 images |')
    print('|---|---|---|---|---|---|---|')
    for name, path in libraries.items():
      full = index_once(csv, workdir, os.path.join(tmp, 'index'), path)
      start_up = index_once(small, workdir, os.path.join(tmp, 'index'), path)
      print(f"| {name} | {args.images} | {full['seconds']:.1f} | "
            f"{args.images / full['seconds']:.0f} | {full['cpu']:.1f} | {full['rss_gb']:.2f} | "
            f"{start_up['seconds']:.1f} |", flush=True)
    print(f'load at the end: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
