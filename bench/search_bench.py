"""Visual search benchmark: query latency over a 100,000-product index and service throughput.

  PYTHONPATH=. .venv/bin/python bench/search_bench.py [--workdir runs/demo] [--dtype float16]

The model is the demo's (configs/demo.py, a width-16 ResNet18-IBN-a at 64x64, 128-d
embeddings) from --workdir; without a checkpoint there, the demo architecture with untrained
weights is written to a temporary workdir and used (the table says which). The index holds
100,000 products x 2,048 dims of random unit vectors (float16 by default). Its vectors are
wider than the demo model's, so each photo's 128-d embedding is mapped to 2,048 dims by a
fixed random projection and normalised: a real embedding computation followed by a search of
the full-size index.

Latency: one photo (640x480 JPEG, the same size every time, so its resize is compiled once),
median and p95 over 50 queries, after a warm-up: "search only" is the index search of an
embedding (top-k products, category filter off); "embedding included" adds decoding, resizing
and the model. Throughput: the HTTP service (standard library, one process) on loopback,
answering POST /api/search from 8 concurrent clients in another process.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

import fashion_jax.search

fashion_jax.search.use_every_cpu_core()  # as the command line does, before JAX starts

NUM_PRODUCTS = 100_000
DIM = 2_048

_CLIENTS = r'''
import sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, path, clients, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
data = open(path, 'rb').read()
def one():
    request = urllib.request.Request(url, data=data, method='POST')
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        return response.status
def client(deadline):
    done = failed = 0
    while time.perf_counter() < deadline:
        try:
            done += one() == 200
        except Exception:
            failed += 1
    return done, failed
one()
start = time.perf_counter()
with ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(client, [start + seconds] * clients))
elapsed = time.perf_counter() - start
print(sum(r[0] for r in results), sum(r[1] for r in results), elapsed)
'''


class ProjectedModel:
  """The demo model with its embeddings mapped to the index's width (see the module docstring)."""

  def __init__(self, model, dim: int, seed: int = 0):
    self.model = model
    self.fingerprint = model.fingerprint
    self.workdir, self.step, self.image_size = model.workdir, model.step, model.image_size
    rng = np.random.default_rng(seed)
    self.projection = rng.standard_normal((model.embedding_dim, dim)).astype(np.float32)

  def embed_crops(self, crops):
    projected = self.model.embed_crops(crops) @ self.projection
    return projected / np.linalg.norm(projected, axis=1, keepdims=True)


def demo_workdir(path: str | None) -> tuple[str, str]:
  """(workdir, description): the trained demo, or the demo architecture untrained."""
  if path and os.path.isdir(os.path.join(path, 'checkpoints')) and os.listdir(
      os.path.join(path, 'checkpoints')):
    return path, f'trained demo checkpoint in {path}'
  import jax
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs'))
  import demo
  from fashion_jax import checkpointing, optim, train_step as ts
  from fashion_jax.models import build_model
  config = demo.get_config()
  workdir = tempfile.mkdtemp(prefix='search-bench-workdir-')
  model = build_model(config.model, 300)
  tx, _ = optim.make_optimizer(config.optim, 1)
  _, state = ts.create_train_state(model, tx, 300, loss_config=config.loss)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  checkpointer.save(0, jax.device_get(state))
  checkpointer.wait()
  checkpointer.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  return workdir, 'demo architecture, untrained weights (no checkpoint given)'


def write_index(folder: str, model, dtype: str) -> None:
  """A valid index directory of random unit vectors, one image per product, two categories."""
  from fashion_jax.search import index as search_index
  rng = np.random.default_rng(0)
  embeddings = np.empty((NUM_PRODUCTS, DIM), dtype)
  for start in range(0, NUM_PRODUCTS, 10_000):
    block = rng.standard_normal((min(10_000, NUM_PRODUCTS - start), DIM), dtype=np.float32)
    embeddings[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
  np.save(os.path.join(folder, 'embeddings.npy'), embeddings)
  os.makedirs(os.path.join(folder, 'thumbs'))
  Image.new('RGB', (8, 8)).save(os.path.join(folder, 'thumbs', 'shared.jpg'))
  with open(os.path.join(folder, 'items.jsonl'), 'w') as f:
    for row in range(NUM_PRODUCTS):
      f.write(json.dumps({'image': f'random/{row}', 'product_id': f'p{row}',
                          'category': ('tops', 'shoes')[row % 2], 'box': None,
                          'thumb': 'thumbs/shared.jpg'}) + '\n')
  meta = {'format': search_index.FORMAT,
          'model': {'workdir': model.workdir, 'checkpoint_dir': '', 'step': int(model.step),
                    'fingerprint': model.fingerprint, 'backbone': 'demo', 'preprocessing': {}},
          'dtype': dtype, 'dim': DIM, 'count': NUM_PRODUCTS, 'products': NUM_PRODUCTS,
          'categories': ['shoes', 'tops'], 'centroids': False}
  with open(os.path.join(folder, 'index.json'), 'w') as f:
    json.dump(meta, f)


def photo_bytes(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  picture = Image.fromarray(small).resize((640, 480), Image.BILINEAR)
  out = io.BytesIO()
  picture.save(out, format='JPEG', quality=90)
  return out.getvalue()


def percentiles(seconds: list[float]) -> str:
  ms = 1e3 * np.asarray(seconds)
  return f'{np.median(ms):.1f}', f'{np.percentile(ms, 95):.1f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--dtype', default='float16', choices=('float16', 'float32'))
  parser.add_argument('--queries', type=int, default=50)
  parser.add_argument('--clients', type=int, default=8)
  parser.add_argument('--seconds', type=float, default=20.0)
  args = parser.parse_args()

  import jax
  from fashion_jax.search import engine, server
  from fashion_jax.search import index as search_index
  from fashion_jax.search.model import SearchModel

  workdir, which = demo_workdir(args.workdir)
  model = ProjectedModel(SearchModel(workdir), DIM)
  folder = tempfile.mkdtemp(prefix='search-bench-index-')
  start = time.perf_counter()
  write_index(folder, model, args.dtype)
  index = search_index.SearchIndex(folder)
  searcher = engine.Searcher(index, model)
  setup = time.perf_counter() - start
  photos = [photo_bytes(seed) for seed in range(args.queries)]

  def search_only(embedding):
    return searcher.search_embeddings(embedding[None], k=10)

  def embedding_included(data):
    return searcher.search_crops([searcher.crop_of(data)], k=10)

  embeddings = [model.embed_crops([searcher.crop_of(p)])[0] for p in photos]
  latency_load = [os.getloadavg()[0]]
  timings = {}
  for name, fn, inputs in (('search only', search_only, embeddings),
                           ('embedding included', embedding_included, photos)):
    first = time.perf_counter()
    fn(inputs[0])
    first = time.perf_counter() - first
    seconds = []
    for item in inputs:
      start = time.perf_counter()
      fn(item)
      seconds.append(time.perf_counter() - start)
    timings[name] = (*percentiles(seconds), f'{1e3 * first:.0f}')
  category = []
  for item in embeddings:
    start = time.perf_counter()
    searcher.search_embeddings(item[None], k=10, category='shoes')
    category.append(time.perf_counter() - start)
  timings['search only, category filter'] = (*percentiles(category), '-')
  latency_load.append(os.getloadavg()[0])

  searcher.warm_up()  # as `serve` does
  httpd = server.make_server(searcher, port=0, quiet=True)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  host, port = httpd.server_address[:2]
  photo_path = os.path.join(folder, 'photo.jpg')
  with open(photo_path, 'wb') as f:
    f.write(photos[0])
  load_before = os.getloadavg()[0]
  out = subprocess.run([sys.executable, '-c', _CLIENTS, f'http://{host}:{port}/api/search?k=10',
                        photo_path, str(args.clients), str(args.seconds)],
                       capture_output=True, text=True, check=True).stdout.split()
  load_after = os.getloadavg()[0]
  httpd.shutdown()
  done, failed, elapsed = int(out[0]), int(out[1]), float(out[2])

  print(f'model: {which}; index: {NUM_PRODUCTS:,} products x {DIM:,} dims, {args.dtype} '
        f'(written and loaded in {setup:.1f} s); devices: {jax.devices()[0].platform} x '
        f'{jax.device_count()}; CPUs: {os.cpu_count()}')
  print(f'load average (1 min) during the latency runs: {latency_load[0]:.2f} / '
        f'{latency_load[1]:.2f}')
  print()
  print('| query (one photo, top-10 products) | median (ms) | p95 (ms) | first call (ms) |')
  print('|---|---|---|---|')
  for name, (median, p95, first) in timings.items():
    print(f'| {name} | {median} | {p95} | {first} |')
  print()
  print('| service, loopback | clients | requests | failed | seconds | requests/s | '
        'load avg (1 min) before / after |')
  print('|---|---|---|---|---|---|---|')
  print(f'| POST /api/search (640x480 JPEG, k=10) | {args.clients} | {done} | {failed} | '
        f'{elapsed:.1f} | {done / elapsed:.1f} | {load_before:.2f} / {load_after:.2f} |')


if __name__ == '__main__':
  main()
