"""Qdrant collections and the indexes that own them: names recorded, never taken from another
index, kept by a copied index; Qdrant's refusals as one line before any image is embedded."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fashion_jax.search.__main__ import main

pytest.importorskip('qdrant_client')
pytestmark = [pytest.mark.filterwarnings('ignore:Payload indexes have no effect:UserWarning'),
              pytest.mark.filterwarnings('ignore:Failed to obtain server version:UserWarning')]


def _top(index, catalogue, capsys, product=2):
  photo = os.path.join(catalogue['dir'], f'p{product}_1.jpg')
  capsys.readouterr()
  assert main(['query', '--index', index, photo, '-k', '3', '--out',
               os.path.join(os.path.dirname(index), 'out')]) == 0
  return capsys.readouterr().out.splitlines()[2].split()[1]


def _index(workdir, index, csv_file, *flags):
  return main(['index', '--workdir', workdir, '--index', index, '--catalogue', csv_file,
               '--backend', 'qdrant', *flags])


def test_indexes_of_one_folder_name_keep_their_own_collections_and_copies_work(
    workdir, catalogue, tmp_path, capsys):
  storage = str(tmp_path / 'storage')
  first, second = str(tmp_path / 'a' / 'shop'), str(tmp_path / 'b' / 'shop')
  assert _index(workdir, first, catalogue['csv_first'], '--qdrant-path', storage) == 0
  assert _index(workdir, second, catalogue['csv_rest'], '--qdrant-path', storage) == 0
  collections = [json.load(open(os.path.join(path, 'index.json')))['backend_settings']
                 ['collection'] for path in (first, second)]
  assert collections[0] != collections[1] and all(c.startswith('shop-') for c in collections)
  assert _top(first, catalogue, capsys) == 'sku-2'   # products 0-3: still there
  assert _top(second, catalogue, capsys, 4) == 'sku-4'   # products 4-5
  # A copy under another name reads the collection its index.json names.
  copy = str(tmp_path / 'copy')
  shutil.copytree(first, copy)
  assert _top(copy, catalogue, capsys) == 'sku-2'
  # An index moved aside keeps its collection when a new one is made at its old path.
  moved = str(tmp_path / 'moved')
  os.rename(first, moved)
  assert _index(workdir, first, catalogue['csv_rest'], '--qdrant-path', storage) == 0
  assert _top(moved, catalogue, capsys) == 'sku-2' and _top(first, catalogue, capsys, 4) == \
      'sku-4'
  capsys.readouterr()
  # Naming another index's collection for a new one is refused before any image is read.
  third = str(tmp_path / 'c')
  assert _index(workdir, third, catalogue['csv_first'], '--qdrant-path', storage,
                '--collection', collections[0]) == 2
  err = capsys.readouterr().err
  assert f"already has a collection '{collections[0]}' (made for {first})" in err
  assert err.count('\n') == 1 and not os.path.exists(os.path.join(third, 'thumbs'))


def test_a_relative_storage_path_is_recorded_whole(workdir, catalogue, tmp_path, capsys,
                                                   monkeypatch):
  monkeypatch.chdir(tmp_path)
  index = str(tmp_path / 'rel')
  assert _index(workdir, index, catalogue['csv_first'], '--qdrant-path', 'relative-store') == 0
  settings = json.load(open(os.path.join(index, 'index.json')))['backend_settings']
  assert settings['path'] == str(tmp_path / 'relative-store')
  monkeypatch.chdir(catalogue['dir'])
  assert _top(index, catalogue, capsys) == 'sku-2'


@pytest.mark.parametrize('flags, words', [
    (['--qdrant-url', 'http://127.0.0.1:1'], 'qdrant at http://127.0.0.1:1: '),
    (['--qdrant-url', 'http://127.0.0.1:1', '--qdrant-path', 'x'], 'a url (a server) or a path'),
    (['--collection', 'a/b'], "qdrant collection name 'a/b': use 1-200 letters"),
    (['--faiss-factory', 'Flat'], "the qdrant backend has no setting 'factory'"),
])
def test_bad_settings_and_unreachable_servers_are_one_line_before_embedding(
    workdir, catalogue, tmp_path, capsys, flags, words):
  index = str(tmp_path / 'index')
  assert _index(workdir, index, catalogue['csv_first'], *flags) == 2
  err = capsys.readouterr().err
  assert words in err and err.count('\n') == 1, err
  assert not os.path.exists(os.path.join(index, 'thumbs'))


def test_storage_held_by_another_process_and_a_collection_changed_outside_are_one_line(
    workdir, catalogue, tmp_path, capsys):
  storage = str(tmp_path / 'held')
  index = str(tmp_path / 'index')
  assert _index(workdir, index, catalogue['csv_first'], '--qdrant-path', storage) == 0
  from fashion_jax.search.backends import qdrant_index
  qdrant_index._EMBEDDED.clear()  # as a new process would find it (the storage closed)
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, qdrant_client; c = qdrant_client.QdrantClient('
       'path=sys.argv[1]); print("held", flush=True); sys.stdin.read()', storage],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    capsys.readouterr()
    photo = os.path.join(catalogue['dir'], 'p2_1.jpg')
    assert main(['query', '--index', index, photo, '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert 'is already accessed by another instance' in err and err.count('\n') == 1, err
    # Adding to it: refused before any image is read.
    assert main(['index', '--workdir', workdir, '--index', index, '--catalogue',
                 catalogue['csv_rest']]) == 2
    err = capsys.readouterr().err
    assert 'is already accessed by another instance' in err and 'indexing' not in err, err
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  # The collection recreated outside the index with another width.
  import qdrant_client
  settings = json.load(open(os.path.join(index, 'index.json')))['backend_settings']
  client = qdrant_client.QdrantClient(path=storage)
  client.delete_collection(settings['collection'])
  client.create_collection(settings['collection'], vectors_config=qdrant_client.models.VectorParams(
      size=3, distance=qdrant_client.models.Distance.DOT))
  client.close()
  qdrant_index._EMBEDDED.clear()
  assert main(['remove', '--index', index, '--products', 'sku-1']) == 2
  assert 'holds 3-dim vectors, the index 64' in capsys.readouterr().err
