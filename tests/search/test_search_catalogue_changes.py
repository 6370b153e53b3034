"""Catalogue changes without a rebuild: `remove` and `update` through the command line."""

import csv
import json
import os
import shutil

import pytest

from fashion_jax.search import engine
from fashion_jax.search import index as search_index
from fashion_jax.search.__main__ import main


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
  before = open(os.path.join(index_copy, 'items.jsonl')).read()
  ids = tmp_path / 'ids.txt'
  ids.write_text('sku-2\nsku-99\n')
  assert main(['remove', '--index', index_copy, '--products-file', str(ids)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: {index_copy}: not in the index: 'sku-99' (nothing removed)", err
  assert open(os.path.join(index_copy, 'items.jsonl')).read() == before
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
  searcher = engine.Searcher(search_index.SearchIndex(path), model)
  assert searcher.backend.name == backend
  with open(_photo(catalogue, 5, 1), 'rb') as f:
    answer = searcher.answer(f.read(), box=(16, 0, 64, 48), category='shoe', k=10)
  assert {r['category'] for r in answer['results']} == {'shoe'}
  assert answer['results'][0]['product_id'] == 'sku-5'
