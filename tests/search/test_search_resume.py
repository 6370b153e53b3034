"""An interrupted `index` keeps what it embedded: the next run embeds only the rest."""

import os

import numpy as np
import pytest

from fashion_jax.search import catalogue as search_catalogue
from fashion_jax.search import index as search_index
from fashion_jax.search import resume


class _Interrupted(BaseException):
  """Stands for Ctrl-C or a kill while embedding."""


class _Counting:
  """The real model, counting the images it embeds, and interrupted after `fail_after` calls."""

  def __init__(self, model, fail_after=None):
    self._model, self._fail_after = model, fail_after
    self.calls, self.embedded = 0, 0

  def __getattr__(self, name):
    return getattr(self._model, name)

  def embed_prepared(self, prepared):
    if self._fail_after is not None and self.calls == self._fail_after:
      raise _Interrupted
    self.calls += 1
    self.embedded += len(prepared)
    return self._model.embed_prepared(prepared)


def _entries(catalogue):
  entries = []
  for name in ('csv_first', 'csv_rest'):
    path = catalogue[name]
    entries += search_catalogue.read_catalogue(path, os.path.dirname(path))
  return entries


@pytest.fixture
def small_chunks(monkeypatch):
  monkeypatch.setattr(search_index, '_EMBED_CHUNK', 4)


@pytest.fixture(scope='module')
def whole(model, catalogue, tmp_path_factory):
  """The 12 images indexed in one uninterrupted run."""
  path = str(tmp_path_factory.mktemp('whole') / 'index')
  search_index.build(path, model, _entries(catalogue), progress=False)
  return search_index.SearchIndex(path)


def _interrupted_run(path, model, catalogue, chunks_done=2):
  with pytest.raises(_Interrupted):
    search_index.build(path, _Counting(model, fail_after=chunks_done), _entries(catalogue),
                       progress=False)
  assert not os.path.exists(os.path.join(path, 'index.json'))  # nothing committed


def test_a_rerun_embeds_only_what_the_interrupted_run_had_not(small_chunks, model, catalogue,
                                                              whole, tmp_path, capfd):
  path = str(tmp_path / 'index')
  _interrupted_run(path, model, catalogue)
  counting = _Counting(model)
  result = search_index.build(path, counting, _entries(catalogue), progress=True)
  assert result['added'] == 12 and counting.embedded == 4  # 8 were embedded before
  assert '8 of the 12 new images were embedded by an interrupted run' in capfd.readouterr().err
  index = search_index.SearchIndex(path)
  assert index.items == whole.items
  np.testing.assert_allclose(index.embeddings.astype(np.float32),
                             whole.embeddings.astype(np.float32), atol=1e-3)
  assert not os.path.exists(os.path.join(path, resume.FOLDER))  # deleted by the commit


def test_nothing_is_reused_when_the_entry_its_thumbnail_or_the_model_changed(
    small_chunks, model, other_workdir, catalogue, tmp_path):
  path = str(tmp_path / 'index')
  _interrupted_run(path, model, catalogue)
  # The image of row 0 rewritten (size and time change), the thumbnail of row 5 overwritten.
  first = _entries(catalogue)[0]['image']
  changed = tmp_path / 'changed.png'
  changed.write_bytes(open(first, 'rb').read())
  entries = _entries(catalogue)
  entries[0] = dict(entries[0], image=str(changed))
  with open(os.path.join(path, 'thumbs', '00000005.jpg'), 'ab') as f:
    f.write(b'\0')
  counting = _Counting(model)
  search_index.build(path, counting, entries, progress=False)
  assert counting.embedded == 4 + 2  # the 4 never embedded, and rows 0 and 5 again

  # Another model's vectors are never reused: its run starts afresh.
  from fashion_jax.search.model import SearchModel
  other = SearchModel(other_workdir)
  other_path = str(tmp_path / 'other')
  _interrupted_run(other_path, model, catalogue)
  counting = _Counting(other)
  search_index.build(other_path, counting, _entries(catalogue), progress=False)
  assert counting.embedded == 12


def test_a_cache_cut_by_the_interruption_keeps_its_whole_rows(small_chunks, model, catalogue,
                                                               whole, tmp_path):
  path = str(tmp_path / 'index')
  _interrupted_run(path, model, catalogue, chunks_done=1)
  folder = os.path.join(path, resume.FOLDER)
  with open(os.path.join(folder, 'embeddings.bin'), 'ab') as f:
    f.write(b'\1' * 37)  # part of a row
  with open(os.path.join(folder, 'keys.jsonl'), 'a') as f:
    f.write('{"key": "cut')  # part of a line
  # A second interrupted run appends after the whole rows, not after the cut one.
  _interrupted_run(path, model, catalogue, chunks_done=1)
  counting = _Counting(model)
  search_index.build(path, counting, _entries(catalogue), progress=False)
  assert counting.embedded == 4
  index = search_index.SearchIndex(path)
  np.testing.assert_allclose(index.embeddings.astype(np.float32),
                             whole.embeddings.astype(np.float32), atol=1e-3)


def test_verify_notes_the_kept_vectors_of_an_interrupted_addition(monkeypatch, model, catalogue,
                                                                  tmp_path, capsys):
  from fashion_jax.search.__main__ import main
  monkeypatch.setattr(search_index, '_EMBED_CHUNK', 2)
  path = str(tmp_path / 'index')
  first = search_catalogue.read_catalogue(catalogue['csv_first'], catalogue['dir'])
  search_index.build(path, model, first, progress=False)
  with pytest.raises(_Interrupted):  # adding the other 4: interrupted after 2
    search_index.build(path, _Counting(model, fail_after=1), _entries(catalogue),
                       progress=False)
  assert search_index.SearchIndex(path).num_live == 8
  assert main(['verify', '--index', path, '--quiet']) == 0
  assert (f'note: {resume.FOLDER}/ keeps 2 images embedded by an interrupted `index` or '
          '`update`') in capsys.readouterr().out
  counting = _Counting(model)
  search_index.build(path, counting, _entries(catalogue), progress=False)
  assert counting.embedded == 2 and search_index.SearchIndex(path).num_live == 12


def test_a_run_with_nothing_new_writes_no_generation(model, catalogue, tmp_path):
  path = str(tmp_path / 'index')
  search_index.build(path, model, _entries(catalogue), progress=False)
  before = {name: os.stat(os.path.join(path, name)).st_mtime_ns for name in os.listdir(path)}
  counting = _Counting(model)
  result = search_index.build(path, counting, _entries(catalogue), progress=False)
  assert result == {'added': 0, 'skipped': 12, 'count': 12} and counting.embedded == 0
  after = {name: os.stat(os.path.join(path, name)).st_mtime_ns for name in os.listdir(path)}
  assert after == before and search_index.SearchIndex(path).generation == 1


def test_an_image_replaced_with_its_size_and_time_kept_is_embedded_again(
    small_chunks, model, catalogue, tmp_path):
  """cp -p, tar and rsync -t keep a file's size and time: the bytes decide."""
  import io
  import shutil
  from PIL import Image
  photos = tmp_path / 'photos'
  shutil.copytree(catalogue['dir'], photos)
  entries = [dict(entry, image=str(photos / os.path.basename(entry['image'])))
             for entry in _entries(catalogue)]
  path = str(tmp_path / 'index')
  with pytest.raises(_Interrupted):
    search_index.build(path, _Counting(model, fail_after=2), entries, progress=False)
  # Row 0's photo (kept in the cache) replaced by another picture, padded after its end to
  # the same size, with the same time.
  first = entries[0]['image']
  status = os.stat(first)
  encoded = io.BytesIO()
  Image.new('RGB', (64, 48), (20, 200, 90)).save(encoded, 'PNG')
  assert len(encoded.getvalue()) < status.st_size
  with open(first, 'wb') as f:
    f.write(encoded.getvalue().ljust(status.st_size, b'\0'))
  os.utime(first, ns=(status.st_atime_ns, status.st_mtime_ns))
  counting = _Counting(model)
  search_index.build(path, counting, entries, progress=False)
  assert counting.embedded == 4 + 1  # the 4 never embedded, and the replaced one
  fresh = str(tmp_path / 'fresh')
  search_index.build(fresh, model, entries, progress=False)
  np.testing.assert_allclose(search_index.SearchIndex(path).embeddings.astype(np.float32),
                             search_index.SearchIndex(fresh).embeddings.astype(np.float32),
                             atol=1e-3)


def test_damaged_records_are_embedded_again_and_the_others_still_reused(
    small_chunks, model, catalogue, whole, tmp_path):
  path = str(tmp_path / 'index')
  _interrupted_run(path, model, catalogue)  # 8 vectors kept
  keys = os.path.join(path, resume.FOLDER, 'keys.jsonl')
  with open(keys) as f:
    lines = f.readlines()
  del lines[2]  # a record lost: the ones after it keep their own vectors
  lines[4] = lines[4].replace('"vector": "', '"vector": "0')  # a vector's hash that fails
  with open(keys, 'w') as f:
    f.writelines(lines)
  counting = _Counting(model)
  search_index.build(path, counting, _entries(catalogue), progress=False)
  assert counting.embedded == 4 + 2
  index = search_index.SearchIndex(path)
  assert index.items == whole.items
  np.testing.assert_allclose(index.embeddings.astype(np.float32),
                             whole.embeddings.astype(np.float32), atol=1e-3)
