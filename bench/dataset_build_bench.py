"""Dataset benchmark: Street2Shop build speed and peak memory on generated raw trees of growing
size, then the input pipeline's augmented PK-batch throughput (images/s per core) on one build.

  PYTHONPATH=. .venv/bin/python bench/dataset_build_bench.py                # 100 and 800 products
  PYTHONPATH=. .venv/bin/python bench/dataset_build_bench.py --products=50,200 --side=1000
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

STREET_PER_PRODUCT, SHOP_PER_PRODUCT = 2, 2


def write_tree(root: str, num_products: int, side: int, seed: int = 0) -> int:
  """A fault-free raw tree of `side`-px photos (half train, half test products); image count."""
  rng = np.random.default_rng(seed)
  images = os.path.join(root, 'images')
  os.makedirs(images)
  # Smooth content plus mild noise compresses like photos; pure noise would not.
  ramp = np.linspace(0, 255, side, dtype=np.float32)
  height = side * 3 // 4
  records = {'train_pairs': [], 'test_pairs': [], 'retrieval': []}
  photo = 0
  for product in range(num_products):
    kind = 'train_pairs' if product % 2 == 0 else 'test_pairs'
    for index in range(STREET_PER_PRODUCT + SHOP_PER_PRODUCT):
      photo += 1
      shop = index >= STREET_PER_PRODUCT
      tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
      pixels = ramp[None, :, None] * tint + rng.normal(0, 8, (height, 1, 1)).astype(np.float32)
      Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
          os.path.join(images, f'{photo:09d}.jpg'), quality=90)
      if shop:
        records['retrieval'].append({'photo': photo, 'product': product})
      else:
        box = {'left': side // 8, 'top': side // 8, 'width': side // 2, 'height': side // 2}
        records[kind].append({'photo': photo, 'product': product, 'bbox': box})
  meta = os.path.join(root, 'meta', 'json')
  os.makedirs(meta)
  from data_pipelines.street2shop import street2shop_dataset_builder as s2s
  for category in s2s.CATEGORIES:
    for kind, values in records.items():
      with open(os.path.join(meta, f'{kind}_{category}.json'), 'w') as f:
        json.dump(values if category == 'dresses' else [], f)
  return photo


def run_case(num_products: int, side: int) -> dict:
  """Generates a tree, builds it in this process, returns timings and peak memory."""
  import tensorflow_datasets as tfds

  from data_pipelines.street2shop import street2shop_dataset_builder as s2s
  with tempfile.TemporaryDirectory() as tmp:
    num_images = write_tree(os.path.join(tmp, 'raw'), num_products, side)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu_start, start = time.process_time(), time.perf_counter()
    s2s.Builder(data_dir=os.path.join(tmp, 'tfds')).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.join(tmp, 'raw')))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  return {'products': num_products, 'images': num_images, 'side': side, 'seconds': seconds,
          'images_per_s': num_images / seconds, 'images_per_cpu_s': num_images / cpu,
          'rss_before_mb': rss_before,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_pipeline(num_products: int, side: int, num_batches: int) -> dict:
  """Builds a tree, then times train batches of the paper's input config (320x320, P x K)."""
  import tensorflow_datasets as tfds

  from data_pipelines import input_pipeline
  from data_pipelines.street2shop import street2shop_dataset_builder as s2s
  from fashion_jax import configlib
  with tempfile.TemporaryDirectory() as tmp:
    write_tree(os.path.join(tmp, 'raw'), num_products, side)
    builder = s2s.Builder(data_dir=os.path.join(tmp, 'tfds'))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.join(tmp, 'raw')))
    config = configlib.base_config()
    config.dataset.name = 'street2shop'
    ds = input_pipeline.create_train_dataset(
        builder, config, item_ids=input_pipeline.train_item_ids(builder))
    batches = iter(ds)
    next(batches)  # tracing and the first fill of the buffers are not throughput
    cpu_start, start = time.process_time(), time.perf_counter()
    for _ in range(num_batches):
      images = next(batches)['images']
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    count = num_batches * int(images.shape[0])
  return {'images': count, 'shape': list(images.shape), 'seconds': seconds,
          'images_per_s': count / seconds, 'images_per_cpu_s': count / cpu}


def _subprocess(*flags: str) -> dict:
  # A fresh process per case, so its peak memory and thread pools are its own.
  out = subprocess.run([sys.executable, __file__, *flags], check=True, capture_output=True,
                       text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--products', default='100,800', help='comma-separated tree sizes')
  parser.add_argument('--side', type=int, default=800, help='raw photo width in pixels')
  parser.add_argument('--pipeline_products', type=int, default=200,
                      help='tree size for the input pipeline case (0 skips it)')
  parser.add_argument('--batches', type=int, default=20, help='timed PK batches')
  parser.add_argument('--case', help=argparse.SUPPRESS)  # internal: one case per process
  args = parser.parse_args()
  if args.case == 'pipeline':
    print(json.dumps(run_pipeline(args.pipeline_products, args.side, args.batches)))
    return
  if args.case:
    print(json.dumps(run_case(int(args.case), args.side)))
    return
  print(f'# Street2Shop build, {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} cores, {args.side}x{args.side * 3 // 4} JPEG photos, stored <= 640 px')
  print('| products | images | seconds | images/s | images per CPU-second | peak RSS MB |')
  print('|---|---|---|---|---|---|')
  for products in args.products.split(','):
    r = _subprocess(f'--case={products}', f'--side={args.side}')
    print(f'| {r["products"]} | {r["images"]} | {r["seconds"]:.1f} | {r["images_per_s"]:.1f} '
          f'| {r["images_per_cpu_s"]:.1f} | {r["peak_rss_mb"]:.0f} |', flush=True)
  if args.pipeline_products:
    r = _subprocess('--case=pipeline', f'--side={args.side}',
                    f'--pipeline_products={args.pipeline_products}', f'--batches={args.batches}')
    print(f'\n# Input pipeline: augmented training batches {r["shape"]} uint8 '
          f'(decode, resize, flip, pad-crop, erasing), {os.cpu_count()} cores')
    print('| images | seconds | images/s | images/s per core | images per CPU-second |')
    print('|---|---|---|---|---|')
    print(f'| {r["images"]} | {r["seconds"]:.1f} | {r["images_per_s"]:.0f} '
          f'| {r["images_per_s"] / os.cpu_count():.0f} | {r["images_per_cpu_s"]:.0f} |')


if __name__ == '__main__':
  main()
