"""What an interrupted `index` or `update` had embedded, kept for the next run to reuse.

A change commits only when every new image is embedded, so that a bad image or a kill leaves
the index as it was. For a catalogue of millions that can be hours of work; meanwhile each
embedded chunk is appended here, in `<index>/.resume/`:

  context.json     the model's fingerprint, the dtype and the width of the vectors
  embeddings.bin   the vectors, raw, one row after another
  keys.jsonl       per vector: the catalogue entry (image, box, product), a hash of the image's
                   bytes, the index row it was given, a hash of the thumbnail written for it,
                   and the vector's place in embeddings.bin with a hash of its bytes

A later run with the same model reuses a vector where the entry, its image's bytes, its row
and its thumbnail are unchanged, and embeds the rest; a record whose vector does not match its
hash (a damaged folder) is not used. A successful commit deletes the folder. The writer's lock
(index.writer_lock) is held throughout, so one run at a time appends.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable

import numpy as np

FOLDER = '.resume'
_FIELDS = {'key': str, 'content': str, 'row': int, 'thumb': str, 'n': int, 'vector': str}


def entry_key(entry: dict) -> str:
  """The entry's identity in the catalogue: its image's name, its box and its product."""
  box = list(entry['box']) if entry['box'] else None
  return json.dumps([entry['image'], box, entry['product_id']])


def digest(data: bytes) -> str:
  return hashlib.blake2b(data, digest_size=16).hexdigest()


class ResumeCache:
  """The vectors embedded by earlier interrupted runs into `index_dir`, and the appender for
  this run's."""

  def __init__(self, index_dir: str, *, fingerprint: str, dtype: str, dim: int):
    self.folder = os.path.join(index_dir, FOLDER)
    self._context = {'fingerprint': fingerprint, 'dtype': dtype, 'dim': dim}
    self._dtype, self._dim = np.dtype(dtype), dim
    self._rows = 0  # vectors in embeddings.bin
    self._found = self._load()  # key -> (record, vector)

  def _paths(self):
    return (os.path.join(self.folder, name)
            for name in ('context.json', 'keys.jsonl', 'embeddings.bin'))

  def _load(self) -> dict:
    context_path, keys_path, vectors_path = self._paths()
    records = []
    try:
      with open(context_path) as f:
        context = json.load(f)
      with open(keys_path, 'rb') as f:
        for line in f:
          try:
            record = json.loads(line)
          except ValueError:
            continue  # a line the interruption cut, or damage: that vector is embedded again
          if isinstance(record, dict) and all(
              type(record.get(name)) is kind for name, kind in _FIELDS.items()):
            records.append(record)
      vectors_bytes = os.path.getsize(vectors_path)
    except (OSError, ValueError):
      context = None
    if context != self._context:  # none, damaged, or another model's: start afresh
      self.discard()
      os.makedirs(self.folder)
      for path in (keys_path, vectors_path):
        open(path, 'wb').close()
      with open(context_path, 'w') as f:
        json.dump(self._context, f)
      return {}
    row_bytes = self._dim * self._dtype.itemsize
    self._rows = vectors_bytes // row_bytes
    os.truncate(vectors_path, self._rows * row_bytes)  # a row the interruption cut
    vectors = np.fromfile(vectors_path, self._dtype).reshape(self._rows, self._dim)
    found = {}
    for record in records:
      if 0 <= record['n'] < self._rows and digest(vectors[record['n']].tobytes()) == \
          record['vector']:
        found[record['key']] = (record, vectors[record['n']])
    with open(keys_path, 'w') as f:  # the records kept, for this run to append to
      f.writelines(json.dumps(record) + '\n' for record, _ in found.values())
    return found

  def __len__(self) -> int:
    return len(self._found)

  def reusable(self, key: str, row: int, thumb_path: str,
               read_bytes: Callable[[], bytes]) -> tuple[np.ndarray, str] | None:
    """(the vector embedded for `key`, its thumbnail's digest) when it was given `row`, the
    thumbnail there is still the one written for it, and the image's bytes (read_bytes()) are
    those it was embedded from; None otherwise."""
    found = self._found.get(key)
    if found is None or found[0]['row'] != row:
      return None
    record, vector = found
    try:
      with open(thumb_path, 'rb') as f:
        if digest(f.read()) != record['thumb']:
          return None
      if digest(read_bytes()) != record['content']:
        return None
    except (OSError, ValueError):  # unreadable now: it is read again, and reported there
      return None
    return vector, record['thumb']

  def append(self, records: list[dict], vectors: np.ndarray) -> None:
    """Adds this run's newly embedded rows: records [{'key', 'content', 'row', 'thumb'}],
    vectors [n, D]. The vectors are on disk before the keys that name them."""
    vectors = np.ascontiguousarray(vectors, self._dtype)
    _, keys_path, vectors_path = self._paths()
    with open(vectors_path, 'ab') as f:
      f.write(vectors.tobytes())
      f.flush()
      os.fsync(f.fileno())
    lines = [json.dumps({**record, 'n': self._rows + number,
                         'vector': digest(vector.tobytes())}) + '\n'
             for number, (record, vector) in enumerate(zip(records, vectors))]
    self._rows += len(vectors)
    with open(keys_path, 'a') as f:
      f.writelines(lines)

  def discard(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)
