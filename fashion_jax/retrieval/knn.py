"""All-pairs k-nearest neighbours of N points, each distance computed once: re-ranking's kNN.

Exact float32 lists and row maxima; on accelerators the products may run in bfloat16 with the
candidates re-scored in float32 and every list checked against a rounding bound.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax.retrieval import search

# Bytes of gathered candidate embeddings re-scored at once per CPU device (8x on accelerators).
_RESCORE_BYTES = 1 << 25

# Blocks at least this wide are reduced through group minima before the top-k (see _candidates).
_GROUPED_COLUMNS = 512


def _candidates(d: jax.Array, axis: int, start: jax.Array, real: jax.Array,
                k: int) -> tuple[jax.Array, jax.Array]:
  """Entries of d that may be among the k smallest of each line along `axis`, in index order.

  Args:
    d: [R, C] distances; line i runs along `axis` (rows for axis 1, columns for axis 0).
    axis: 1 for the rows' candidates, 0 for the columns' (d is not transposed: XLA's CPU
      transposes cost as much as the reduction itself).
    start: int32 scalar, the index of the first entry along `axis`.
    real: [d.shape[axis]] bool, False for padding entries (never returned before real ones).
    k: how many smallest entries are needed.

  Returns:
    values [L, m] float32 and indices [L, m] int32, L the lines, sorted by index.
  """
  length = d.shape[axis]
  masked = jnp.where(real if axis == 1 else real[:, None], d, jnp.inf)
  # Groups of about sqrt(C / k) entries balance the two top-k's that follow in the caller.
  group = 1 << max(round(np.log2(max(length / k, 1)) / 2), 0)
  if length < _GROUPED_COLUMNS or length % group or k * group >= length:
    values = masked if axis == 1 else masked.T
    return values, jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), values.shape)
  # The k smallest entries of a line lie in its k groups with the smallest minima (ordered by
  # minimum, then position): a top-k of C / group minima then picks k x group candidates.
  lines = d.shape[1 - axis]
  if axis == 1:
    minima = jnp.min(masked.reshape(lines, length // group, group), axis=2)
  else:
    minima = jnp.min(masked.reshape(length // group, group, lines), axis=1).T
  _, chosen = jax.lax.top_k(-minima, k)
  chosen = jnp.sort(chosen, axis=1)
  position = (chosen[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)).reshape(lines, -1)
  if axis == 1:
    values = jnp.take_along_axis(masked, position, axis=1)
  else:
    values = masked.ravel()[position * lines + jnp.arange(lines, dtype=jnp.int32)[:, None]]
  return values, start + position


def _merge(held_d, held_i, values, index, k):
  """Held [L, k] lists merged with candidates that all come after them in index order.

  lax.top_k keeps the lower position among equal values and the held lists come first, with
  smaller indices: ties stay ordered by index.
  """
  both_d = jnp.concatenate([held_d, values], axis=1)
  both_i = jnp.concatenate([held_i, index], axis=1)
  neg_d, pos = jax.lax.top_k(-both_d, k)
  return -neg_d, jnp.take_along_axis(both_i, pos, axis=1)


def _fold(lists, d, axis, start, real, reduced):
  """Merges the distances d ([R, C] from rows/columns `start`) into the lines' held lists.

  lists: (near_d, near_i[, far_d, far_i]) of the lines along `axis`, or with reduced=False
  (near_d, near_i, row_max). With reduced precision the largest distances are kept as a list
  too (far_d holds them negated), to be re-scored like the nearest ones.
  """
  near_d, near_i = _merge(lists[0], lists[1], *_candidates(d, axis, start, real, lists[0].shape[1]),
                          lists[0].shape[1])
  if not reduced:
    line_max = jnp.max(jnp.where(real if axis == 1 else real[:, None], d, -jnp.inf), axis=axis)
    return near_d, near_i, jnp.maximum(lists[2], line_max)
  far_d, far_i = _merge(lists[2], lists[3], *_candidates(-d, axis, start, real, lists[2].shape[1]),
                        lists[2].shape[1])
  return near_d, near_i, far_d, far_i


@functools.partial(jax.jit, static_argnames=('block', 'num_points', 'mesh'),
                   donate_argnums=(0,))
def _all_pairs_step(state, points, norms, pairs, block, num_points, mesh):
  """Folds the distance blocks of some block pairs into every device's lists.

  state: the lists of _fold for [devices x Np] rows, sharded on axis 0: each device's lists
    over the pairs it computed.
  points: [Np, D] padded points (float32, or bfloat16 for reduced-precision products),
    replicated; norms: [Np] float32 squared norms of the float32 points.
  pairs: [devices x steps, 3] int32 rows (a, b, valid) with b >= a, sharded: block a of the
    points against block b.
  """
  reduced = len(state) == 4

  def fold(state, rows_start, d, axis, cols_start, real):
    held = [jax.lax.dynamic_slice_in_dim(x, rows_start, block) for x in state]
    return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, rows_start, 0)
                 for x, y in zip(state, _fold(held, d, axis, cols_start, real, reduced)))

  def shard(state, points, norms, pairs):

    def body(state, pair):
      a_start, b_start, valid = pair[0] * block, pair[1] * block, pair[2] > 0
      a = jax.lax.dynamic_slice_in_dim(points, a_start, block)
      b = jax.lax.dynamic_slice_in_dim(points, b_start, block)
      cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)
      # The expansion of search.squared_distances, in the same order of operations.
      d = jnp.maximum(jax.lax.dynamic_slice_in_dim(norms, a_start, block)[:, None]
                      + jax.lax.dynamic_slice_in_dim(norms, b_start, block)[None, :]
                      - 2.0 * cross, 0.0)
      positions = jnp.arange(block, dtype=jnp.int32)
      # d(i, j) is computed once and serves both rows: half of the matrix is computed. Rows of
      # block b see the columns of block a before those of blocks >= b, so every row meets its
      # columns in increasing index order.
      state = fold(state, a_start, d, 1, b_start, valid & (b_start + positions < num_points))
      return fold(state, b_start, d, 0, a_start,
                  valid & (pair[0] != pair[1]) & (a_start + positions < num_points)), None

    state, _ = jax.lax.scan(body, state, pairs)
    return state

  sharded = P(search.GALLERY_AXIS)
  return jax.shard_map(shard, mesh=mesh, in_specs=(sharded, P(), P(), sharded),
                       out_specs=sharded)(state, points, norms, pairs)


@functools.partial(jax.jit, static_argnames=('k', 'devices', 'rows', 'sharding'))
def _merge_devices(state, k, devices, rows=None, sharding=None):
  """Each device's lists [devices x N, ...] merged into one per point.

  Returns (near_d, near_i) [N, k] sorted by (distance, index), and the row maxima [N] or, for
  reduced precision, the [N, m] far lists (most distant first, distances negated). With
  `rows`, the reduced-precision lists come cut or padded to that many rows and placed with
  `sharding` (as re-scoring takes them), in this one program.
  """

  def gather(x):
    x = x.reshape(devices, -1, *x.shape[1:])
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1) if x.ndim == 3 else x

  near_d, near_i = gather(state[0]), gather(state[1])
  # Devices hold interleaved index sets, so the merge sorts by (distance, index) explicitly.
  near_d, near_i = jax.lax.sort((near_d, near_i), dimension=1, num_keys=2)
  if len(state) == 3:
    return near_d[:, :k], near_i[:, :k], jnp.max(gather(state[2]), axis=0)
  far_d, far_i = jax.lax.sort((gather(state[2]), gather(state[3])), dimension=1, num_keys=2)
  far = state[2].shape[1]
  merged = near_d[:, :k], near_i[:, :k], far_d[:, :far], far_i[:, :far]
  if rows is None:
    return merged
  return tuple(search.resized_rows(x, rows, sharding) for x in merged)


def _empty_lists(rows: int, width: int, far: int, sharding) -> tuple:
  """The lists all_pairs_top_k starts from, made on the devices (search.device_full): the
  nearest [rows, width] (inf, index -1), then the farthest [rows, far] likewise or, with
  far = 0, the row maxima [rows] (-inf)."""
  near = [((rows, width), np.inf, np.float32), ((rows, width), -1, np.int32)]
  rest = ([((rows, far), np.inf, np.float32), ((rows, far), -1, np.int32)] if far
          else [((rows,), -np.inf, np.float32)])
  return search.device_full(near + rest, sharding)


@functools.partial(jax.jit, static_argnames=('low_dtype',))
def rounding_bound(points: jax.Array, low_dtype) -> jax.Array:
  """[N] float32: how far a distance from point i computed with products in `low_dtype` may lie
  from the float32 one, for every partner j.

  With x' the rounded points, |x_i.x_j - x'_i.x'_j| <= |x_i - x'_i| |x_j| + |x'_i| |x_j - x'_j|
  (Cauchy-Schwarz), plus float32 accumulation in either product, at most D u |a| |b| each
  (u = 2^-24), plus the rounding of |x_i|^2 + |x_j|^2 - 2 x_i.x_j. A 5% margin covers the
  rounding of this bound itself.
  """
  points = points.astype(jnp.float32)
  rounded = points.astype(low_dtype).astype(jnp.float32)
  norm = jnp.linalg.norm(points, axis=1)
  rounded_norm = jnp.linalg.norm(rounded, axis=1)
  residual = jnp.linalg.norm(points - rounded, axis=1)
  u = np.float32(2.0 ** -24)
  accumulation = points.shape[1] * u / (1.0 - points.shape[1] * u)
  largest, largest_rounded = jnp.max(norm), jnp.max(rounded_norm)
  cross = (residual * largest + rounded_norm * jnp.max(residual)
           + accumulation * (rounded_norm * largest_rounded + norm * largest))
  formula = 8.0 * u * (norm + largest) ** 2
  return 1.05 * (2.0 * cross + formula)


def _rescore(rows, near_d, near_i, far_d, far_i, points, bound, k):
  """Re-scores one chunk of rows' reduced-precision candidates in float32.

  points: [Np, D] float32; rows: [n] int32 the rows' point indices; near_*: [n, kc] candidates
  by low-precision distance; far_*: [n, m] the farthest ones (distances negated); bound: [Np]
  rounding_bound of every point.
  Returns index [n, k], distances [n, k], row_max [n] and whether the row is certified exact:
  every point outside the candidates lies beyond the k-th distance, and none outside the far
  list beyond the maximum found.
  """
  exact = search.gathered_squared_distances(points[rows], points,
                                            jnp.concatenate([near_i, far_i], axis=1))
  kc = near_i.shape[1]
  near, index = jax.lax.sort((exact[:, :kc], near_i), dimension=1, num_keys=2)
  row_max = jnp.max(exact[:, kc:], axis=1)
  certified = ((near_d[:, -1] - bound[rows] > near[:, k - 1])
               & (-far_d[:, -1] + bound[rows] <= row_max))
  return index[:, :k], near[:, :k], row_max, certified


@functools.partial(jax.jit, static_argnames=('fn', 'chunk', 'mesh', 'static'))
def _map_rows(fn, chunk, mesh, row_args, shared_args, static):
  sharded = P(search.GALLERY_AXIS)

  def shard(row_args, shared_args):
    def one(chunk_args):
      return fn(*chunk_args, *shared_args, **dict(static))
    chunks = jax.tree.map(lambda x: x.reshape(-1, chunk, *x.shape[1:]), row_args)
    out = jax.lax.map(one, chunks)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)

  return jax.shard_map(shard, mesh=mesh, in_specs=(sharded, P()), out_specs=sharded)(
      row_args, shared_args)


def map_rows(fn, mesh: jax.sharding.Mesh, chunk: int, row_args: tuple, shared_args: tuple = (),
             **static):
  """fn(*row chunk arrays, *shared arrays, **static) over chunks of `chunk` rows, rows dealt
  over the mesh's devices.

  row_args: arrays [R, ...] with R a multiple of chunk x devices, placed with
  NamedSharding(mesh, P(GALLERY_AXIS)) or on the host; shared_args are replicated. fn must be a
  module-level function and `static` hashable (they are static arguments of the compiled
  program). Returns fn's
  outputs for all R rows, sharded like the rows: memory per device O(R / devices + chunk work).
  """
  return _map_rows(fn, chunk, mesh, tuple(row_args), tuple(shared_args),
                   tuple(sorted(static.items())))


def placed_points(parts, mesh: jax.sharding.Mesh, multiple: int) -> jax.Array:
  """The row blocks `parts` ([n_i, D] host arrays) stacked and padded with zeros to a multiple
  of `multiple` rows, as one array replicated on every device of the mesh.

  Written into the devices' array block by block (search.placed_rows): no stacked copy on the
  host, one copy on each device.
  """
  size = sum(len(p) for p in parts)
  return search.placed_rows(parts, size + -size % multiple, NamedSharding(mesh, P()))


@jax.jit
def _norms(points):
  return jnp.sum(points * points, axis=1)


def all_pairs_top_k(points: jax.Array, num_points: int, k: int, *, block: int, mesh,
                    precision: str = 'float32', candidates: int | None = None, far: int = 8,
                    progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """top_k(points, points, k) computing each distance once, exact: the kNN step of re-ranking.

  The points are cut into blocks; every pair of blocks (a, b), b >= a, gives one [block, block]
  distance matrix that updates the lists of the rows of a and, without a transpose, those of b.
  The pairs are dealt out over the mesh's devices (each holds all points and its own lists,
  merged at the end). Memory O(N x (D + k x devices) + block^2).

  With precision='bfloat16' the products take bfloat16 inputs (float32 accumulation), each
  point keeps `candidates` nearest and `far` farthest by those distances, which are then
  re-scored in float32; a point whose lists a rounding bound (rounding_bound) cannot certify
  is searched again in float32 (search.top_k). Results are the same either way.

  Args:
    points: [Np, D] float32 (or bfloat16/float16) points, replicated on the mesh
      (placed_points), Np a multiple of `block`; rows past num_points are padding.
    num_points: N, the real points.
    k: list length, <= N.
    block: block side.
    mesh: the devices (search.gallery_mesh).
    precision: 'float32' or 'bfloat16', the products' inputs.
    candidates: list length before re-scoring (default 4 k), for bfloat16.
    far: farthest points kept for the row maxima, for bfloat16.
    progress: optional callable(stage, num_done, total) over the block pairs; with bfloat16
      also ('kNN certified', certified points, N).

  Returns:
    index [N, k] int32, distances [N, k] float32 (nearest first, ties by index), row_max [N]
    float32: as search.top_k(points, points, k) returns them.
  """
  if precision not in ('float32', 'bfloat16'):
    raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
  reduced = precision == 'bfloat16' and points.dtype == jnp.float32
  padded = points.shape[0]
  num_blocks = -(-num_points // block)
  devices = mesh.devices.size
  a, b = np.triu_indices(num_blocks)
  # Pair p goes to device p % devices; every device gets the same number of steps, padded with
  # invalid pairs, and the steps are cut into calls so progress can be reported.
  per_device = -(-len(a) // devices)
  calls = min(per_device, 20)
  steps = -(-per_device // calls)
  pairs = np.zeros((steps * calls * devices, 3), np.int32)
  pairs[:len(a)] = np.stack([a, b, np.ones_like(a)], axis=1)
  pairs = pairs.reshape(steps * calls, devices, 3).transpose(1, 0, 2)
  sharded = NamedSharding(mesh, P(search.GALLERY_AXIS))
  width = min(candidates or 4 * k, num_points) if reduced else k
  far = min(far, num_points) if reduced else 0
  state = _empty_lists(devices * padded, width, far, sharded)
  norms = _norms(points.astype(jnp.float32) if reduced else points)
  products = _to_bfloat16(points) if reduced else points
  for call in range(calls):
    chunk = pairs[:, call * steps:(call + 1) * steps].reshape(devices * steps, 3)
    state = _all_pairs_step(state, products, norms, jax.device_put(chunk, sharded), block,
                            num_points, mesh)
    if progress is not None:
      # Waiting makes progress report finished work, not queued work.
      jax.block_until_ready(state)
      progress('kNN', min((call + 1) * steps * devices, len(a)), len(a))
  del products
  if not reduced:
    merged = _merge_devices(state, width, devices)
    del state
    return tuple(np.asarray(x)[:num_points] for x in (merged[1], merged[0], merged[2]))
  # Rows of re-scoring at once: their gathered [rows, candidates + far, D] take ~_RESCORE_BYTES.
  budget = _RESCORE_BYTES * (1 if mesh.devices.flat[0].platform == 'cpu' else 8)
  chunk = 1 << int(np.clip(np.log2(budget / ((width + far) * points.shape[1] * 4)), 0, 10))
  rows = -(-num_points // (chunk * devices)) * chunk * devices
  # The candidate lists stay on the devices, cut or padded to the rows re-scored (padding
  # rows' lists are re-scored against the last point and dropped).
  merged = _merge_devices(state, width, devices, rows=rows, sharding=sharded)
  del state
  return _rescored(points, num_points, k, merged, chunk, mesh, progress)


@jax.jit
def _to_bfloat16(points):
  return points.astype(jnp.bfloat16)


def _rescored(points, num_points, k, merged, chunk, mesh, progress):
  """The certified float32 lists of the bfloat16 candidates (merged: [R, ...] on the devices,
  R a multiple of chunk x devices); the rest searched again."""
  rows = np.minimum(np.arange(len(merged[0]), dtype=np.int32), num_points - 1)
  index, distances, row_max, certified = map_rows(
      _rescore, mesh, chunk, (rows, *merged), (points, rounding_bound(points, jnp.bfloat16)), k=k)
  index, distances, row_max, certified = (np.array(x)[:num_points]
                                          for x in (index, distances, row_max, certified))
  if progress is not None:
    progress('kNN certified', int(certified.sum()), num_points)
  failed = np.flatnonzero(~certified)
  if len(failed):
    # Searched on the devices' copy of the points: only the failed rows come to the host.
    index[failed], distances[failed], row_max[failed] = search.top_k(
        np.asarray(points[failed]), points[:num_points], k, devices=mesh.devices.ravel())
  return index, distances, row_max
