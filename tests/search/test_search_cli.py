"""Index, incremental add and query through the command line, on real image files."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from fashion_jax.search import images as image_io
from fashion_jax.search import index as search_index
from fashion_jax.search.__main__ import main
from index_files import index_file, items_text


def _crop(catalogue, row):
  image = image_io.read(os.path.join(catalogue['dir'], row['image']))
  return image_io.crop(image, image_io.parse_box(row['box']))


def test_index_holds_every_image_once_with_its_model_and_preprocessing(index_dir, catalogue,
                                                                         model):
  index = search_index.SearchIndex(index_dir)
  rows = catalogue['rows']
  assert len(index) == len(rows) and index.meta['count'] == len(rows)
  assert index.meta['products'] == 6 and index.categories == ['dress', 'shoe']
  assert index.meta['dtype'] == 'float32' and index.embeddings.dtype == np.float32
  assert index.meta['model']['fingerprint'] == model.fingerprint
  assert index.meta['model']['step'] == 3
  assert index.meta['model']['preprocessing']['image_size'] == [32, 32]
  assert index.meta['model']['preprocessing']['resize'] == 'stretch'
  assert [item['product_id'] for item in index.items] == [r['product_id'] for r in rows]
  assert index.items[-1]['box'] == [16, 0, 64, 48]
  # Each row is the embedding of its (cropped) file.
  expected = model.embed_crops([_crop(catalogue, row) for row in rows])
  np.testing.assert_allclose(index.embeddings, expected, atol=1e-5)
  for row in range(len(index)):
    assert os.path.isfile(index.thumb_path(row))


def test_adding_images_keeps_old_rows_and_skips_known_ones(tmp_path, workdir, catalogue, capsys):
  path = str(tmp_path / 'index')
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue',
               catalogue['csv_first']]) == 0
  first = search_index.SearchIndex(path)
  assert first.embeddings.dtype == np.float16 and len(first) == 8
  # Old rows are not recomputed: poison them and check they survive an add.
  poisoned = np.full_like(first.embeddings, 0.25)
  np.save(os.path.join(path, index_file(path, 'embeddings')), poisoned)
  capsys.readouterr()
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue',
               catalogue['csv_rest'], '--centroids']) == 0
  assert 'added 4 images, skipped 0' in capsys.readouterr().out
  both = search_index.SearchIndex(path)
  assert len(both) == 12
  np.testing.assert_array_equal(both.embeddings[:8], poisoned)
  assert both.centroids.shape == (6, 64)
  # Adding the same catalogue again embeds nothing.
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue',
               catalogue['csv_rest']]) == 0
  assert 'added 0 images, skipped 4' in capsys.readouterr().out
  assert len(search_index.SearchIndex(path)) == 12


def _query(args, tmp_path, capsys):
  out = str(tmp_path / 'out')
  code = main(['query', *args, '--out', out])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  for query in results['queries']:
    with Image.open(os.path.join(out, query['picture'])) as picture:
      assert picture.width > picture.height > 0
  return results['queries'], captured.out


def test_query_a_file_finds_its_product_once(index_dir, catalogue, tmp_path, capsys):
  photo = os.path.join(catalogue['dir'], 'p2_0.png')
  queries, table = _query(['--index', index_dir, photo, '-k', '6'], tmp_path, capsys)
  results = queries[0]['results']
  assert results[0]['product_id'] == 'sku-2' and results[0]['score'] == pytest.approx(1, abs=1e-4)
  ids = [r['product_id'] for r in results]
  assert len(ids) == len(set(ids)) == 6  # products, not images
  scores = [r['score'] for r in results]
  assert scores == sorted(scores, reverse=True)
  assert 'sku-2' in table.splitlines()[1] or 'sku-2' in table


def test_index_and_query_run_without_tensorflow(workdir, catalogue, tmp_path):
  # The search extra installs no TensorFlow: index (from a CSV), add, query and remove must not
  # import it. A None entry in sys.modules makes an import fail as on a machine without it.
  import subprocess
  import sys
  script = ("import sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n"
            'from fashion_jax.search.__main__ import main\n'
            'for args in sys.argv[1:]:\n'
            '  code = main(args.split(\'|\'))\n'
            "  assert not {'tensorflow', 'data_pipelines.datasets'} & {k for k, v in "
            'sys.modules.items() if v is not None}\n'
            '  if code: sys.exit(code)\n')
  index, photo = str(tmp_path / 'index'), os.path.join(catalogue['dir'], 'p2_0.png')
  commands = [['index', '--workdir', workdir, '--index', index, '--catalogue',
               catalogue['csv_first']],
              ['query', '--index', index, photo, '--out', str(tmp_path / 'out')],
              ['remove', '--index', index, '--products', 'sku-5'],
              # A dataset error is still one line, and still needs no TensorFlow to report.
              ['query', '--index', index, str(tmp_path / 'missing.png')]]
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run([sys.executable, '-c', script, *['|'.join(c) for c in commands]],
                          cwd=repo, env=dict(os.environ, PYTHONPATH=repo), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith('error: '), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  with open(os.path.join(tmp_path / 'out', 'results.json')) as f:
    assert json.load(f)['queries'][0]['results'][0]['product_id'] == 'sku-2'


def test_query_a_folder_and_a_category_filter(index_dir, catalogue, tmp_path, capsys, make_image):
  folder = tmp_path / 'photos'
  folder.mkdir()
  for product in (1, 3):
    Image.fromarray(make_image(product, 7, (50, 50))).save(folder / f'street{product}.png')
  (folder / 'notes.txt').write_text('not a photo, skipped by extension')
  queries, _ = _query(['--index', index_dir, str(folder), '--category', 'dress', '-k', '3'],
                      tmp_path, capsys)
  assert [os.path.basename(q['query']) for q in queries] == ['street1.png', 'street3.png']
  for query in queries:
    assert query['category'] == 'dress'
    assert {r['category'] for r in query['results']} == {'dress'}
    assert len(query['results']) == 3  # sku-0, sku-2, sku-4


def test_query_a_csv_with_boxes(index_dir, catalogue, tmp_path, capsys):
  path = tmp_path / 'queries.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'x', 'y', 'w', 'h', 'category'])
    writer.writerow([os.path.join(catalogue['dir'], 'p5_1.jpg'), 16, 0, 64, 48, ''])
    writer.writerow([os.path.join(catalogue['dir'], 'p4_0.png'), '', '', '', '', 'dress'])
  queries, _ = _query(['--index', index_dir, str(path), '-k', '2'], tmp_path, capsys)
  assert queries[0]['box'] == [16, 0, 64, 48]
  # The box is the catalogue crop itself: a perfect match.
  assert queries[0]['results'][0]['product_id'] == 'sku-5'
  assert queries[0]['results'][0]['score'] == pytest.approx(1, abs=1e-4)
  assert queries[1]['results'][0]['product_id'] == 'sku-4'


def test_centroid_index_ranks_products_by_their_mean(tmp_path, workdir, catalogue, capsys, model):
  path = str(tmp_path / 'centroids')
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue',
               catalogue['csv_first'], '--centroids', '--dtype', 'float32']) == 0
  index = search_index.SearchIndex(path)
  photo = os.path.join(catalogue['dir'], 'p1_0.png')
  queries, _ = _query(['--index', path, photo, '-k', '4'], tmp_path, capsys)
  query = model.embed_crops([image_io.read(photo)])[0]
  expected = {pid: float(index.centroids[i] @ query) for i, pid in enumerate(index.product_ids)}
  for result in queries[0]['results']:
    assert result['score'] == pytest.approx(expected[result['product_id']], abs=1e-5)
  assert len(queries[0]['results']) == 4


def test_index_a_tfds_split(tmp_path, workdir, tiny_data_dir, capsys, model):
  path = str(tmp_path / 'tfds')
  assert main(['index', '--workdir', workdir, '--index', path, '--tfds', 'fashion_synth/tiny',
               '--split', 'gallery', '--data-dir', tiny_data_dir, '--domain', 'shop']) == 0
  index = search_index.SearchIndex(path)
  assert len(index) > 0 and all(item['image'].startswith('tfds:') for item in index.items)
  # Thumbnails live in the index; searching with one finds its own product first.
  with open(index.thumb_path(0), 'rb') as f:
    assert f.read(2) == b'\xff\xd8'


@pytest.mark.parametrize('text, words', [
    ('{"model": ', 'cannot be read as a config'),
    ('[1]', 'not a training config'),
    ('{}', 'not a training config'),
    ('{"model": {"backbone": "resnet10_ibn_a"}, "input": {"image_size": [32]}}',
     'not a training config'),
])
def test_a_damaged_workdir_config_is_one_line(workdir, index_dir, catalogue, tmp_path, capsys,
                                              text, words):
  import shutil
  other = tmp_path / 'workdir'
  shutil.copytree(workdir, other)
  (other / 'config.json').write_text(text)
  photo = os.path.join(catalogue['dir'], 'p0_0.png')
  code = main(['query', '--index', index_dir, photo, '--workdir', str(other),
               '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_a_large_size_limit_reserves_no_memory(tmp_path):
  # The items of an index are allowed 1 MiB a row; reading them must not reserve that much
  # (a 100,000-row index once failed to open with MemoryError).
  path = tmp_path / 'items.jsonl'
  path.write_bytes(b'{"a": 1}\n' * 1000)
  assert image_io.read_file(str(path), 1 << 42) == b'{"a": 1}\n' * 1000
  with pytest.raises(image_io.InputError, match='over the size limit of 8,999 bytes'):
    image_io.read_file(str(path), 8999)


def _many_images(folder, count, make_image, prefix='m'):
  rows = []
  for number in range(count):
    name = f'{prefix}{number:03d}.' + ('png' if number % 2 else 'jpg')
    Image.fromarray(make_image(number % 6, number % 2, (40 + number % 7, 30 + number % 5))).save(
        folder / name, quality=95)
    rows.append((name, f'{prefix}-sku-{number // 3}', 'dress'))
  return rows


def _write_csv(path, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'product_id', 'category'])
    writer.writerows(rows)


def test_images_read_side_by_side_index_in_order(workdir, model, tmp_path, make_image, capfd,
                                                 monkeypatch):
  """Readers run ahead of the embedding: the rows, thumbnails and embeddings are in catalogue
  order and the same with one reader; a damaged image fails the run naming the first damaged
  one in catalogue order, and the index keeps what it had."""
  rows = _many_images(tmp_path, 30, make_image)
  _write_csv(tmp_path / 'all.csv', rows)
  monkeypatch.setattr(search_index, '_readers', lambda: 4)
  assert main(['index', '--workdir', workdir, '--catalogue', str(tmp_path / 'all.csv'),
               '--index', str(tmp_path / 'four')]) == 0
  monkeypatch.setattr(search_index, '_readers', lambda: 1)
  assert main(['index', '--workdir', workdir, '--catalogue', str(tmp_path / 'all.csv'),
               '--index', str(tmp_path / 'one')]) == 0
  four, one = search_index.SearchIndex(str(tmp_path / 'four')), search_index.SearchIndex(
      str(tmp_path / 'one'))
  assert [os.path.basename(item['image']) for item in four.items] == [name for name, _, _ in rows]
  assert four.items == one.items
  np.testing.assert_array_equal(four.embeddings, one.embeddings)
  for item in four.items:
    assert (tmp_path / 'four' / item['thumb']).read_bytes() == (
        tmp_path / 'one' / item['thumb']).read_bytes()
  np.testing.assert_allclose(four.embeddings[7].astype(np.float32), model.embed_crops(
      [image_io.read(str(tmp_path / rows[7][0]))])[0], atol=2e-3)

  (tmp_path / 'broken_a.jpg').write_bytes((tmp_path / rows[0][0]).read_bytes()[:200])
  (tmp_path / 'broken_b.png').write_bytes(b'not an image at all')
  more = _many_images(tmp_path, 12, make_image, prefix='n')
  damaged = more[:5] + [('broken_a.jpg', 'sku-x', 'shoe')] + more[5:9] + [
      ('broken_b.png', 'sku-y', 'shoe')] + more[9:]
  _write_csv(tmp_path / 'damaged.csv', damaged)
  monkeypatch.setattr(search_index, '_readers', lambda: 4)
  before = items_text(tmp_path / 'four')
  capfd.readouterr()
  assert main(['index', '--workdir', workdir, '--catalogue', str(tmp_path / 'damaged.csv'),
               '--index', str(tmp_path / 'four')]) == 2
  err = capfd.readouterr().err
  # The progress bar is erased (\r), leaving the one line.
  assert err.count('\n') == 1 and err.rsplit('\r', 1)[-1].startswith('error: '), err
  assert 'broken_a.jpg' in err and 'broken_b' not in err, err
  assert items_text(tmp_path / 'four') == before
  assert len(search_index.SearchIndex(str(tmp_path / 'four')).items) == 30
