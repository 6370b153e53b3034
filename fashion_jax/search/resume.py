"""What an interrupted `index` or `update` had embedded, kept for the next run to reuse.

A change commits only when every new image is embedded, so that a bad image or a kill leaves
the index as it was. For a catalogue of millions that can be hours of work; meanwhile each
embedded chunk is appended here, in `<index>/.resume/`:

  context.json     the model's fingerprint, the dtype and the width of the vectors
  embeddings.bin   the vectors, raw, one row after another
  keys.jsonl       per row: the catalogue entry (image, box, product and the file's size and
                   time, or a hash of its bytes), the index row it was given and a hash of the
                   thumbnail written for it

A later run with the same model reuses a vector where the entry, its row and its thumbnail
are unchanged, and embeds the rest. A successful commit deletes the folder. The writer's lock
(index.writer_lock) is held throughout, so one run at a time appends.
"""

import hashlib
import json
import os
import shutil

import numpy as np

FOLDER = '.resume'


def entry_key(entry: dict) -> str:
  """The entry's identity: its name, box and product, and what says its bytes are the same."""
  if 'data' in entry:
    version = hashlib.blake2b(entry['data'], digest_size=16).hexdigest()
  else:
    try:
      status = os.stat(entry['image'])
      version = [status.st_size, status.st_mtime_ns]
    except OSError:
      version = None  # unreadable: never matches, and the read reports it
  box = list(entry['box']) if entry['box'] else None
  return json.dumps([entry['image'], box, entry['product_id'], version])


def thumb_hash(data: bytes) -> str:
  return hashlib.blake2b(data, digest_size=16).hexdigest()


class ResumeCache:
  """The vectors embedded by earlier interrupted runs into `index_dir`, and the appender for
  this run's."""

  def __init__(self, index_dir: str, *, fingerprint: str, dtype: str, dim: int):
    self.folder = os.path.join(index_dir, FOLDER)
    self._context = {'fingerprint': fingerprint, 'dtype': dtype, 'dim': dim}
    self._dtype, self._dim = np.dtype(dtype), dim
    self._found = self._load()  # key -> (row, thumbnail hash, vector)

  def _load(self) -> dict:
    keys_path = os.path.join(self.folder, 'keys.jsonl')
    vectors_path = os.path.join(self.folder, 'embeddings.bin')
    records = []
    try:
      with open(os.path.join(self.folder, 'context.json')) as f:
        context = json.load(f)
      with open(keys_path, 'rb') as f:
        for line in f:
          try:
            record = json.loads(line)
          except ValueError:
            break  # a line the interruption cut
          if not (isinstance(record, dict) and isinstance(record.get('key'), str)
                  and isinstance(record.get('row'), int) and isinstance(record.get('thumb'), str)):
            break
          records.append(record)
      vectors_bytes = os.path.getsize(vectors_path)
    except (OSError, ValueError):
      context = None
    if context != self._context:  # none, damaged, or another model's: start afresh
      self.discard()
      os.makedirs(self.folder)
      for name in (keys_path, vectors_path):
        open(name, 'wb').close()
      with open(os.path.join(self.folder, 'context.json'), 'w') as f:
        json.dump(self._context, f)
      return {}
    row_bytes = self._dim * self._dtype.itemsize
    usable = min(len(records), vectors_bytes // row_bytes)
    # Both files cut to the rows they agree on, so that this run appends in step.
    os.truncate(vectors_path, usable * row_bytes)
    with open(keys_path, 'w') as f:
      f.writelines(json.dumps(record) + '\n' for record in records[:usable])
    vectors = np.fromfile(vectors_path, self._dtype).reshape(usable, self._dim)
    return {record['key']: (record['row'], record['thumb'], vectors[number])
            for number, record in enumerate(records[:usable])}

  def __len__(self) -> int:
    return len(self._found)

  def reusable(self, key: str, row: int, thumb_path: str) -> np.ndarray | None:
    """The vector embedded for `key` when it was given `row` and the thumbnail there is still
    the one written for it; None otherwise."""
    found = self._found.get(key)
    if found is None or found[0] != row:
      return None
    try:
      with open(thumb_path, 'rb') as f:
        if thumb_hash(f.read()) != found[1]:
          return None
    except OSError:
      return None
    return found[2]

  def append(self, records: list[dict], vectors: np.ndarray) -> None:
    """Adds this run's newly embedded rows: records [{'key', 'row', 'thumb'}], vectors [n, D].
    The vectors are on disk before the keys that name them."""
    with open(os.path.join(self.folder, 'embeddings.bin'), 'ab') as f:
      f.write(np.ascontiguousarray(vectors, self._dtype).tobytes())
      f.flush()
      os.fsync(f.fileno())
    with open(os.path.join(self.folder, 'keys.jsonl'), 'a') as f:
      f.writelines(json.dumps(record) + '\n' for record in records)

  def discard(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)
