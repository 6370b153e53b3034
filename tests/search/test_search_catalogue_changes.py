"""Catalogue changes without a rebuild: `remove` and `update` through the command line."""

import csv
import json
import os
import shutil

import pytest

from fashion_jax.search import engine
from fashion_jax.search import index as search_index
from fashion_jax.search.__main__ import main
from index_files import index_file, items_text


@pytest.fixture
def index_copy(index_dir, tmp_path):
  path = str(tmp_path / 'index')
  shutil.copytree(index_dir, path)
  return path


def _photo(catalogue, product, variant=0):
  return os.path.join(catalogue['dir'], f'p{product}_{variant}.' + ('png' if variant == 0
                                                                     else 'jpg'))


def _top(path, model, photo, k=6, **kwargs):
  searcher = engine.Searcher(search_index.SearchIndex(path), model, **kwargs)
  with open(photo, 'rb') as f:
    return [r['product_id'] for r in searcher.answer(f.read(), k=k)['results']]


def test_a_removed_product_is_never_returned_again(index_copy, model, catalogue, capsys):
  assert _top(index_copy, model, _photo(catalogue, 1))[0] == 'sku-1'
  assert main(['remove', '--index', index_copy, '--products', 'sku-1', 'sku-4']) == 0
  assert 'removed 2 products (4 images); 8 images left' in capsys.readouterr().out
  for product in range(6):
    found = _top(index_copy, model, _photo(catalogue, product), k=10)
    assert 'sku-1' not in found and 'sku-4' not in found and len(found) == 4
  meta = json.load(open(os.path.join(index_copy, 'index.json')))
  assert (meta['count'], meta['rows'], meta['products']) == (8, 12, 4)
  # The removed rows keep their files: nothing is lost.
  assert len(os.listdir(os.path.join(index_copy, 'thumbs'))) == 12
  # Indexing the product again brings it back under its old product number.
  assert main(['index', '--workdir', model.workdir, '--index', index_copy, '--catalogue',
               catalogue['csv_first']]) == 0
  assert _top(index_copy, model, _photo(catalogue, 1))[0] == 'sku-1'


def test_removing_unknown_products_changes_nothing(index_copy, tmp_path, capsys):
  before = items_text(index_copy)
  ids = tmp_path / 'ids.txt'
  ids.write_text('sku-2\nsku-99\n')
  assert main(['remove', '--index', index_copy, '--products-file', str(ids)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: {index_copy}: not in the index: 'sku-99' (nothing removed)", err
  assert items_text(index_copy) == before
  assert main(['remove', '--index', index_copy]) == 2
  assert 'name the products' in capsys.readouterr().err


def test_update_replaces_a_products_images(index_copy, model, catalogue, tmp_path, capsys):
  # sku-2 is re-photographed: its new images are product 3's pictures.
  update = tmp_path / 'update.csv'
  with open(update, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'product_id', 'category'])
    writer.writerow([_photo(catalogue, 3), 'sku-2', 'dress'])
  assert main(['update', '--index', index_copy, '--catalogue', str(update)]) == 0
  assert '1 products updated: 2 old images out, 1 new in; 11 images in all' in (
      capsys.readouterr().out)
  # Found by its new image (a tie with sku-3's own copy of it; the older product ranks first),
  # no longer by its old ones.
  assert set(_top(index_copy, model, _photo(catalogue, 3))[:2]) == {'sku-2', 'sku-3'}
  searcher = engine.Searcher(search_index.SearchIndex(index_copy), model)
  with open(_photo(catalogue, 2), 'rb') as f:
    sku2 = [r for r in searcher.answer(f.read(), k=6)['results'] if r['product_id'] == 'sku-2']
  # Its old photo no longer matches it exactly: only the new row (12) stands for it.
  assert sku2[0]['row'] == 12 and sku2[0]['score'] < 0.999


def test_centroids_follow_removals(index_dir, model, catalogue, tmp_path):
  path = str(tmp_path / 'centroids')
  assert main(['index', '--workdir', model.workdir, '--index', path, '--catalogue',
               catalogue['csv_first'], '--centroids']) == 0
  assert _top(path, model, _photo(catalogue, 0))[0] == 'sku-0'
  assert main(['remove', '--index', path, '--products', 'sku-0']) == 0
  found = _top(path, model, _photo(catalogue, 0), k=10)
  assert 'sku-0' not in found and len(found) == 3


@pytest.mark.parametrize('backend', ['faiss', 'qdrant'])
def test_every_backend_through_the_command_line(backend, index_dir, model, catalogue, tmp_path,
                                                capsys):
  path = str(tmp_path / backend)
  extra = ['--qdrant-path', str(tmp_path / 'qdrant-data')] if backend == 'qdrant' else []
  for csv_file in (catalogue['csv_first'], catalogue['csv_rest']):
    assert main(['index', '--workdir', model.workdir, '--index', path, '--catalogue', csv_file,
                 '--backend', backend, *extra]) == 0
  assert json.load(open(os.path.join(path, 'index.json')))['backend'] == backend
  assert main(['index', '--workdir', model.workdir, '--index', path, '--catalogue',
               catalogue['csv_rest'], '--backend', 'exact']) == 2
  assert "uses the '" + backend + "' backend" in capsys.readouterr().err
  for product in range(6):
    photo = _photo(catalogue, product, 1)
    assert _top(path, model, photo) == _top(index_dir, model, photo)
  assert main(['remove', '--index', path, '--products', 'sku-3']) == 0
  for product in range(6):
    assert 'sku-3' not in _top(path, model, _photo(catalogue, product), k=10)
  capsys.readouterr()
  assert main(['verify', '--index', path]) == 0, capsys.readouterr().err
  if backend != 'exact':  # the others are opened and counted
    assert f'backend {backend}: opens and holds the 10 live images' in capsys.readouterr().out
  if backend == 'faiss':  # its index file, flipped, is found by its sha256
    name = os.path.join(index_file(path, 'backend'), 'faiss.index')
    with open(os.path.join(path, name), 'r+b') as f:
      f.seek(-9, os.SEEK_END)
      last = f.read(1)
      f.seek(-9, os.SEEK_END)
      f.write(bytes([last[0] ^ 1]))
    assert main(['verify', '--index', path, '--quiet']) == 1
    assert f'problem: {name}: its sha256 is not the one' in capsys.readouterr().err
  searcher = engine.Searcher(search_index.SearchIndex(path), model)
  assert searcher.backend.name == backend
  with open(_photo(catalogue, 5, 1), 'rb') as f:
    answer = searcher.answer(f.read(), box=(16, 0, 64, 48), category='shoe', k=10)
  assert {r['category'] for r in answer['results']} == {'shoe'}
  assert answer['results'][0]['product_id'] == 'sku-5'


class _Killed(BaseException):
  """Stands for the process dying: nothing catches a BaseException that is not an Exception."""


def _state(path, model, catalogue):
  """What an index holds, as a reader sees it: its rows and their embeddings, and the products
  a search returns for two photos."""
  index = search_index.SearchIndex(path)
  searcher = engine.Searcher(index, model)
  found = []
  for product in (0, 5):
    with open(_photo(catalogue, product), 'rb') as f:
      found.append([(r['product_id'], round(r['score'], 5))
                    for r in searcher.answer(f.read(), k=6)['results']])
  return ([(i['product_id'], i.get('removed', False)) for i in index.items],
          index.embeddings.tobytes(), found)


@pytest.mark.parametrize('backend', ['exact', 'faiss'])
def test_a_change_killed_at_any_write_leaves_the_old_or_the_new_index(
    tmp_path, model, catalogue, monkeypatch, backend):
  # Every file replacement a change makes (the index's, and the backend's own) is in turn the
  # moment the process dies: the index then reads whole, as it was or as it became, and the
  # same command again completes it. Then the files left are those of one generation.
  if backend == 'faiss':
    pytest.importorskip('faiss')
  base = tmp_path / 'base'
  assert main(['index', '--workdir', model.workdir, '--index', str(base), '--catalogue',
               catalogue['csv_first'], '--centroids', '--backend', backend]) == 0
  changes = {
      'add': lambda path: search_index.build(path, model, _entries(catalogue['csv_rest']),
                                             progress=False),
      'update': lambda path: search_index.build(path, model, _entries(catalogue['csv_first'])[:2],
                                                progress=False, replace=True),
      'remove': lambda path: search_index.remove_products(path, ['sku-1']),
  }
  replace = os.replace
  for name, change in changes.items():
    done = tmp_path / f'{name}_done'
    shutil.copytree(base, done)
    change(str(done))
    before, after = _state(base, model, catalogue), _state(done, model, catalogue)
    assert before != after
    for kill_at in range(1, 20):
      path = tmp_path / f'{name}_{kill_at}'
      shutil.copytree(base, path)
      calls = []

      def dying_replace(source, target, kill_at=kill_at, calls=calls):
        calls.append(target)
        if len(calls) == kill_at:
          raise _Killed
        return replace(source, target)

      monkeypatch.setattr(os, 'replace', dying_replace)
      try:
        change(str(path))
        finished = True
      except _Killed:
        finished = False
      finally:
        monkeypatch.setattr(os, 'replace', replace)
      state = _state(path, model, catalogue)
      assert state in (before, after), (name, kill_at, calls[-1])
      if state == before:
        change(str(path))  # the same command again
      assert _state(path, model, catalogue) == after, (name, kill_at)
      generation = search_index.SearchIndex(str(path)).files
      left = {n for n in os.listdir(path) if n not in ('index.json', 'thumbs', '.lock')}
      assert left == set(generation.values()), (name, kill_at, left)
      shutil.rmtree(path)
      if finished:
        break
    assert not finished or kill_at > 3, 'the change made fewer replacements than expected'


def _entries(csv_path):
  from fashion_jax.search import catalogue as search_catalogue
  return search_catalogue.read_catalogue(csv_path, os.path.dirname(csv_path))


def test_a_second_writer_waits_for_the_first_and_both_changes_are_kept(
    index_copy, model, catalogue, capfd):
  import threading
  other = threading.Thread(target=search_index.remove_products, args=(index_copy, ['sku-1']))
  with search_index.writer_lock(index_copy):
    other.start()
    other.join(timeout=1.0)
    assert other.is_alive()  # waiting: the index is unchanged while the first writer holds it
    assert 'another command is changing this index; waiting' in capfd.readouterr().err
    assert search_index.SearchIndex(index_copy).num_live == 12
  # This writer, started while the other runs or waits, goes after it.
  search_index.build(index_copy, model, _entries(catalogue['csv_rest']), progress=False,
                     replace=True)
  other.join(timeout=60)
  assert not other.is_alive()
  index = search_index.SearchIndex(index_copy)
  # The update replaced sku-4 and sku-5's images; then sku-1 went: 12 + 4 new - 4 old - 2.
  assert index.num_live == 10 and 'sku-1' not in {
      item['product_id'] for item in index.items if not item.get('removed')}


def test_a_following_searcher_takes_up_changes_made_by_other_commands(index_copy, model,
                                                                      catalogue, capfd):
  import time
  searcher = engine.Searcher(search_index.SearchIndex(index_copy), model)
  searcher.follow(interval=0.05)

  def top(product):
    with open(_photo(catalogue, product), 'rb') as f:
      return [r['product_id'] for r in searcher.answer(f.read(), k=6)['results']]

  def eventually(condition):
    deadline = time.monotonic() + 30
    while not condition():
      assert time.monotonic() < deadline, 'the change was not taken up'
      time.sleep(0.05)

  assert top(1)[0] == 'sku-1'
  assert main(['remove', '--index', index_copy, '--products', 'sku-1']) == 0
  eventually(lambda: 'sku-1' not in top(1))
  assert searcher.index.num_live == 10
  assert 'loaded generation' in capfd.readouterr().err
  # A change that cannot be used is reported, and the index in use keeps serving.
  with open(os.path.join(index_copy, 'index.json')) as f:
    meta = json.load(f)
  meta['model']['fingerprint'] = 'another model'
  with open(os.path.join(index_copy, 'index.json'), 'w') as f:
    json.dump(meta, f)
  eventually(lambda: 'cannot be loaded' in capfd.readouterr().err)
  assert top(2)[0] == 'sku-2' and searcher.index.num_live == 10


def test_products_a_shared_backend_holds_beyond_the_index_are_skipped(index_copy, model,
                                                                     catalogue):
  # A Qdrant collection is changed by its writer before the writer commits the index that
  # lists the change: until then a reader's backend may return products its index does not
  # list (yet), or no longer lists live rows of. Those are skipped, not an error.
  import numpy as np
  searcher = engine.Searcher(search_index.SearchIndex(index_copy), model)
  with open(_photo(catalogue, 1), 'rb') as f:
    embedding = model.embed_crops([searcher.crop_of(f.read())])
  searcher._product_rows[1] = np.zeros(0, np.int64)  # sku-1 no longer live in the index
  searcher.num_products -= 1                          # and sku-5 not in it yet
  found = [r['product_id'] for r in searcher.search_embeddings(embedding, k=6)[0]]
  assert found and 'sku-1' not in found and 'sku-5' not in found


def test_a_new_category_is_searchable_once_its_generation_is_loaded(index_copy, model,
                                                                   catalogue, tmp_path):
  import time
  searcher = engine.Searcher(search_index.SearchIndex(index_copy), model)
  searcher.follow(interval=0.05)
  hats = tmp_path / 'hats.csv'
  hats.write_text(f"image,product_id,category\n{_photo(catalogue, 2, 1)},sku-hat,hat\n")
  assert main(['index', '--workdir', model.workdir, '--index', index_copy, '--catalogue',
               str(hats)]) == 0
  deadline = time.monotonic() + 30
  while searcher._pending is None and 'hat' not in searcher.index.categories:
    assert time.monotonic() < deadline
    time.sleep(0.05)
  # What the service reports (/api/info, /thumb) is the loaded generation, before any search
  # takes it up.
  assert 'hat' in searcher.latest_index.categories
  assert searcher.latest_index.items[-1]['product_id'] == 'sku-hat'
  # Asked for by a filtered search before any search took the generation up.
  with open(_photo(catalogue, 2, 1), 'rb') as f:
    answer = searcher.answer(f.read(), k=3, category='hat')
  assert [r['product_id'] for r in answer['results']] == ['sku-hat']


def test_ctrl_c_while_waiting_for_the_lock_is_one_line_and_changes_nothing(index_copy):
  import signal
  import subprocess
  import sys
  import time
  with search_index.writer_lock(index_copy):
    remove = subprocess.Popen(
        [sys.executable, '-m', 'fashion_jax.search', 'remove', '--index', index_copy,
         '--products', 'sku-1'], stderr=subprocess.PIPE, text=True)
    waiting = remove.stderr.readline()
    assert 'waiting for it to finish' in waiting, waiting
    time.sleep(0.2)
    remove.send_signal(signal.SIGINT)
    _, err = remove.communicate(timeout=60)
  assert remove.returncode == 130
  assert err.startswith('interrupted; the index is as it was') and err.count('\n') == 1, err
  assert search_index.SearchIndex(index_copy).num_live == 12
