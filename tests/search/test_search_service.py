"""The HTTP service's JSON API and every bad input, through the service and the command line."""

import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from fashion_jax.search.__main__ import main
from index_files import items_text


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='PNG')
  return out.getvalue()


def _request(url, data=None, **params):
  query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
  request = urllib.request.Request(url + ('?' + query if query else ''), data=data,
                                   method='POST' if data is not None else 'GET')
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, response.headers.get('Content-Type'), response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers.get('Content-Type'), e.read()


def _search(service, data, **params):
  status, content_type, body = _request(service['url'] + '/api/search', data, **params)
  assert content_type == 'application/json'
  return status, json.loads(body)


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory, make_image):
  """name -> (bytes, words the one-line error must contain)."""
  jpeg = io.BytesIO()
  Image.fromarray(make_image(0, 0, (60, 60))).save(jpeg, format='JPEG')
  jpeg = jpeg.getvalue()
  png = _png(make_image(1, 0, (40, 40)))
  corrupt = bytearray(png)
  corrupt[60:200] = bytes(140)  # the image data's zlib stream, overwritten
  bomb = io.BytesIO()
  # 2,000 x 1,000 = 2 Mpx (over the service's 1 Mpx limit and the CLI's --max-pixels), a
  # few kilobytes on disk.
  Image.new('L', (2000, 1000)).save(bomb, format='PNG')
  return {
      'text': (b'product,price\nshirt,10\n', 'not an image'),
      'truncated_jpeg': (jpeg[:len(jpeg) // 2], 'truncated or corrupt'),
      'corrupt_png': (bytes(corrupt), 'truncated or corrupt'),
      'bomb': (bomb.getvalue(), 'over the limit'),
      'empty': (b'', 'empty'),
  }


def test_search_api_ranks_products(service, catalogue):
  with open(os.path.join(catalogue['dir'], 'p3_0.png'), 'rb') as f:
    data = f.read()
  status, answer = _search(service, data)
  assert status == 200, answer
  results = answer['results']
  assert len(results) == 4  # the service's default k
  assert results[0]['product_id'] == 'sku-3' and results[0]['score'] == pytest.approx(1, abs=1e-4)
  assert len({r['product_id'] for r in results}) == 4
  # The same photo through the command-line engine gives the same ranking.
  searcher = service['searcher']
  expected = searcher.search_crops([searcher.crop_of(data)], k=4)[0]
  assert [r['product_id'] for r in results] == [r['product_id'] for r in expected]
  # Each result's picture is the index's thumbnail of that row.
  status, content_type, thumb = _request(service['url'] + results[0]['thumb'])
  assert status == 200 and content_type == 'image/jpeg'
  with open(searcher.index.thumb_path(int(results[0]['thumb'].split('/')[-1])), 'rb') as f:
    assert f.read() == thumb


def test_search_api_box_and_category(service, catalogue):
  with open(os.path.join(catalogue['dir'], 'p5_1.jpg'), 'rb') as f:
    data = f.read()
  status, answer = _search(service, data, box='16,0,64,48', k=2)
  assert status == 200, answer
  assert answer['crop_size'] == [64, 48] and answer['box'] == [16, 0, 64, 48]
  assert answer['results'][0]['product_id'] == 'sku-5'
  assert answer['results'][0]['score'] == pytest.approx(1, abs=1e-4)
  status, answer = _search(service, data, category='dress', k=10)
  assert status == 200 and {r['category'] for r in answer['results']} == {'dress'}
  assert len(answer['results']) == 3


def test_info_page_and_unknown_paths(service):
  status, _, body = _request(service['url'] + '/api/info')
  info = json.loads(body)
  assert status == 200 and info['products'] == 6 and info['categories'] == ['dress', 'shoe']
  status, content_type, page = _request(service['url'] + '/')
  assert status == 200 and content_type.startswith('text/html') and b'/api/search' in page
  for path in ('/thumb/12', '/thumb/../../etc/passwd', '/thumb/%2e%2e%2findex.json',
               '/index.json', '/static/../index.json'):
    status, _, body = _request(service['url'] + path)
    assert status == 404 and 'error' in json.loads(body), path


@pytest.mark.parametrize('case', ['text', 'truncated_jpeg', 'corrupt_png', 'bomb', 'empty'])
def test_service_rejects_bad_files_and_keeps_serving(service, bad_files, catalogue, case):
  data, words = bad_files[case]
  status, answer = _search(service, data)
  assert status == 400 and words in answer['error'] and '\n' not in answer['error'], answer
  with open(os.path.join(catalogue['dir'], 'p0_0.png'), 'rb') as f:
    assert _search(service, f.read())[0] == 200


# A parameter that is wrong in itself is 422 and names the field; a box outside the photo is
# only found once the photo is decoded (400).
@pytest.mark.parametrize('params, status, field, words', [
    ({'box': '50,0,20,20'}, 400, None, 'outside'),
    ({'box': '-1,0,10,10'}, 400, None, 'outside'),
    ({'box': '0,0,0,10'}, 400, None, 'zero size'),
    ({'box': '1,2,3'}, 422, 'box', 'four numbers'),
    ({'category': 'hats'}, 422, 'category', "unknown category 'hats'"),
    ({'k': '0'}, 422, 'k', 'k must be'),
    ({'k': '\u00b2'}, 422, 'k', 'k must be'),
    ({'k': '101'}, 422, 'k', 'k must be'),
    ({'colour': 'red'}, 422, 'colour', 'unknown parameter'),
])
def test_service_rejects_bad_requests(service, make_image, params, status, field, words):
  got, answer = _search(service, _png(make_image(2, 0, (40, 60))), **params)
  assert got == status and words in answer['error'] and answer.get('field') == field, answer
  assert '\n' not in answer['error']


def test_service_upload_limit(service):
  status, answer = _search(service, bytes(300_000))
  assert status == 413 and 'over the limit of 200,000 bytes' in answer['error']
  assert _request(service['url'] + '/api/info')[0] == 200


@pytest.mark.parametrize('case', ['text', 'truncated_jpeg', 'corrupt_png', 'bomb', 'empty'])
def test_cli_rejects_bad_files(index_dir, bad_files, tmp_path, capsys, case):
  data, words = bad_files[case]
  path = tmp_path / f'{case}.jpg'
  path.write_bytes(data)
  code = main(['query', '--index', index_dir, str(path), '--max-pixels', '1000000',
               '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and words in err, err
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('args, words', [
    (['--box', '60,0,10,10'], 'outside'),
    (['--box', '0,0,10,0'], 'zero size'),
    (['--category', 'hats'], "unknown category 'hats'"),
])
def test_cli_rejects_bad_boxes_and_categories(index_dir, catalogue, tmp_path, capsys, args, words):
  photo = os.path.join(catalogue['dir'], 'p0_0.png')
  code = main(['query', '--index', index_dir, photo, *args, '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_index_of_another_model_is_refused(index_dir, other_workdir, catalogue, tmp_path, capsys):
  photo = os.path.join(catalogue['dir'], 'p0_0.png')
  code = main(['query', '--index', index_dir, photo, '--workdir', other_workdir,
               '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and 'index was built by another model' in err and len(err.splitlines()) == 1
  code = main(['index', '--index', index_dir, '--workdir', other_workdir, '--catalogue',
               catalogue['csv_rest']])
  assert code == 2 and 'another model' in capsys.readouterr().err


def test_bad_catalogue_image_leaves_the_index_untouched(tmp_path, workdir, catalogue, capsys):
  path = str(tmp_path / 'index')
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue',
               catalogue['csv_rest']]) == 0
  before = items_text(path)
  bad = tmp_path / 'bad.csv'
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(20))
  bad.write_text('image,product_id,category\n'
                 f"{os.path.join(catalogue['dir'], 'p0_0.png')},sku-0,dress\nbroken.png,sku-9,shoe\n")
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue', str(bad)]) == 2
  assert 'broken.png' in capsys.readouterr().err
  assert items_text(path) == before


def test_command_line_exit_status_and_one_line(index_dir, tmp_path):
  """The real entry point: a bad photo ends `python -m fashion_jax.search` with status 2."""
  import subprocess
  import sys
  bad = tmp_path / 'photo.jpg'
  bad.write_bytes(b'GIF89a broken')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, '-m', 'fashion_jax.search', 'query', '--index', index_dir, str(bad),
       '--out', str(tmp_path / 'out')], cwd=repo, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=repo))
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines == [f'error: {bad}: not an image (unrecognised format)'], result.stderr
  assert not (tmp_path / 'out').exists()


def test_concurrent_requests_are_answered_each_with_its_own_results(service, catalogue):
  """Requests served at the same time (one thread each) each get their own answer."""
  from concurrent.futures import ThreadPoolExecutor
  searcher = service['searcher']
  jobs = []
  for product in range(6):
    with open(os.path.join(catalogue['dir'], f'p{product}_0.png'), 'rb') as f:
      data = f.read()
    jobs.append((data, ('dress', 'shoe', None)[product % 3], 2 + product % 3))
  with ThreadPoolExecutor(12) as pool:
    answers = list(pool.map(lambda job: _search(service, job[0], category=job[1], k=job[2]),
                            jobs * 2))
  for (data, category, k), (status, answer) in zip(jobs * 2, answers):
    assert status == 200, answer
    expected = searcher.search_crops([searcher.crop_of(data)], k=k, category=category)[0]
    assert [r['product_id'] for r in answer['results']] == [r['product_id'] for r in expected]
    assert [r['score'] for r in answer['results']] == pytest.approx(
        [r['score'] for r in expected], abs=1e-5)
