"""Query-gallery distance blocks and chunked exact top-k: the kernels every retrieval step shares.

Distances are squared Euclidean in float32, computed block by block so no [Q, G] array exists.
Galleries are sharded over all local devices (mesh axis GALLERY_AXIS); results do not depend on
the number of devices.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axis the gallery is sharded over, one shard per device.
GALLERY_AXIS = 'gallery'


class Reranked(NamedTuple):
  """Re-ranked distances of Q queries to G gallery items, stored sparsely (see rerank.py).

  final(i, j) = scale[i] * ||q_i - g_j||^2 + (1 - lambda) * J(i, j), where J(i, j) is
  jaccard[i, s] when jaccard_index[i, s] == j and 1 otherwise (no shared neighbours).

  scale: [Q] float32, lambda / (largest squared distance of query i to all N points).
  jaccard_index: [Q, W] int32 gallery indices, -1 for padding.
  jaccard: [Q, W] float32 Jaccard distances at those indices.
  lam: the lambda weight of the original distance.

  jaccard_index and jaccard are host arrays, or jax Arrays where the re-ranking left them on
  the devices (its result_on_device, the default on accelerators).
  """
  scale: np.ndarray
  jaccard_index: np.ndarray | jax.Array
  jaccard: np.ndarray | jax.Array
  lam: float

  def select(self, rows) -> 'Reranked':
    """The re-ranked rows of some queries (a slice, index or boolean array over Q).

    Pass it with the same queries' embeddings, e.g. to draw the ranked lists of a few queries:
    `rank_gallery(query_emb[rows], gallery_emb, k, rerank=reranked.select(rows))`.
    """
    return Reranked(self.scale[rows], self.jaccard_index[rows], self.jaccard[rows], self.lam)


@jax.jit
def _count_not_finite(x: jax.Array) -> jax.Array:
  return jnp.sum(~jnp.isfinite(x).all(axis=1))


def check_finite(embeddings, which: str, rows_per_check: int = 65536) -> None:
  """Raises ValueError when rows of `embeddings` [N, D] hold NaN or inf, which every distance
  then is: ranked by them, such rows would give metrics that mean nothing. Checked in blocks of
  `rows_per_check` rows, so the host holds no [N, D] temporary."""
  if isinstance(embeddings, jax.Array):
    bad = int(_count_not_finite(embeddings))
  else:
    bad = sum(int(np.count_nonzero(~np.isfinite(embeddings[i:i + rows_per_check]).all(axis=1)))
              for i in range(0, len(embeddings), rows_per_check))
  if bad:
    raise ValueError(f'{bad} of the {len(embeddings)} {which} embeddings are not finite (NaN or '
                     'inf); the model that made them has non-finite weights or inputs')


def gallery_mesh(devices=None) -> jax.sharding.Mesh:
  """These devices (default: all local devices) on the GALLERY_AXIS mesh axis."""
  return jax.sharding.Mesh(np.array(jax.local_devices() if devices is None else list(devices)),
                           (GALLERY_AXIS,))


def squared_distances(queries: jax.Array, gallery: jax.Array) -> jax.Array:
  """queries: [Q, D], gallery: [G, D] (any float dtype) -> [Q, G] float32 squared distances.

  Low-precision embeddings are multiplied with float32 accumulation; float32 ones in full
  float32 (HIGHEST), since accelerators default to TF32/bf16 passes.
  """
  cross = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
  q = queries.astype(jnp.float32)
  g = gallery.astype(jnp.float32)
  squared = jnp.sum(q * q, axis=1)[:, None] + jnp.sum(g * g, axis=1)[None, :] - 2.0 * cross
  return jnp.maximum(squared, 0.0)


def gathered_squared_distances(queries: jax.Array, gallery: jax.Array,
                               index: jax.Array) -> jax.Array:
  """queries: [Q, D], gallery: [G, D], index: [Q, P] -> [Q, P] float32 ||q_i - g_index[i,p]||^2.

  The same expansion as `squared_distances`, so ties between exactly representable distances
  are ties here too. Negative indices give meaningless values; callers mask them.
  """
  picked = gallery[jnp.clip(index, 0)]
  cross = jnp.einsum('qd,qpd->qp', queries, picked, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
  q = queries.astype(jnp.float32)
  g = picked.astype(jnp.float32)
  squared = jnp.sum(q * q, axis=1)[:, None] + jnp.sum(g * g, axis=2) - 2.0 * cross
  return jnp.maximum(squared, 0.0)


def block_distances(queries: jax.Array, gallery: jax.Array, start: jax.Array,
                    rerank: Reranked | None) -> jax.Array:
  """Ranking distances of a query chunk to the gallery block starting at index `start`.

  Args:
    queries: [Qc, D].
    gallery: [Gc, D], gallery items start .. start + Gc - 1.
    start: int32 scalar.
    rerank: None, or a Reranked whose arrays hold the rows of this query chunk.

  Returns:
    [Qc, Gc] float32: squared distances, or re-ranked distances when `rerank` is given.
  """
  squared = squared_distances(queries, gallery)
  if rerank is None:
    return squared
  rows = jnp.broadcast_to(jnp.arange(squared.shape[0])[:, None], rerank.jaccard_index.shape)
  # Padding (-1) and indices outside this block are sent past its end and dropped; a negative
  # column would wrap around instead.
  local = rerank.jaccard_index - start
  cols = jnp.where((rerank.jaccard_index >= 0) & (local >= 0), local, squared.shape[1])
  jaccard = jnp.ones_like(squared).at[rows, cols].set(rerank.jaccard, mode='drop')
  return rerank.scale[:, None] * squared + (1.0 - rerank.lam) * jaccard


# Blocks at least this wide are merged through group minima (see _merge_top_k).
_GROUPED_MERGE_COLUMNS = 2048


def _merge_top_k(best_d: jax.Array, best_i: jax.Array, d: jax.Array, start: jax.Array,
                 k: int) -> tuple[jax.Array, jax.Array]:
  """Running top-k lists merged with a block of columns, ties by index.

  Args:
    best_d, best_i: [R, k] distances and indices held so far, sorted (distance, index).
    d: [R, C] distances to columns start .. start + C - 1, all after the held indices.
    start: int32 scalar.
    k: list length.

  Returns:
    The merged [R, k] lists.
  """
  rows, cols = d.shape
  # Groups of about sqrt(C / k) columns balance the two top-k's below.
  group = 1 << max(round(np.log2(max(cols / k, 1)) / 2), 0)
  if cols >= _GROUPED_MERGE_COLUMNS and cols % group == 0 and k * group < cols:
    # The k smallest entries lie in the k groups with the smallest minima (ordered by minimum,
    # then position): a top-k of C / group minima and one of k x group candidates replace a
    # top-k over all C columns. XLA's CPU top-k costs a few microseconds per row plus a few
    # nanoseconds per column, so this pays off from about 2,000 columns.
    grouped = d.reshape(rows, cols // group, group)
    _, chosen = jax.lax.top_k(-jnp.min(grouped, axis=2), k)
    chosen = jnp.sort(chosen, axis=1)
    d = jnp.take_along_axis(grouped, chosen[:, :, None], axis=1).reshape(rows, k * group)
    index = (start + chosen[:, :, None] * group
             + jnp.arange(group, dtype=jnp.int32)).reshape(rows, k * group)
  else:
    index = jnp.broadcast_to(start + jnp.arange(cols, dtype=jnp.int32), d.shape)
  # lax.top_k keeps the lower position among equal values, and the held lists come first, with
  # smaller indices: ties stay ordered by index.
  both_d = jnp.concatenate([best_d, d], axis=1)
  both_i = jnp.concatenate([best_i, index], axis=1)
  neg_d, pos = jax.lax.top_k(-both_d, k)
  return -neg_d, jnp.take_along_axis(both_i, pos, axis=1)


def pad_rows(array: np.ndarray, multiple: int, value=0) -> np.ndarray:
  """Pads axis 0 up to a multiple of `multiple` with `value`."""
  array = np.asarray(array)
  padding = -len(array) % multiple
  return np.pad(array, [(0, padding)] + [(0, 0)] * (array.ndim - 1), constant_values=value)


def chunk_length(count: int, chunk_size: int) -> int:
  """chunk_size, or the next power of two for fewer items.

  Every chunk has the same length, so one compilation serves a whole pass, and a small set
  (one category of a constrained evaluation) is not padded to a full chunk.
  """
  return min(chunk_size, 1 << max(count - 1, 0).bit_length())


def shard_gallery(mesh: jax.sharding.Mesh, gallery_size: int, gallery_chunk_size: int,
                  *arrays: np.ndarray) -> tuple[int, list[jax.Array]]:
  """Pads [G, ...] arrays to equal shards of whole blocks, one per device, and places them.

  Returns the block length and the sharded arrays (padding rows are zeros). No padded copy is
  made on the host (placed_rows).
  """
  devices = mesh.devices.size
  per_device = -(-gallery_size // devices)
  block = chunk_length(per_device, gallery_chunk_size)
  padded_size = -(-per_device // block) * block * devices
  on_shards = NamedSharding(mesh, P(GALLERY_AXIS))
  # An array already on the mesh's devices is padded there; others go through the host.
  on_mesh = lambda a: isinstance(a, jax.Array) and a.sharding.device_set == set(mesh.devices.flat)
  return block, [resized_rows(a, padded_size, on_shards) if on_mesh(a)
                 else placed_rows([np.asarray(a)], padded_size, on_shards) for a in arrays]


@functools.partial(jax.jit, static_argnames=('rows', 'sharding', 'fill'))
def resized_rows(x: jax.Array, rows: int, sharding: jax.sharding.Sharding | None = None,
                 fill=0) -> jax.Array:
  """x's first `rows` rows, rows of `fill` added where it has fewer, placed with `sharding`
  (None: as XLA chooses): the device-side counterpart of pad_rows."""
  x = x[:rows] if rows <= x.shape[0] else jnp.pad(
      x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


# Bytes of host rows sent to a device per call of placed_rows.
_PLACED_BLOCK_BYTES = 1 << 26


def placed_rows(parts, num_rows: int, sharding: jax.sharding.Sharding) -> jax.Array:
  """The row blocks `parts` (host arrays [n_i, ...]) stacked, then zero rows up to `num_rows`,
  as one array placed with `sharding`, which may split the rows (axis 0) but no other axis.

  Each device gets only its own rows. Where a device's rows exceed _PLACED_BLOCK_BYTES, its
  array is made there as zeros and the rows are written into it in place, that many bytes at a
  time, each written before the next is sent: besides the parts, the host holds at most one
  block (where a block spans two parts or the padding, or has to change dtype; and on a GPU in
  the runtime's staging buffer), never a stacked or padded copy of them, and a device never
  holds two copies. Fewer rows are stacked and padded on the host and sent at once. The
  parts' dtypes are promoted together, as jnp.concatenate would.
  """
  parts = [np.asarray(p) for p in parts]
  row_shape = parts[0].shape[1:]
  dtypes = {p.dtype for p in parts}
  # One dtype stays as it is on the host (blocks are views); several are promoted as
  # jnp.concatenate would (the devices' dtypes: int64 becomes int32 without x64).
  dtype = (dtypes.pop() if len(dtypes) == 1 else
           np.dtype(jnp.result_type(*map(jax.dtypes.canonicalize_dtype, dtypes))))
  size = sum(len(p) for p in parts)
  if size > num_rows or any(p.shape[1:] != row_shape for p in parts):
    raise ValueError(f'cannot place rows {[p.shape for p in parts]} in {num_rows} rows')
  shape = (num_rows, *row_shape)
  row_bytes = max(int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize, 1)
  # A power of two rows per block: the few block lengths in use share compiled programs.
  block = 1 << int(np.clip(np.log2(_PLACED_BLOCK_BYTES / row_bytes), 0, 30))
  offsets = np.cumsum([0] + [len(p) for p in parts])
  shards = []
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    start, stop, step = index[0].indices(num_rows) if index else (0, num_rows, 1)
    if step != 1 or any(i != slice(None) for i in index[1:]):
      raise ValueError(f'placed_rows splits rows only, not as {sharding}')
    if stop - start <= block:
      # The padded host copy is one block at most: sent as it is.
      shards.append(jax.device_put(_rows(parts, offsets, start, stop - start, dtype), device))
      continue
    (shard,) = device_full([((stop - start, *row_shape), 0, dtype)],
                           jax.sharding.SingleDeviceSharding(device))
    for first in range(start, min(stop, size), block):
      # Rows of a block past the shard's end are dropped by the write (another device's).
      shard = _write_rows(shard, _rows(parts, offsets, first, block, dtype),
                          np.int32(first - start))
      # One block in flight: a GPU runtime copies each host block it is sent into a pinned
      # staging buffer from a pool that keeps its size; blocks queued together would grow it,
      # and the process, by the whole array.
      shard.block_until_ready()
    shards.append(shard)
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _rows(parts, offsets, first: int, count: int, dtype) -> np.ndarray:
  """Rows first .. first + count - 1 of the parts stacked and followed by zero rows, as
  `dtype`: a view where they lie in one part of that dtype, else a copy."""
  pieces = [part[max(first - offset, 0):first + count - offset]
            for part, offset in zip(parts, offsets) if first < offset + len(part)
            and first + count > offset]
  missing = count - sum(len(p) for p in pieces)
  if missing:
    pieces.append(np.zeros((missing, *parts[0].shape[1:]), dtype))
  rows = pieces[0] if len(pieces) == 1 else np.concatenate([p.astype(dtype) for p in pieces])
  return rows.astype(dtype, copy=False)


def device_full(specs, sharding: jax.sharding.Sharding) -> tuple[jax.Array, ...]:
  """Arrays of constant values, one per (shape, fill, dtype) of `specs`, placed with `sharding`.

  Made on the devices by one compiled program: no host copy is sent. Up to
  _PLACED_BLOCK_BYTES in all on CPU, whose device memory is the host's, host arrays are sent
  instead: they compile nothing (re-ranking's lists made by programs held about 0.02 GB more
  at N = 10,000), and the copies are small.
  """
  specs = tuple((tuple(shape), fill, jax.dtypes.canonicalize_dtype(dtype))
                for shape, fill, dtype in specs)
  size = sum(np.prod(shape, dtype=np.int64) * dtype.itemsize for shape, _, dtype in specs)
  if (all(device.platform == 'cpu' for device in sharding.device_set)
      and size <= _PLACED_BLOCK_BYTES):
    return jax.device_put(tuple(np.full(*spec) for spec in specs), sharding)
  return _full(specs, sharding)


@functools.partial(jax.jit, static_argnames=('specs', 'sharding'))
def _full(specs, sharding):
  return tuple(jax.lax.with_sharding_constraint(jnp.full(*spec), sharding) for spec in specs)


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_rows(out, rows, first):
  """out (donated: written in place) with `rows` from row `first` on (past its end: dropped)."""
  return out.at[first + jnp.arange(rows.shape[0], dtype=jnp.int32)].set(
      rows.astype(out.dtype), mode='drop')


@functools.partial(jax.jit, static_argnames=('k', 'gallery_chunk', 'mesh'))
def _top_k_chunk(queries, gallery, gallery_size, rerank, k, gallery_chunk, mesh):
  """Top-k of one query chunk over a sharded padded gallery: per device, then merged."""
  num_queries = queries.shape[0]

  def shard(queries, gallery, gallery_size, rerank):
    shard_size = gallery.shape[0]
    offset = jax.lax.axis_index(GALLERY_AXIS) * shard_size

    def body(carry, start):
      best_d, best_i, row_max = carry
      block = jax.lax.dynamic_slice_in_dim(gallery, start - offset, gallery_chunk)
      d = block_distances(queries, block, start, rerank)
      real = start + jnp.arange(gallery_chunk, dtype=jnp.int32) < gallery_size
      row_max = jnp.maximum(row_max, jnp.max(jnp.where(real[None], d, -jnp.inf), axis=1))
      best_d, best_i = _merge_top_k(best_d, best_i, jnp.where(real[None], d, jnp.inf), start, k)
      return (best_d, best_i, row_max), None

    init = (jnp.full((num_queries, k), jnp.inf, jnp.float32),
            jnp.full((num_queries, k), -1, jnp.int32),
            jnp.full((num_queries,), -jnp.inf, jnp.float32))
    # The lists differ between devices: the carry is marked as varying.
    init = jax.lax.pcast(init, (GALLERY_AXIS,), to='varying')
    starts = offset + jnp.arange(0, shard_size, gallery_chunk, dtype=jnp.int32)
    (best_d, best_i, row_max), _ = jax.lax.scan(body, init, starts)
    return best_d[None], best_i[None], row_max[None]

  best_d, best_i, row_max = jax.shard_map(
      shard, mesh=mesh, in_specs=(P(), P(GALLERY_AXIS), P(), P()),
      out_specs=P(GALLERY_AXIS))(queries, gallery, gallery_size, rerank)
  # Shards hold consecutive index ranges in device order, so concatenating the per-device lists
  # in that order keeps ties ordered by index.
  devices = best_d.shape[0]
  best_d = jnp.transpose(best_d, (1, 0, 2)).reshape(num_queries, devices * k)
  best_i = jnp.transpose(best_i, (1, 0, 2)).reshape(num_queries, devices * k)
  neg_d, pos = jax.lax.top_k(-best_d, k)
  return -neg_d, jnp.take_along_axis(best_i, pos, axis=1), jnp.max(row_max, axis=0)


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, *, rerank: Reranked | None = None,
          chunk_size: int = 1024, gallery_chunk_size: int = 1024, progress=None,
          devices=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The k nearest gallery items of every query, exact, ties by gallery index.

  Memory O((Q + G) x D + Q x k): queries in chunks of `chunk_size`; the gallery is sharded
  over all local devices, each scanning its shard in blocks of `gallery_chunk_size` and
  merging their top-k into a running list; the devices' lists are merged at the end.

  Args:
    queries: [Q, D] float (float32, bfloat16 or float16).
    gallery: [G, D] same dtype, on the host or the devices.
    k: list length; clipped to G.
    rerank: rank by these re-ranked distances instead (Q rows).
    chunk_size, gallery_chunk_size: block shape; memory grows as their product.
    progress: optional callable(stage, num_done, total) called after each query chunk.
    devices: the devices to shard the gallery over (default: all local devices).

  Returns:
    index: [Q, min(k, G)] int32, nearest first.
    distances: [Q, min(k, G)] float32 ranking distances (squared Euclidean, or re-ranked).
    row_max: [Q] float32, the largest distance of each query to the gallery.
  """
  # A gallery already on the devices stays there (re-ranking's fallback searches its points).
  queries = np.asarray(queries)
  gallery = gallery if isinstance(gallery, jax.Array) else np.asarray(gallery)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f'top_k needs [Q, D] and [G, D] embeddings, got {queries.shape} and '
                     f'{gallery.shape}')
  num_queries, gallery_size = len(queries), len(gallery)
  if num_queries == 0 or gallery_size == 0 or k < 1:
    raise ValueError(f'top_k needs queries, a gallery and k >= 1, got Q={num_queries}, '
                     f'G={gallery_size}, k={k}')
  if rerank is not None and rerank.scale.shape != (num_queries,):
    raise ValueError(f'rerank holds {rerank.scale.shape[0]} queries, not {num_queries}')
  k = min(k, gallery_size)
  q_chunk = chunk_length(num_queries, chunk_size)
  mesh = gallery_mesh(devices)
  g_chunk, (padded_gallery,) = shard_gallery(mesh, gallery_size, gallery_chunk_size, gallery)
  padded_queries = pad_rows(queries, q_chunk)
  outputs = []
  for start in range(0, len(padded_queries), q_chunk):
    rows = slice(start, start + q_chunk)
    # Read back per chunk: progress then reports finished work, not queued work.
    outputs.append([np.asarray(a) for a in _top_k_chunk(
        padded_queries[rows], padded_gallery, gallery_size,
        rerank_chunk(rerank, start, q_chunk, mesh),
        k, g_chunk, mesh)])
    if progress is not None:
      progress('top-k', min(start + q_chunk, num_queries), num_queries)
  distances, index, row_max = (
      np.concatenate([o[i] for o in outputs])[:num_queries] for i in range(3))
  return index, distances, row_max


def rerank_chunk(rerank: Reranked | None, start: int, size: int,
                 mesh: jax.sharding.Mesh | None = None) -> Reranked | None:
  """The Reranked rows start .. start + size - 1, padded past the last query with rows that
  have no Jaccard entries: one chunk at a time, so the whole result is never copied.

  Rows left on the devices by the re-ranking (result_on_device) are padded there, replicated
  on `mesh`'s devices (those of the computation they go to) when it is given."""
  if rerank is None:
    return None
  part = rerank.select(slice(start, start + size))
  if isinstance(part.jaccard_index, jax.Array):
    placed = lambda x: x if mesh is None else jax.device_put(x, NamedSharding(mesh, P()))
    pad = lambda x, fill: resized_rows(placed(x), size, fill=fill)
  else:
    pad = lambda x, fill: pad_rows(x, size, fill)
  return Reranked(pad_rows(part.scale, size), pad(part.jaccard_index, -1),
                  pad(part.jaccard, 0.0), rerank.lam)
