"""Checking a search index end to end: `python -m fashion_jax.search verify --index DIR`.

Searching an index reads only what it needs and trusts the rest: a flipped byte inside the
embeddings or the FAISS index gives wrong results, not an error. `verify` reads everything
once and reports what is wrong, one line per problem:

  - index.json and every items line parse (as any command that opens the index checks);
  - every file of the generation has the size and sha256 index.json records (an index written
    before the record is reported as such, and the next change records them);
  - the live rows' embeddings, and the live products' centroids, are finite unit vectors;
  - the search backend opens and holds one row per live image (per live product with
    centroids);
  - index.json's own fields match the sha256 it records of them;
  - every live row's thumbnail is there and is the one written (its item records a digest).

Files that a change left before it committed (it was killed) are listed: the next change
deletes them; so are the vectors an interrupted `index` keeps for its next run (resume.py).
"""

import dataclasses
import os
import stat

import numpy as np

from fashion_jax import console
from fashion_jax.search import index as search_index
from fashion_jax.search import resume
from fashion_jax.search.images import InputError

_ROWS_AT_ONCE = 65536  # embeddings checked per block: a few hundred MB at most
# A stored unit vector's norm is 1 up to float16 rounding (about 1e-3 over 2,048 dims).
_NORM_TOLERANCE = 1e-2
_NAMED = 5  # rows named per problem; the rest are counted
_MAX_THUMB_BYTES = 1 << 20  # a thumbnail is at most 256 px: far below


@dataclasses.dataclass
class Report:
  """What `verify` found: `checked` says what was read (a line each), `problems` what is
  wrong (a line each; none for a sound index), `notes` what is worth knowing but harmless."""
  checked: list[str] = dataclasses.field(default_factory=list)
  problems: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)


def verify(index_dir: str, *, progress: bool = True) -> Report:
  """Reads the whole index at `index_dir`; raises InputError only when it is not an index."""
  report = Report()
  if not os.path.lexists(os.path.join(index_dir, 'index.json')):
    raise InputError(f'{index_dir}: not a search index (no index.json)')
  try:
    index = search_index.SearchIndex(index_dir, check_digest=False)
  except InputError as error:
    report.problems.append(str(error))
    return report
  report.checked.append(
      f'generation {index.generation}: {len(index)} rows ({index.num_live} live), '
      f'{int(index.product_live.sum())} live products, '
      f"backend {index.meta.get('backend', 'exact')}")
  _check_files(index, report, progress)
  _check_vectors(index.embeddings, index.live, 'embeddings', 'row', report, progress)
  if index.centroids is not None:
    _check_vectors(index.centroids, index.product_live, 'centroids', 'product', report, False)
  _check_backend(index, report)
  _check_thumbnails(index, report, progress)
  _note_leftovers(index, report)
  return report


def _check_files(index, report: Report, progress: bool) -> None:
  if 'meta_sha256' in index.meta:
    if search_index.meta_digest(index.meta) != index.meta['meta_sha256']:
      report.problems.append('index.json: its fields are not those its sha256 was computed '
                             'from (changed since it was written)')
    else:
      report.checked.append('index.json matches its recorded sha256')
  checksums = index.meta.get('checksums')
  if not checksums:
    report.notes.append('no sizes and sha256 recorded (an index written before they were); '
                        'its next change records them')
    return
  named = [name for role, name in index.files.items() if role != 'backend']
  if 'backend' in index.files:
    backend = index.files['backend']
    named += [os.path.relpath(os.path.join(folder, name), index.directory)
              for folder, _, names in os.walk(os.path.join(index.directory, backend))
              for name in names]
  for name in sorted(set(named) - set(checksums)):
    report.problems.append(f'{name}: a file in the generation that index.json has no record of')
  total = sum(record['bytes'] for record in checksums.values())
  bar = console.bar(total=total, desc='checksums', unit='B', unit_scale=True, enabled=progress,
                    leave=False)
  good = 0
  for name, record in sorted(checksums.items()):
    path = os.path.join(index.directory, name)
    try:
      if not stat.S_ISREG(os.stat(path).st_mode):
        report.problems.append(f'{name}: not a regular file')
        continue
      found = search_index.digest(path)
    except OSError as error:
      report.problems.append(f'{name}: cannot be read ({error.strerror or error})')
      continue
    finally:
      bar.update(record['bytes'])
    if found['bytes'] != record['bytes']:
      report.problems.append(f"{name}: {found['bytes']} bytes, index.json records "
                             f"{record['bytes']}")
    elif found['sha256'] != record['sha256']:
      report.problems.append(f'{name}: its sha256 is not the one index.json records (changed '
                             'since it was written)')
    else:
      good += 1
  bar.close()
  report.checked.append(f'{good} of {len(checksums)} files match their recorded size and '
                        f'sha256 ({total / 1e6:.1f} MB)')


def _check_vectors(vectors: np.ndarray, live: np.ndarray, what: str, unit: str,
                   report: Report, progress: bool) -> None:
  """Live rows of `vectors` are finite and of length 1."""
  bad_rows = []
  blocks = range(0, len(vectors), _ROWS_AT_ONCE)
  for start in console.bar(iterable=blocks, desc=what, unit='block',
                           enabled=progress and len(blocks) >= 2, leave=False):
    block = np.asarray(vectors[start:start + _ROWS_AT_ONCE], np.float32)
    with np.errstate(over='ignore', invalid='ignore'):
      norms = np.linalg.norm(block, axis=1)
    bad = ~(np.abs(norms - 1) <= _NORM_TOLERANCE) & live[start:start + len(block)]
    bad_rows.extend((start + np.flatnonzero(bad)).tolist())
  if bad_rows:
    report.problems.append(f'{what}: {len(bad_rows)} live {unit}s are not finite unit vectors '
                           f'({_some(bad_rows, unit)})')
  else:
    report.checked.append(f'{what}: {int(live.sum())} live {unit}s are finite unit vectors')


def _check_backend(index, report: Report) -> None:
  if index.meta.get('backend', 'exact') == 'exact':
    # Nothing of its own on disk: it is built from the embeddings when opened.
    return
  use_centroids = index.centroids is not None
  expected = int(index.product_live.sum()) if use_centroids else index.num_live
  try:
    backend = search_index.open_backend(index, centroids=use_centroids)
  except InputError as error:
    report.problems.append(f'backend: {error}')
    return
  held = len(backend)
  unit = 'products' if use_centroids else 'images'
  if held != expected:
    report.problems.append(f'backend: holds {held} rows, the index {expected} live {unit}')
  else:
    report.checked.append(f"backend {backend.name}: opens and holds the {held} live {unit}")


def _check_thumbnails(index, report: Report, progress: bool) -> None:
  """Each live row's thumbnail against the digest its item records; an item written before
  the digests were, by a JPEG's first and last bytes."""
  missing, damaged = [], []
  live_rows = np.flatnonzero(index.live)
  for row in console.bar(iterable=live_rows, desc='thumbnails', unit='img', enabled=progress,
                         leave=False):
    try:
      with open(index.thumb_path(int(row)), 'rb') as f:
        data = f.read(_MAX_THUMB_BYTES)
    except (OSError, InputError):
      missing.append(int(row))
      continue
    recorded = index.items[row].get('thumb_digest')
    if (resume.digest(data) != recorded if recorded else
        not (data.startswith(b'\xff\xd8\xff') and data.endswith(b'\xff\xd9'))):
      damaged.append(int(row))
  if missing:
    report.problems.append(f'thumbnails: {len(missing)} live rows have none ({_some(missing)}); '
                           'their results show a grey tile')
  if damaged:
    report.problems.append(f'thumbnails: {len(damaged)} are not the JPEGs written '
                           f'({_some(damaged)}); their results show a grey tile')
  if not missing and not damaged:
    report.checked.append(f'thumbnails: all {len(live_rows)} live rows have one')


def _note_leftovers(index, report: Report) -> None:
  named = set(index.files.values())
  leftovers = sorted(
      name for name in os.listdir(index.directory) if name not in named and (
          name.startswith('.tmp-') or search_index.GENERATION_FILE.match(name)))
  cache = os.path.join(index.directory, resume.FOLDER, 'keys.jsonl')
  if os.path.exists(cache):
    with open(cache, 'rb') as f:
      kept = sum(1 for _ in f)
    report.notes.append(f'{resume.FOLDER}/ keeps {kept} images embedded by an interrupted '
                        '`index` or `update`; the same command reuses them, and its commit '
                        'deletes the folder')
  if leftovers:
    report.notes.append(f"{len(leftovers)} files of a change that did not finish or of earlier "
                        f"generations ({', '.join(leftovers[:_NAMED])}"
                        f"{', ...' if len(leftovers) > _NAMED else ''}); the next change "
                        'deletes them')


def _some(numbers: list[int], unit: str = 'row') -> str:
  shown = ', '.join(str(number) for number in numbers[:_NAMED])
  return f'{unit}s {shown}' + (', ...' if len(numbers) > _NAMED else '')
