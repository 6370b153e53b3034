"""Visual search benchmark: every search backend over a synthetic 1M x 2,048 catalogue, and the
HTTP service's throughput with batching on and off.

  PYTHONPATH=. .venv/bin/python bench/search_bench.py --tmp /tmp/search-bench   # 1M x 2,048
  PYTHONPATH=. .venv/bin/python bench/search_bench.py --rows 50000 --queries 200 \
      --exact-queries 100 --qdrant-rows 5000 --qdrant-queries 20 --seconds 5   # a few minutes

The catalogue (float16, written in chunks of 50,000 rows to <tmp>/catalogue/embeddings.npy, the
same bytes for the same --seed; reused from --tmp when made with the same flags) has the
structure of trained embeddings: product clusters in a low-dimensional subspace, grouped by
category, plus noise in every dimension.
  basis      a random orthonormal basis U [D, 64] of a 64-dim subspace of R^D
  categories 11 centres c [64] ~ N(0, 1); each product is in one, uniformly (each ~9% of rows)
  products   centre p = c[category] + N(0, 1) [64]; rows per product uniform in 1-9 (mean 5),
             a product's rows consecutive; --rows 1,000,000 gives about 200,000 products
  images     x = U (p + N(0, 0.5^2)) + N(0, s^2) [D] with s^2 D = 32 (a fifth of the energy),
             normalised: same-product cosine ~0.72, same category ~0.35, others ~0
  queries    held-out photos of uniformly drawn catalogue products, in another domain: the
             within-product noise is N(0, 0.7^2) and every query is shifted by one fixed
             vector N(0, 0.3^2) [64] (street vs shop); float32, normalised; cosine to the
             images of their own product ~0.67
The category filter of a query is its product's category (about a tenth of the catalogue).

Backends, each in its own process (build time and peak RSS, VmHWM, are that process's), driven
through their public interface: `create`, `add` (chunks of 50,000 rows read from the catalogue
file; `exact` has no index: its build is taking the rows, moving them to the devices and
compiling), `save`. FAISS is then reopened from disk as `open`
does (`FaissBackend.load`, memory-mapped), and searched with one thread; its settings are the
backend's defaults planned for --rows rows (or --faiss-settings), and the same index is also
searched at each --faiss-nprobes value. `exact` runs on every core (one XLA device per core)
and is the reference: its latency and the ground truth come from the first --exact-queries
queries, and every recall@10 (the share of exact's top-10 products found) is over those.
Latency: one query per call, k=10, after 5 warm-up calls. Qdrant is qdrant-client's embedded
mode (':memory:', a brute-force scan in Python, no server) at --qdrant-rows rows and
--qdrant-queries queries, against `exact` over the same rows.

Service: `python -m fashion_jax.search serve` on loopback over an index of the demo model
(--workdir, else the demo architecture with untrained weights written to a temporary workdir)
holding --service-rows rows of the same generator at the model's width (`exact` backend); a
client process posts one 640x480 JPEG (k=10) from 1, 8 and 32 threads, each on its own
keep-alive connection, --warm-up seconds uncounted (new batch sizes compile) then --seconds
counted; batching on (--max-batch 16 --max-wait-ms 5) and off (--max-batch 1). Each row also
gives the server's CPU time per request answered (all its threads, warm-up included) and the
medians of the answers' own timing_ms: `decode` (read, decode, crop) in the request's thread;
`resize` (one call per crop), `embed` (the model, one call per batch) and `search` in the
batcher's thread, each for the whole batch.
"""

import argparse
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

SUBSPACE = 64
CATEGORIES = 11
CHUNK = 50_000
_SPREAD = {'category': 1.0, 'product': 1.0, 'image': 0.5, 'query': 0.7, 'shift': 0.3}
_FULL_NOISE_ENERGY = 32.0  # of the D-dim noise: s^2 D
_WARM_UP = 5
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The catalogue


@dataclasses.dataclass
class Catalogue:
  """embeddings [N, D] float16 (memory-mapped); row_product, row_category [N] int32;
  product_category [P] int32; queries [Q, D] float32 and their query_product, query_category."""
  embeddings: np.ndarray
  row_product: np.ndarray
  row_category: np.ndarray
  product_category: np.ndarray
  queries: np.ndarray
  query_product: np.ndarray
  query_category: np.ndarray


def make_catalogue(folder: str, rows: int, dim: int, queries: int, seed: int = 0) -> Catalogue:
  """Writes <folder>/embeddings.npy and catalogue.npz (see the module docstring)."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng([seed, 0])
  basis = np.linalg.qr(rng.standard_normal((dim, SUBSPACE)))[0].astype(np.float32)  # [D, 64]
  counts = rng.integers(1, 10, rows // 5 + 100)
  products = int(np.searchsorted(np.cumsum(counts), rows)) + 1
  counts = counts[:products]
  counts[-1] -= counts.sum() - rows
  product_category = rng.integers(0, CATEGORIES, products).astype(np.int32)
  category_centre = _SPREAD['category'] * rng.standard_normal((CATEGORIES, SUBSPACE))
  centres = (category_centre[product_category] +
             _SPREAD['product'] * rng.standard_normal((products, SUBSPACE))).astype(np.float32)
  shift = _SPREAD['shift'] * rng.standard_normal(SUBSPACE).astype(np.float32)
  row_product = np.repeat(np.arange(products, dtype=np.int32), counts)

  def images(rng, product, spread, offset=0.0):
    inside = centres[product] + offset + spread * rng.standard_normal(
        (len(product), SUBSPACE), dtype=np.float32)
    vectors = inside @ basis.T
    vectors += np.sqrt(_FULL_NOISE_ENERGY / dim, dtype=np.float32) * rng.standard_normal(
        vectors.shape, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

  embeddings = np.lib.format.open_memmap(os.path.join(folder, 'embeddings.npy'), mode='w+',
                                         dtype=np.float16, shape=(rows, dim))
  for number, start in enumerate(range(0, rows, CHUNK)):
    part = slice(start, min(start + CHUNK, rows))
    embeddings[part] = images(np.random.default_rng([seed, 1, number]), row_product[part],
                              _SPREAD['image'])
  embeddings.flush()
  del embeddings
  rng = np.random.default_rng([seed, 2])
  query_product = rng.integers(0, products, queries).astype(np.int32)
  np.savez(os.path.join(folder, 'catalogue.npz'), row_product=row_product,
           row_category=product_category[row_product], product_category=product_category,
           queries=images(rng, query_product, _SPREAD['query'], shift),
           query_product=query_product, query_category=product_category[query_product],
           made_with=np.array([rows, dim, queries, seed]))
  return load_catalogue(folder)


def load_catalogue(folder: str, made_with: tuple | None = None) -> Catalogue | None:
  """The catalogue in `folder`; None when there is none, or not one `made_with` (rows, dim,
  queries, seed) when given."""
  path = os.path.join(folder, 'catalogue.npz')
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    arrays = {key: saved[key] for key in saved.files}
  if made_with is not None and tuple(arrays['made_with']) != tuple(made_with):
    return None
  del arrays['made_with']
  return Catalogue(np.load(os.path.join(folder, 'embeddings.npy'), mmap_mode='r'), **arrays)


# ---------------------------------------------------------------------------------------------
# One backend, in its own process


def read_rows(embeddings: np.memmap, first: int, stop: int) -> np.ndarray:
  """Rows [first, stop) of the memory-mapped catalogue, read into memory (not mapped), so
  that a process's RSS holds only what the backend keeps."""
  with open(embeddings.filename, 'rb') as f:
    f.seek(embeddings.offset + first * embeddings.strides[0])
    data = np.fromfile(f, embeddings.dtype, (stop - first) * embeddings.shape[1])
  return data.reshape(stop - first, embeddings.shape[1])


def peak_rss_bytes() -> int:
  """This process's peak resident set (VmHWM)."""
  with open('/proc/self/status') as f:
    return 1024 * int(re.search(r'VmHWM:\s+(\d+)', f.read()).group(1))


def run_backend(job: dict) -> dict:
  """Builds job['backend'] over the first job['rows'] catalogue rows in job['directory'],
  searches job['queries'] queries without and with their category filter, writes the products
  found to <directory>/found.npz and returns the figures. For FAISS, each nprobe of
  job['nprobes'] is searched too, over the first job['sweep_queries'] queries."""
  import fashion_jax.search
  fashion_jax.search.use_every_cpu_core()  # exact's rows over every core, as `serve` does
  from fashion_jax.search import backends
  catalogue = load_catalogue(job['catalogue'])
  name, rows, directory = job['backend'], job['rows'], job['directory']
  settings = job.get('settings', {})
  shutil.rmtree(directory, ignore_errors=True)  # on disk: only what this build writes
  os.makedirs(directory)
  start = time.perf_counter()
  backend = backends.get(name).create(directory, catalogue.embeddings.shape[1], 'float16',
                                      settings)
  for first in range(0, rows, CHUNK):
    part = np.arange(first, min(first + CHUNK, rows))
    backend.add(part, read_rows(catalogue.embeddings, first, part[-1] + 1),
                catalogue.row_product[part], catalogue.row_category[part])
  backend.save(directory)
  queries = catalogue.queries[:job['queries']]
  if name == 'exact':
    backend.search(queries[:1], 10)  # the rows go to the devices and the search compiles
  figures = {'backend': name, 'rows': rows, 'build_s': time.perf_counter() - start,
             'peak_rss': peak_rss_bytes(),
             'disk_bytes': sum(os.path.getsize(os.path.join(folder, f))
                               for folder, _, files in os.walk(directory) for f in files),
             'settings': settings}
  found = {}
  if name == 'faiss':
    import faiss
    from fashion_jax.search.backends import faiss_index
    del backend
    faiss.omp_set_num_threads(1)
    figures['structure'] = faiss_index.FaissBackend.load(directory, settings).describe()
    figures['sweep'] = []
    for nprobe in job.get('nprobes', []):
      # Reopened as `open` does, at another nprobe.
      swept = faiss_index.FaissBackend.load(directory, {**settings, 'nprobe': nprobe})
      measured = _measure(swept, catalogue, job['sweep_queries'])
      figures['sweep'].append({'nprobe': nprobe, **measured.pop('figures')})
      found.update({f'{mode}@{nprobe}': products for mode, products in measured.items()})
    start = time.perf_counter()
    backend = faiss_index.FaissBackend.load(directory, settings)
    figures['open_s'] = time.perf_counter() - start
  measured = _measure(backend, catalogue, len(queries))
  figures.update(measured.pop('figures'), rss_after=peak_rss_bytes())
  np.savez(os.path.join(directory, 'found.npz'), **measured, **found)
  return figures


def _measure(backend, catalogue: Catalogue, count: int) -> dict:
  """The first `count` queries, one per call, without ('all') and with their category filter
  ('category'): the products found [count, 10] by mode, and 'figures': p50 and p95 in ms by
  mode and 'foreign', the results in another category than the filter's."""
  from fashion_jax.search.backends.base import NO_CATEGORY
  queries = catalogue.queries[:count]
  found, figures = {}, {}
  for mode in ('all', 'category'):
    categories = (catalogue.query_category[:count] if mode == 'category'
                  else np.full(count, NO_CATEGORY))
    for query, category in zip(queries[:_WARM_UP], categories):
      backend.search(query[None], 10, int(category))
    found[mode] = np.full((count, 10), -1, np.int64)
    seconds = []
    for number, (query, category) in enumerate(zip(queries, categories)):
      before = time.perf_counter()
      _, products = backend.search(query[None], 10, int(category))
      seconds.append(time.perf_counter() - before)
      found[mode][number] = products[0]
    figures[f'ms_{mode}'] = [1e3 * float(np.median(seconds)),
                             1e3 * float(np.percentile(seconds, 95))]
  returned = found['category']
  figures['foreign'] = int(((returned >= 0) & (
      catalogue.product_category[np.maximum(returned, 0)] !=
      catalogue.query_category[:count, None])).sum())
  return {**found, 'figures': figures}


def run_in_process(job: dict, env: dict | None = None) -> dict:
  """run_backend in a fresh Python process (its own peak RSS); its figures."""
  out = subprocess.run([sys.executable, os.path.abspath(__file__), '--job', json.dumps(job)],
                       capture_output=True, text=True, env={**os.environ, **(env or {})},
                       cwd=_REPO)
  if out.returncode:
    raise RuntimeError(f"{job['backend']} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def product_recall(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean over queries of the share of truth's products [Q, k] (-1: none) found [Q, k]."""
  shares = []
  for got, want in zip(found, truth):
    want = set(want[want >= 0].tolist())
    if want:
      shares.append(len(want & set(got.tolist())) / len(want))
  return float(np.mean(shares))


# ---------------------------------------------------------------------------------------------
# The service

_CLIENTS = r'''
import http.client, json, statistics, sys, threading, time
host, port, path, photo, clients, warm, seconds = (
    sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]),
    float(sys.argv[6]), float(sys.argv[7]))
data = open(photo, 'rb').read()
def one(connection, timings):
    connection.request('POST', path, body=data,
                       headers={'Content-Type': 'application/octet-stream'})
    response = connection.getresponse()
    body = response.read()
    if response.status == 200:
        timings.append(json.loads(body)['timing_ms'])
    return response.status == 200
def client(connection, counts, timings, deadline):
    while time.perf_counter() < deadline:
        try:
            counts[0 if one(connection, timings) else 1] += 1
        except Exception:
            counts[1] += 1
            connection.close()
            connection = http.client.HTTPConnection(host, port, timeout=120)
def phase(connections, seconds):
    counts, timings = [[0, 0] for _ in connections], []
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c, n, timings, start + seconds))
               for c, n in zip(connections, counts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    medians = {key: statistics.median(t[key] for t in timings)
               for key in (timings[0] if timings else {})}
    return [sum(c[0] for c in counts), sum(c[1] for c in counts), time.perf_counter() - start,
            medians]
connections = [http.client.HTTPConnection(host, port, timeout=120) for _ in range(clients)]
warm_done = phase(connections, warm)[0]  # new batch sizes compile here, not in the count
cpu = time.process_time()
done, failed, elapsed, medians = phase(connections, seconds)
print(json.dumps({'done': done, 'failed': failed, 'seconds': elapsed, 'warm_done': warm_done,
                  'timing_ms': medians, 'client_cpu_s': time.process_time() - cpu}))
'''


def _cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a process, all its threads (Linux /proc)."""
  with open(f'/proc/{pid}/stat', encoding='ascii') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def demo_workdir(path: str | None, tmp: str) -> tuple[str, str]:
  """(workdir, description): the trained demo, or the demo architecture untrained (written
  under `tmp`)."""
  if path and os.path.isdir(os.path.join(path, 'checkpoints')) and os.listdir(
      os.path.join(path, 'checkpoints')):
    return path, f'trained demo checkpoint in {path}'
  import jax
  sys.path.insert(0, os.path.join(_REPO, 'configs'))
  import demo
  from fashion_jax import checkpointing, optim, train_step as ts
  from fashion_jax.models import build_model
  config = demo.get_config()
  workdir = tempfile.mkdtemp(prefix='demo-workdir-', dir=tmp)
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


def write_service_index(folder: str, workdir: str, rows: int, seed: int) -> dict:
  """An index directory of the demo model over `rows` generated rows at the model's width."""
  from PIL import Image
  from fashion_jax.search import index as search_index
  from fashion_jax.search.model import SearchModel
  model = SearchModel(workdir)
  catalogue = make_catalogue(folder, rows, model.embedding_dim, 0, seed)
  os.makedirs(os.path.join(folder, 'thumbs'))
  Image.new('RGB', (8, 8)).save(os.path.join(folder, 'thumbs', 'shared.jpg'))
  names = [f'category{c:02d}' for c in range(CATEGORIES)]
  with open(os.path.join(folder, 'items.jsonl'), 'w') as f:
    for row, (product, category) in enumerate(zip(catalogue.row_product,
                                                  catalogue.row_category)):
      f.write(json.dumps({'image': f'synthetic/{row}', 'product_id': f'p{product}',
                          'category': names[category], 'box': None,
                          'thumb': 'thumbs/shared.jpg'}) + '\n')
  meta = {'format': search_index.FORMAT, 'model': model.describe(), 'dtype': 'float16',
          'dim': model.embedding_dim, 'centroids': False, 'backend': 'exact',
          'backend_settings': {}, 'categories': names, 'count': rows, 'rows': rows,
          'products': len(catalogue.product_category)}
  with open(os.path.join(folder, 'index.json'), 'w') as f:
    json.dump(meta, f)
  return meta


def photo_bytes(seed: int = 0) -> bytes:
  from PIL import Image
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(out, format='JPEG', quality=90)
  return out.getvalue()


def _with_repo_on_path(env) -> dict:
  """`env` with this checkout first on PYTHONPATH, keeping what was there (packages installed
  with pip --target, say)."""
  path = [_REPO, *(p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p)]
  return {**env, 'PYTHONPATH': os.pathsep.join(path)}


def serve_and_load(index_dir: str, photo: str, batching: list[str], clients: list[int],
                   warm: float, seconds: float, env: dict | None = None) -> list[dict]:
  """Starts `serve` with the `batching` flags, drives it with each number of clients for
  `warm` seconds, then `seconds` counted; one {'clients', 'done', 'failed', 'seconds', 'load'}
  per number. A client thread counts a failure for any answer but 200 or any error."""
  server = subprocess.Popen(
      [sys.executable, '-m', 'fashion_jax.search', 'serve', '--index', index_dir, '--port', '0',
       '--quiet', *batching], cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=_with_repo_on_path(os.environ if env is None else env))
  try:
    line = server.stdout.readline()
    match = re.search(r'http://([^:/]+):(\d+)/', line)
    if not match:
      raise RuntimeError(f'serve did not start: {line}{server.stdout.read()[-3000:]}')
    host, port = match.group(1), int(match.group(2))
    deadline = time.monotonic() + 300
    while True:
      try:
        with urllib.request.urlopen(f'http://{host}:{port}/readyz', timeout=5) as response:
          if response.status == 200:
            break
      except OSError:
        if time.monotonic() > deadline or server.poll() is not None:
          raise RuntimeError('serve did not become ready') from None
        time.sleep(0.5)
    results = []
    for count in clients:
      load, cpu = os.getloadavg()[0], _cpu_seconds(server.pid)
      out = subprocess.run([sys.executable, '-c', _CLIENTS, host, str(port), '/api/search?k=10',
                            photo, str(count), str(warm), str(seconds)], capture_output=True,
                           text=True, check=True, timeout=warm + seconds + 300)
      figures = json.loads(out.stdout)
      # The server's CPU over the warm-up and the counted seconds, per request answered.
      figures['server_cpu_ms'] = 1e3 * (_cpu_seconds(server.pid) - cpu) / max(
          figures['done'] + figures['warm_done'], 1)
      results.append({'clients': count, **figures, 'load': (load, os.getloadavg()[0])})
    return results
  finally:
    server.terminate()
    server.wait(timeout=60)


# ---------------------------------------------------------------------------------------------
# Tables


def _times(ratio: float) -> str:
  return f'{ratio:.1f}x' if ratio >= 1 else f'{ratio:.3f}x'


def _gb(size: float) -> str:
  return f'{size / 1e9:.2f}'


def backend_table(figures: list[dict], found: dict, truths: dict, exact_queries: int) -> list:
  """Prints the backends' table; returns (name, rows, recall_all, recall_category) per row."""
  print('| backend (settings) | rows | build (s) | peak RSS, build (GB) | on disk (GB) | '
        'p50 / p95 (ms) | p50 / p95, filter (ms) | recall@10 | recall@10, filter | '
        'exact p50 / p50 | other category |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  recalls = []
  for fig in figures:
    exact = next(f for f in figures if f['backend'] == 'exact' and f['rows'] == fig['rows'])
    truth = truths[fig['rows']]
    got = found[(fig['backend'], fig['rows'])]
    recall = [product_recall(got[mode][:exact_queries], truth[mode][:len(got[mode])])
              for mode in ('all', 'category')]
    recalls.append((fig['backend'], fig['rows'], *recall))
    label = fig['backend'] + {'exact': ' (every core, the reference)',
                              'qdrant': " (embedded ':memory:', no server)"}.get(
                                  fig['backend'], '')
    if fig.get('structure'):
      label += f" ({fig['structure']}, 1 search thread)"
    disk = ('0 (+ embeddings.npy)' if fig['backend'] == 'exact'
            else '- (memory)' if fig['backend'] == 'qdrant' else _gb(fig['disk_bytes']))
    speedup = _times(exact['ms_all'][0] / fig['ms_all'][0])
    print(f"| {label} | {fig['rows']:,} | {fig['build_s']:.0f} | {_gb(fig['peak_rss'])} | {disk} "
          f"| {fig['ms_all'][0]:.1f} / {fig['ms_all'][1]:.1f} | {fig['ms_category'][0]:.1f} / "
          f"{fig['ms_category'][1]:.1f} | {recall[0]:.3f} | {recall[1]:.3f} | {speedup} | "
          f"{fig['foreign']} |")
  return recalls


def sweep_table(figures: list[dict], found: dict, truth: dict, queries: int) -> None:
  exact, faiss = figures[0], figures[1]
  print(f"| faiss ({faiss['structure'].split(', nprobe')[0]}), nprobe | queries | p50 / p95 (ms) | "
        'p50 / p95, filter (ms) | recall@10 | recall@10, filter | exact p50 / p50 | '
        'other category |')
  print('|---|---|---|---|---|---|---|---|')
  for run in faiss['sweep']:
    recall = [product_recall(found[f"{mode}@{run['nprobe']}"], truth[mode])
              for mode in ('all', 'category')]
    print(f"| {run['nprobe']} | {queries} | {run['ms_all'][0]:.1f} / {run['ms_all'][1]:.1f} | "
          f"{run['ms_category'][0]:.1f} / {run['ms_category'][1]:.1f} | {recall[0]:.3f} | "
          f"{recall[1]:.3f} | {_times(exact['ms_all'][0] / run['ms_all'][0])} | {run['foreign']} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--job', help=argparse.SUPPRESS)  # one backend, in a child process
  parser.add_argument('--rows', type=int, default=1_000_000)
  parser.add_argument('--dim', type=int, default=2_048)
  parser.add_argument('--queries', type=int, default=1_000)
  parser.add_argument('--exact-queries', type=int, default=200,
                      help='queries searched by exact (latency, ground truth, recall)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--faiss-settings', default='{}',
                      help='JSON of FAISS backend settings (factory, nprobe, train_rows, ...)')
  parser.add_argument('--faiss-nprobes', default='16,32,64,128',
                      help='nprobe values also searched (over the --exact-queries queries)')
  parser.add_argument('--qdrant-rows', type=int, default=20_000)
  parser.add_argument('--qdrant-queries', type=int, default=50,
                      help="queries searched by qdrant's embedded mode (seconds each)")
  parser.add_argument('--skip-qdrant', action='store_true')
  parser.add_argument('--skip-service', action='store_true')
  parser.add_argument('--skip-backends', action='store_true')
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--service-rows', type=int, default=100_000)
  parser.add_argument('--clients', default='1,8,32')
  parser.add_argument('--seconds', type=float, default=20.0,
                      help='counted seconds per number of clients')
  parser.add_argument('--warm-up', type=float, default=10.0,
                      help='seconds of load before each counted window (not counted)')
  parser.add_argument('--max-batch', type=int, default=16)
  parser.add_argument('--max-wait-ms', type=float, default=5.0)
  parser.add_argument('--tmp', help='folder for the catalogue and indexes (default: a temporary '
                      'one, removed at the end)')
  args = parser.parse_args()
  if args.job:
    print(json.dumps(run_backend(json.loads(args.job))))
    return
  if args.tmp:
    os.makedirs(args.tmp, exist_ok=True)
  tmp = args.tmp or tempfile.mkdtemp(prefix='search-bench-')
  try:
    print(f'CPUs: {os.cpu_count()}; load average (1 min) at the start: {os.getloadavg()[0]:.2f}',
          flush=True)
    if not args.skip_backends:
      backends_part(args, tmp)
    if not args.skip_service:
      service_part(args, tmp)
  finally:
    if not args.tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def backends_part(args, tmp: str) -> None:
  folder = os.path.join(tmp, 'catalogue')
  start = time.perf_counter()
  made_with = (args.rows, args.dim, args.queries, args.seed)
  catalogue = load_catalogue(folder, made_with)
  how = f'reused from {folder}'
  if catalogue is None:
    catalogue = make_catalogue(folder, *made_with)
    how = f'generated in {time.perf_counter() - start:.0f} s'
  shares = np.bincount(catalogue.row_category, minlength=CATEGORIES) / args.rows
  print(f'catalogue: {args.rows:,} rows x {args.dim:,} float16 ({_gb(catalogue.embeddings.nbytes)}'
        f' GB), {len(catalogue.product_category):,} products, {CATEGORIES} categories '
        f'(each {shares.min():.1%}-{shares.max():.1%} of the rows), {args.queries:,} queries; '
        f'{how}', flush=True)
  # Planned for the whole catalogue, as `index` does when it adds every row at once.
  faiss_settings = {'rows': args.rows, **json.loads(args.faiss_settings)}
  exact_queries = min(args.exact_queries, args.queries)
  sweep = {'nprobes': [int(n) for n in args.faiss_nprobes.split(',') if n],
           'sweep_queries': exact_queries}
  jobs = [('exact', args.rows, exact_queries, {}, {}),
          ('faiss', args.rows, args.queries, faiss_settings, sweep)]
  if not args.skip_qdrant:
    small = min(args.qdrant_rows, args.rows)
    jobs += [('exact', small, exact_queries, {}, {}),
             ('qdrant', small, min(args.qdrant_queries, exact_queries), {'path': ':memory:'},
              {})]
  figures, found, truths = [], {}, {}
  for name, rows, queries, settings, extra in jobs:
    directory = os.path.join(tmp, f'{name}-{rows}')
    load = os.getloadavg()[0]
    fig = run_in_process({'backend': name, 'rows': rows, 'queries': queries,
                          'catalogue': folder, 'directory': directory, 'settings': settings,
                          **extra},
                         env={'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1'}
                         if name == 'qdrant' else None)
    fig['load'] = (load, os.getloadavg()[0])
    print(f'{name} over {rows:,} rows: {json.dumps(fig)}', flush=True)
    with np.load(os.path.join(directory, 'found.npz')) as saved:
      found[(name, rows)] = {mode: saved[mode] for mode in saved.files}
    if name == 'exact':
      truths[rows] = found[(name, rows)]
    figures.append(fig)
    if name != 'exact':
      shutil.rmtree(directory, ignore_errors=True)
  print()
  print(f'recall@10 and latency of exact over the first {exact_queries} queries; faiss latency '
        f'over all {args.queries}; load average (1 min) before / after each backend: ' +
        ', '.join(f"{f['backend']} {f['load'][0]:.1f} / {f['load'][1]:.1f}" for f in figures))
  print()
  recalls = backend_table(figures, found, truths, exact_queries)
  print()
  if figures[1]['sweep']:
    sweep_table(figures, found[('faiss', args.rows)], truths[args.rows], exact_queries)
    print()
  exact, faiss = figures[0], figures[1]
  recall_all, recall_category = recalls[1][2:]
  speedup = exact['ms_all'][0] / faiss['ms_all'][0]
  checks = [
      ('faiss recall@10 >= 0.95, no filter', recall_all >= 0.95, f'{recall_all:.3f}'),
      ('faiss recall@10 >= 0.95, filter', recall_category >= 0.95, f'{recall_category:.3f}'),
      ('faiss p50 <= 10 ms', faiss['ms_all'][0] <= 10, f"{faiss['ms_all'][0]:.1f} ms"),
      ('faiss p50 <= 10 ms, filter', faiss['ms_category'][0] <= 10,
       f"{faiss['ms_category'][0]:.1f} ms"),
      ('faiss >= 20x faster than exact (p50)', speedup >= 20, f'{speedup:.1f}x'),
      ('faiss build <= 20 min', faiss['build_s'] <= 1200, f"{faiss['build_s'] / 60:.1f} min"),
      ('faiss peak RSS <= 10 GB', faiss['peak_rss'] <= 10e9, f"{_gb(faiss['peak_rss'])} GB"),
      ('a filtered query never returns another category', all(not f['foreign'] for f in figures),
       ', '.join(f"{f['backend']} {f['foreign']}" for f in figures))]
  _print_checks(checks)


def service_part(args, tmp: str) -> None:
  # This process only writes the checkpoint and the index; on a GPU it must not reserve most of
  # the device's memory (JAX's default) ahead of the server it starts, which would then find
  # little left. The server keeps the environment it was given.
  server_env = dict(os.environ)
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  workdir, which = demo_workdir(args.workdir, tmp)
  index_dir = os.path.join(tmp, 'service-index')
  shutil.rmtree(index_dir, ignore_errors=True)
  meta = write_service_index(index_dir, workdir, args.service_rows, args.seed)
  photo = os.path.join(tmp, 'photo.jpg')
  with open(photo, 'wb') as f:
    f.write(photo_bytes())
  clients = [int(c) for c in args.clients.split(',')]
  on = ['--max-batch', str(args.max_batch), '--max-wait-ms', str(args.max_wait_ms)]
  runs = {f'on ({" ".join(on)})': on, 'off (--max-batch 1)': ['--max-batch', '1']}
  runs = {name: serve_and_load(index_dir, photo, flags, clients, args.warm_up, args.seconds,
                               server_env)
          for name, flags in runs.items()}
  print()
  print(f"service: model {which}; index {meta['count']:,} rows x {meta['dim']} float16, "
        f"{meta['products']:,} products, backend exact; POST /api/search?k=10 with one 640x480 "
        f'JPEG, {args.seconds:g} s counted per row after {args.warm_up:g} s of the same load, '
        'loopback')
  print()
  print('| batching | clients | requests | failed | seconds | requests/s | server CPU per '
        'request (ms) | median decode / resize / embed / search (ms) | load avg (1 min) before / after |')
  print('|---|---|---|---|---|---|---|---|---|')
  rates = {}
  for name, results in runs.items():
    for r in results:
      rates[(name.split()[0], r['clients'])] = r['done'] / r['seconds']
      stages = ' / '.join(f"{r['timing_ms'].get(key, float('nan')):.1f}"
                          for key in ('decode', 'resize', 'embed', 'search'))
      print(f"| {name} | {r['clients']} | {r['done']} | {r['failed']} | {r['seconds']:.1f} | "
            f"{r['done'] / r['seconds']:.1f} | {r['server_cpu_ms']:.1f} | {stages} | "
            f"{r['load'][0]:.2f} / {r['load'][1]:.2f} |")
  print()
  failed = sum(r['failed'] for results in runs.values() for r in results)
  checks = [('0 failed requests', failed == 0, str(failed))]
  if 8 in clients:
    ratio = rates[('on', 8)] / rates[('off', 8)]
    checks.insert(0, ('batching on >= 2x batching off, 8 clients', ratio >= 2, f'{ratio:.2f}x'))
  _print_checks(checks)


def _print_checks(checks) -> None:
  print('| target | met | measured |')
  print('|---|---|---|')
  for name, met, value in checks:
    print(f"| {name} | {'yes' if met else 'NO'} | {value} |")


if __name__ == '__main__':
  main()
