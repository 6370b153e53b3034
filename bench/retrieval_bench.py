"""Retrieval engine benchmark: exact metrics and k-reciprocal re-ranking time and peak memory.

Prints one table; each case runs in a fresh process so its peak resident set size is its own.
Wall and CPU seconds are both given, with the 1-minute load average at the start and end of
each case: on a shared machine the wall time grows with the load, the CPU time much less.

  PYTHONPATH=. .venv/bin/python bench/retrieval_bench.py                  # CPU cases
  PYTHONPATH=. .venv/bin/python bench/retrieval_bench.py --cases=metrics,dense_metrics,matmul
  PYTHONPATH=. .venv/bin/python bench/retrieval_bench.py --cases=gpu_rerank  # on one GPU
  PYTHONPATH=. .venv/bin/python bench/retrieval_bench.py --cases=transfer    # on one GPU
  PYTHONPATH=. .venv/bin/python bench/retrieval_bench.py --cases=rerank --baseline=ce28aeb~2

--baseline=REV runs each case a second time with the library as committed at REV (extracted
with `git archive` to a temporary folder), on the same data, and prints that row and the ratio.
For re-ranking, "stages" gives the time at which each stage ended within the timed call and
"re-rank RSS" the process's peak resident set while re-ranking (the kernel's peak mark is reset
just before, where /proc/self/clear_refs allows, so the data generation's own peak does not
count; elsewhere the process's peak so far), embeddings included. Each stage's end also prints
the resident set then and the peak so far. "peak RSS" is the whole process's, the metrics' chunks
of chunk_size x G distances included.

"transfer" sends one [G, D] float32 array to the first device twice, and gives the resident set
after each: written block by block as placed_rows does ("time"), then with one device_put of the
whole array ("first call" column). A GPU runtime stages each host-to-device copy in pinned host
memory from a pool that keeps its size, so the rise after each is what that way of sending
leaves in the process.
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

# name: (what it runs, Q, G, D, description)
CASES = {
    'metrics': ('metrics', 2_000, 20_000, 512, 'exact mAP/Acc@k, chunked JAX'),
    'dense_metrics': ('dense_metrics', 2_000, 20_000, 512,
                      'dense NumPy protocol: full matrix, argsort per row, loop'),
    'matmul': ('matmul', 2_000, 20_000, 512, 'the [Q, G] distance matrix alone (jitted)'),
    'metrics_large': ('metrics', 1_000, 200_000, 2_048, 'exact mAP/Acc@k, a 1.6 GB gallery'),
    'rerank': ('rerank', 1_000, 9_000, 512, 'k-reciprocal re-ranking + metrics, N=10k'),
    'rerank_large': ('rerank', 5_000, 45_000, 2_048, 'k-reciprocal re-ranking + metrics, N=50k'),
    'gpu_rerank': ('rerank', 10_000, 400_000, 2_048, 'Street2Shop-sized re-ranking (GPU)'),
    'transfer': ('transfer', 0, 400_000, 1_024,
                 "host memory of sending 1.6 GB to a device: placed_rows' blocks, then whole"),
}
# Re-ranking is timed twice (first call compiles) where that is affordable.
RERANK_CALLS = {'rerank': 2, 'rerank_large': 1, 'gpu_rerank': 1}


def clustered(num_queries: int, gallery_size: int, dim: int, seed: int = 0):
  """Unit embeddings around one centre per item, two gallery images per item (as in shops)."""
  rng = np.random.default_rng(seed)
  num_items = gallery_size // 2
  gallery_ids = rng.permutation(np.arange(gallery_size) % num_items)
  query_ids = rng.integers(0, num_items, size=num_queries)

  def around(ids):
    # Made in pieces of rows, in place: the same values as at once (the generator's stream is
    # drawn in the same order), without [len(ids), D] temporaries beside the result.
    x = np.empty((len(ids), dim), np.float32)
    for start in range(0, len(ids), 8192):
      piece = x[start:start + 8192]
      rng.standard_normal(piece.shape, dtype=np.float32, out=piece)
      piece += centres[ids[start:start + 8192]]
      piece /= np.linalg.norm(piece, axis=1, keepdims=True)
    return x

  # Centres of norm ~2.4 D^(1/4) against unit noise per dimension: the item signal is comparable
  # to the noise's fluctuation in distance at any D, so the retrieval is neither trivial nor
  # hopeless (mAP around 0.5 at G = 20,000).
  centres = 2.4 * dim ** -0.25 * rng.standard_normal((num_items, dim), dtype=np.float32)
  return around(query_ids), around(gallery_ids), query_ids, gallery_ids


def dense_protocol(query_emb, gallery_emb, query_ids, gallery_ids, ks=(1, 5, 10, 20, 50)):
  """The common dense evaluation: [Q, G] distances, a full argsort, a loop over queries."""
  distances = ((query_emb ** 2).sum(1)[:, None] + (gallery_emb ** 2).sum(1)[None]
               - 2.0 * query_emb @ gallery_emb.T)
  order = np.argsort(distances, axis=1, kind='stable')
  matches = gallery_ids[order] == query_ids[:, None]
  aps, hits = [], np.zeros(len(ks))
  for row in matches:
    if not row.any():
      continue
    precision = np.cumsum(row) / np.arange(1, len(row) + 1)
    aps.append(precision[row].mean())
    first = np.flatnonzero(row)[0]
    hits += [first < k for k in ks]
  return {'mAP': float(np.mean(aps)), 'acc@1': hits[0] / len(aps)}


class Timer:
  """Wall and CPU (all threads of this process) seconds of a with-block."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _status_gb(field: str) -> float | None:
  """A memory field of /proc/self/status (VmRSS, VmHWM) in GB; None where there is none."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024 / 1e9
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets this process's peak resident set mark (VmHWM; Linux 4.0+); False where it cannot."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return _status_gb('VmHWM') is not None
  except OSError:
    return False


class StageLog:
  """A `progress` callback that prints each stage's end time to stderr (seen while it runs) and
  keeps them, in order; other reports (e.g. the kNN's certified rows) are printed as they come."""

  def __init__(self, prefix: str):
    self.prefix, self.start, self.ends = prefix, time.perf_counter(), {}
    self.first_block_call = None

  def __call__(self, stage: str, done: int, total: int) -> None:
    if stage == 'kNN certified':
      print(f'  {self.prefix}: {done} of {total} kNN lists certified, the rest searched again'
            f'{self._memory()}', file=sys.stderr, flush=True)
    elif stage == 'kNN' and not self.first_block_call:
      # The first of the kNN's calls has compiled its program and made its lists.
      self.first_block_call = time.perf_counter() - self.start
      print(f'  {self.prefix}: first kNN call done at {self.first_block_call:.1f} s'
            f'{self._memory()}', file=sys.stderr, flush=True)
    elif done >= total and stage not in self.ends:
      self.ends[stage] = time.perf_counter() - self.start
      print(f'  {self.prefix}: {stage} done at {self.ends[stage]:.1f} s{self._memory()}',
            file=sys.stderr, flush=True)

  @staticmethod
  def _memory() -> str:
    rss, peak = _status_gb('VmRSS'), _status_gb('VmHWM')
    return f' (RSS {rss:.2f} GB, peak {peak:.2f} GB)' if rss and peak else ''


def run_case(name: str, dtype: str, knn_precision: str | None) -> dict:
  """One case in this process: returns timings (s), metrics and this process's peak RSS."""
  kind, num_queries, gallery_size, dim, _ = CASES[name]
  query_emb, gallery_emb, query_ids, gallery_ids = clustered(num_queries, gallery_size, dim)
  result = {'load_start': os.getloadavg()[0]}
  if kind == 'transfer':
    import jax

    from fashion_jax.retrieval import search
    device = jax.devices()[0]
    result['device'] = str(device)
    jax.block_until_ready(jax.device_put(np.ones((1024, dim), np.float32), device))
    held, rises = _status_gb('VmRSS'), []
    for way in ('blocks', 'whole'):
      with Timer() as timer:
        sent = (search.placed_rows([gallery_emb], gallery_size,
                                   jax.sharding.SingleDeviceSharding(device))
                if way == 'blocks' else jax.device_put(gallery_emb, device))
        jax.block_until_ready(sent)
      del sent
      rss = _status_gb('VmRSS')
      rises.append(f'{rss - held:+.2f} GB' if rss and held else '?')
      result['seconds' if way == 'blocks' else 'first_call_seconds'] = timer.wall
      result['cpu_seconds'] = timer.cpu
    print(f'  transfer: RSS {held:.2f} GB before; {gallery_emb.nbytes / 1e9:.2f} GB sent in '
          f'placed_rows blocks: {rises[0]}; then whole: {rises[1]}', file=sys.stderr, flush=True)
  elif kind == 'dense_metrics':
    with Timer() as timer:
      result['metrics'] = dense_protocol(query_emb, gallery_emb, query_ids, gallery_ids)
    result['seconds'], result['cpu_seconds'] = timer.wall, timer.cpu
  elif kind == 'matmul':
    import jax
    import jax.numpy as jnp

    from fashion_jax.retrieval import search
    # The product every exact evaluation must compute, in query chunks of the metrics' size.
    smallest = jax.jit(lambda q, g: jnp.min(search.squared_distances(q, g), axis=1))
    gallery = jnp.asarray(gallery_emb)
    for key in ('first_call_seconds', 'seconds'):
      with Timer() as timer:
        for start in range(0, num_queries, 256):
          np.asarray(smallest(query_emb[start:start + 256], gallery))
      result[key], result['cpu_seconds'] = timer.wall, timer.cpu
  else:
    import jax
    import jax.numpy as jnp

    from fashion_jax.retrieval import metrics, rerank
    if dtype != 'float32':
      query_emb = np.asarray(jnp.asarray(query_emb, dtype))
      gallery_emb = np.asarray(jnp.asarray(gallery_emb, dtype))
    result['device'] = str(jax.devices()[0])
    reranked, rerank_cpu = None, 0.0
    if kind == 'rerank':
      # Only passed when asked for, so that a --baseline library without the option runs too.
      options = {'knn_precision': knn_precision} if knn_precision else {}
      # The runtime's own libraries (cuBLAS on GPUs) load on first use: a small product and
      # top-k first, so that "from" below counts them and the rise is the re-ranking's.
      before = _status_gb('VmRSS')
      warm = jax.jit(lambda a: jax.lax.top_k(a @ a.T, 8))(jnp.ones((1024, dim), jnp.float32))
      jax.block_until_ready(warm)
      result['held_rss_gb'] = _status_gb('VmRSS')
      if before and result['held_rss_gb']:
        print(f'  {name}: RSS {before:.2f} GB with the embeddings, {result["held_rss_gb"]:.2f} '
              'GB once the runtime ran a product and a top-k', file=sys.stderr, flush=True)
      reset = _reset_peak_rss()
      for call in range(RERANK_CALLS[name]):
        # The previous call's result is dropped first, as a repeated evaluation would.
        reranked = None
        log = StageLog(f'{name} call {call + 1}')
        with Timer() as timer:
          reranked = rerank.k_reciprocal_rerank(query_emb, gallery_emb, progress=log, **options)
        if call == 0:
          result['rerank_first_call_seconds'] = timer.wall
        result['rerank_seconds'], rerank_cpu = timer.wall, timer.cpu
        result['stages'] = log.ends
      result['rerank_rss_gb'] = (_status_gb('VmHWM') if reset else
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    # The first call compiles; the second is the steady state a repeated evaluation sees.
    for key in ('first_call_seconds', 'seconds'):
      with Timer() as timer:
        scores = metrics.evaluate_retrieval(query_emb, gallery_emb, query_ids, gallery_ids,
                                            rerank=reranked)
      result[key], result['cpu_seconds'] = timer.wall, timer.cpu + rerank_cpu
    result['metrics'] = {'mAP': scores['mAP'], 'acc@1': scores['acc@1']}
    if kind == 'rerank':
      result['seconds'] += result['rerank_seconds']
      stats = jax.devices()[0].memory_stats() or {}
      if 'peak_bytes_in_use' in stats:
        result['peak_device_gb'] = stats['peak_bytes_in_use'] / 1e9
  # Linux reports ru_maxrss in kilobytes.
  result['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  result['load_end'] = os.getloadavg()[0]
  return result


def run_child(name: str, args, env=None) -> dict | str:
  """One case in a fresh process: its result, or why there is none."""
  command = [sys.executable, __file__, f'--child={name}', f'--dtype={args.dtype}']
  if args.knn_precision:
    command.append(f'--knn_precision={args.knn_precision}')
  try:
    # stderr passes through: the stages' progress lines appear as the case runs.
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.timeout,
                          env=env)
  except subprocess.TimeoutExpired:
    return f'no result within --timeout={args.timeout} s'
  if done.returncode:
    return f'failed (exit {done.returncode})'
  return json.loads(done.stdout.strip().splitlines()[-1])


def table_row(name: str, r: dict | str, label: str = '') -> str:
  _, q, g, d, what = CASES[name]
  if isinstance(r, str):
    return f'| {name}{label} | {q} | {g} | {d} | {what} | {r} |'
  extra = f' (re-rank {r["rerank_seconds"]:.1f})' if 'rerank_seconds' in r else ''
  first = f'{r.get("first_call_seconds", float("nan")):.1f}'
  if 'rerank_first_call_seconds' in r:
    first += f' (re-rank {r["rerank_first_call_seconds"]:.1f})'
  device = f', device peak {r["peak_device_gb"]:.1f} GB' if 'peak_device_gb' in r else ''
  scores = r.get('metrics', {})
  stages = ', '.join(f'{stage} {end:.1f}' for stage, end in r.get('stages', {}).items()) or '-'
  rerank_rss = f'{r["rerank_rss_gb"]:.2f}' if 'rerank_rss_gb' in r else '-'
  if r.get('held_rss_gb'):
    rerank_rss += f' (from {r["held_rss_gb"]:.2f})'
  return (f'| {name}{label} | {q} | {g} | {d} | {what}{device} | {r["seconds"]:.1f}{extra} | '
          f'{r["cpu_seconds"]:.1f} | {first} | {r["peak_rss_gb"]:.2f} | {rerank_rss} | {stages} | '
          f'{r["load_start"]:.1f}-{r["load_end"]:.1f} | {scores.get("mAP", float("nan")):.4f} | '
          f'{scores.get("acc@1", float("nan")):.4f} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default='metrics,dense_metrics,matmul,rerank',
                      help=f'comma-separated, from {", ".join(CASES)}')
  parser.add_argument('--dtype', default='float32', help='embedding dtype for the JAX cases')
  parser.add_argument('--knn_precision', default=None,
                      help="re-ranking's kNN products: 'float32' or 'bfloat16' (default: the "
                           "library's choice for the device)")
  parser.add_argument('--baseline', default=None,
                      help='a git revision: run each case with the library at it too')
  parser.add_argument('--timeout', type=float, default=None, help='seconds allowed per case')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(run_case(args.child, args.dtype, args.knn_precision)))
    return
  names = args.cases.split(',')
  unknown = [n for n in names if n not in CASES]
  if unknown:
    raise SystemExit(f'unknown cases {unknown}; choose from {", ".join(CASES)}')
  print(f'# {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {platform.processor() or "cpu"}'
        f', {os.cpu_count()} CPUs, dtype {args.dtype}')
  print('| case | Q | G | D | what | time (s) | CPU (s) | first call (s) | peak RSS (GB) '
        '| re-rank RSS (GB) | stages (end, s) | load | mAP | Acc@1 |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  previous = None
  if args.baseline:
    previous = tempfile.TemporaryDirectory()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(['git', '-C', root, 'archive', args.baseline, 'fashion_jax'],
                             stdout=subprocess.PIPE, check=True).stdout
    subprocess.run(['tar', '-x', '-C', previous.name], input=archive, check=True)
  ratios = []
  for name in names:
    result = run_child(name, args)
    print(table_row(name, result), flush=True)
    if previous is None:
      continue
    # The baseline never gets --knn_precision: its library may not have the option.
    old_args = argparse.Namespace(**{**vars(args), 'knn_precision': None})
    old = run_child(name, old_args, env={**os.environ, 'PYTHONPATH': previous.name})
    print(table_row(name, old, f' at {args.baseline}'), flush=True)
    if isinstance(result, dict) and isinstance(old, dict):
      key = 'rerank_seconds' if 'rerank_seconds' in result else 'seconds'
      ratios.append(f'{name}: {key} {old[key]:.1f} -> {result[key]:.1f} '
                    f'({old[key] / result[key]:.2f}x), CPU {old["cpu_seconds"]:.1f} -> '
                    f'{result["cpu_seconds"]:.1f}, peak RSS {old["peak_rss_gb"]:.2f} -> '
                    f'{result["peak_rss_gb"]:.2f} GB')
  for line in ratios:
    print(f'\nAgainst {args.baseline}: {line}')


if __name__ == '__main__':
  main()
