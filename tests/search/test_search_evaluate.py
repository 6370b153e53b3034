"""`search evaluate`: each labelled photo's rank against a product ranking computed here in
NumPy, and the figures from those ranks."""

import csv
import json
import os

import numpy as np
import pytest

from fashion_jax.search import evaluation
from fashion_jax.search import index as search_index
from fashion_jax.search.__main__ import main


def test_metrics_from_ranks():
  figures = evaluation.metrics([1, None, 3, 12], k=20)
  assert figures == pytest.approx({'queries': 4, 'Acc@1': 0.25, 'Acc@5': 0.5, 'Acc@10': 0.5,
                                   'Acc@20': 0.75, 'MRR@20': (1 + 0 + 1 / 3 + 1 / 12) / 4})
  assert list(evaluation.metrics([2], k=7)) == ['queries', 'Acc@1', 'Acc@5', 'Acc@7', 'MRR@7']


def _queries_csv(catalogue, tmp_path):
  """The catalogue's photos (the second of each product, product 5's with its box) labelled
  with their products, and one photo of a product the index does not hold."""
  path = tmp_path / 'labelled.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'product_id', 'category', 'x', 'y', 'w', 'h'])
    for row in catalogue['rows'][1::2]:
      writer.writerow([os.path.join(catalogue['dir'], row['image']), row['product_id'],
                       row['category']] + (row['box'].split(',') if row['box'] else [''] * 4))
    writer.writerow([os.path.join(catalogue['dir'], 'p0_0.png'), 'sku-99', 'dress', '', '', '',
                     ''])
  return path


def _expected_ranks(index, model, catalogue, k, category_filter):
  """Products ranked by their best image's cosine similarity, in NumPy."""
  from PIL import Image
  ranks = []
  for row in catalogue['rows'][1::2]:
    image = np.asarray(Image.open(os.path.join(catalogue['dir'], row['image'])).convert('RGB'))
    if row['box']:
      x, y, w, h = map(int, row['box'].split(','))
      image = image[y:y + h, x:x + w]
    query = model.embed_crops([image])[0].astype(np.float32)
    similarity = index.embeddings.astype(np.float32) @ query
    best = {}
    for item, score in zip(index.items, similarity):
      if category_filter and item['category'] != row['category']:
        continue
      best[item['product_id']] = max(best.get(item['product_id'], -np.inf), score)
    order = sorted(best, key=lambda product: -best[product])[:k]
    ranks.append(order.index(row['product_id']) + 1 if row['product_id'] in order else None)
  return ranks


@pytest.mark.parametrize('category_filter', [False, True])
def test_ranks_equal_a_numpy_ranking_and_unknown_products_are_left_out(
    index_dir, model, catalogue, tmp_path, capsys, category_filter):
  queries = _queries_csv(catalogue, tmp_path)
  out = tmp_path / 'out'
  argv = ['evaluate', '--index', index_dir, str(queries), '-k', '3', '--out', str(out),
          '--quiet'] + (['--filter-by-category'] if category_filter else [])
  assert main(argv) == 0
  printed = capsys.readouterr().out
  assert '6 queries, k=3 (1 left out: their product is not in the index)' in printed
  result = json.loads((out / 'evaluation.json').read_text())
  ranks = [row['rank'] for row in result['queries']]
  index = search_index.SearchIndex(index_dir)
  assert ranks == _expected_ranks(index, model, catalogue, 3, category_filter)
  assert result['overall'] == pytest.approx(evaluation.metrics(ranks, 3))
  for category in ('dress', 'shoe'):
    mine = [row['rank'] for row in result['queries'] if row['category'] == category]
    assert result['categories'][category] == pytest.approx(evaluation.metrics(mine, 3))


def test_bad_rows_are_one_line_before_any_photo_is_read(index_dir, catalogue, tmp_path, capsys):
  path = tmp_path / 'bad.csv'
  path.write_text('image,product_id\nmissing.jpg,sku-1\n')
  assert main(['evaluate', '--index', index_dir, str(path)]) == 2
  assert capsys.readouterr().err == f'error: {path}: row 2: {tmp_path / "missing.jpg"} is not a ' \
      'file\n'
  path.write_text(f"image,category\n{os.path.join(catalogue['dir'], 'p0_0.png')},dress\n")
  assert main(['evaluate', '--index', index_dir, str(path)]) == 2
  assert 'product_id' in capsys.readouterr().err


def test_unusable_photos_are_counted_and_named_and_nothing_to_measure_is_an_error(
    index_dir, catalogue, tmp_path, capsys):
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'\xff\xd8\xff not a whole JPEG')
  photo = os.path.join(catalogue['dir'], 'p2_1.jpg')
  path = tmp_path / 'labelled.csv'
  path.write_text('image,product_id,x,y,w,h\n'
                  f'{photo},sku-2,,,,\n'
                  f'{broken},sku-2,,,,\n'
                  f'{photo},sku-2,500,500,10,10\n')
  out = tmp_path / 'out'
  assert main(['evaluate', '--index', index_dir, str(path), '-k', '3', '--quiet', '--out',
               str(out)]) == 0
  printed = capsys.readouterr().out
  assert (f'1 queries, k=3 (2 photos could not be used, the first at row 3: {broken}: '
          in printed), printed
  result = json.loads((out / 'evaluation.json').read_text())
  assert [u['row'] for u in result['unusable']] == [3, 4] and 'outside' in \
      result['unusable'][1]['error']
  path.write_text(f'image,product_id\n{photo},sku-99\n{broken},sku-2\n')
  assert main(['evaluate', '--index', index_dir, str(path), '--quiet']) == 2
  assert capsys.readouterr().err.startswith(
      'error: nothing to measure: of 2 labelled photos, 1 are of products the index does not '
      'hold and 1 could not be used (row 3: ')
