"""Malformed input at every entry point: the cases once seen failing, then a deterministic fuzz.

Each entry point answers bad input with its one documented error and nothing else: the image
decoder, catalogue reader and index loader an InputError of one line; the service a 4xx JSON
{'error': one line} naming no server path; the command line exit status 2 and one line on
stderr; the weight readers a one-line ConversionError or ValueError. A 5xx, any other
exception, a second line or a hang fails. Mutations come from fixed seeds, so a failure
reproduces; the case's number and input are in the message.
"""

import io
import json
import os
import re
import shutil
import struct
import threading
import urllib.parse

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import fashion_jax
from fashion_jax import convert_weights
from fashion_jax.models import pretrained
from fashion_jax.search import engine, server
from fashion_jax.search import images as image_io
from fashion_jax.search import catalogue as search_catalogue
from fashion_jax.search import index as search_index
from fashion_jax.search.__main__ import main
from fashion_jax.search.images import InputError
from index_files import index_file

_FORMATS = ('PNG', 'JPEG', 'QOI', 'WEBP', 'GIF', 'BMP', 'TIFF')


def _mutate(rng, data: bytes) -> bytes:
  """One random damage to `data`: bit flips, a truncation, a span of random bytes, inserted
  NULs, a huge 32- or 64-bit value over a header field, random bytes only, or nothing."""
  data = bytearray(data)
  kind = rng.integers(7)
  if kind == 0:
    for bit in rng.integers(0, 8 * len(data), rng.integers(1, 9)):
      data[bit // 8] ^= 1 << (bit % 8)
  elif kind == 1:
    del data[rng.integers(len(data)):]
  elif kind == 2:
    start, size = rng.integers(len(data)), rng.integers(1, 33)
    data[start:start + size] = rng.bytes(size)
  elif kind == 3:
    start = rng.integers(len(data) + 1)
    data[start:start] = bytes(rng.integers(1, 9))
  elif kind == 4:
    start, size = rng.integers(min(len(data), 64)), (4, 8)[rng.integers(2)]
    huge = b'\xff' * (size - 1) + b'\x7f'  # the largest signed value, either byte order
    data[start:start + size] = huge if rng.integers(2) else huge[::-1]
  elif kind == 5:
    return rng.bytes(rng.integers(1, 2 * len(data) + 2))
  else:
    return b''
  return bytes(data)


_JSON_VALUES = (None, -1, 0, 2 ** 70, 1e308, True, '', 'x', '\n', [], {}, [1, 2, 3, 4], {'a': 1})


def _mutate_json(rng, value):
  """`value` with one member, at any depth, replaced by a value of another JSON type or
  removed: valid JSON whose content is wrong."""
  places = []

  def walk(node):
    children = (node.items() if isinstance(node, dict) else
                enumerate(node) if isinstance(node, list) else ())
    for key, child in children:
      places.append((node, key))
      walk(child)

  value = json.loads(json.dumps(value))
  walk(value)
  if not places:
    return _JSON_VALUES[rng.integers(len(_JSON_VALUES))]
  node, key = places[rng.integers(len(places))]
  if rng.integers(4) == 0:
    del node[key]
  else:
    node[key] = _JSON_VALUES[rng.integers(len(_JSON_VALUES))]
  return value


def _one_line_error(error: Exception, case) -> None:
  message = str(error)
  assert message and '\n' not in message and '\r' not in message, (case, message)


def _encoded(image: np.ndarray, fmt: str) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format=fmt)
  return out.getvalue()


def _within(seconds: float, function, *args):
  """`function(*args)`, failing the test if it has not returned after `seconds` (a read that
  waits for a FIFO's writer or never ends)."""
  result = {}

  def run():
    try:
      result['value'] = function(*args)
    except BaseException as error:  # pylint: disable=broad-except
      result['error'] = error

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f'{function.__name__}{args} still running after {seconds} s'
  if 'error' in result:
    raise result['error']
  return result['value']


def _exit_status(argv) -> int:
  try:
    return main(argv)
  except SystemExit as e:  # argparse's usage errors
    return e.code


def _cli_error(capfd, argv) -> str:
  """The one line a failed command leaves on stderr (a progress bar it erased aside)."""
  status = _within(60, _exit_status, argv)
  err = capfd.readouterr().err
  assert status == 2, (argv, status, err)
  assert err.count('\n') == 1 and err.endswith('\n'), (argv, err)
  line = err.rsplit('\r', 1)[-1]
  assert line.startswith('error: '), (argv, err)
  return line


@pytest.fixture(scope='module')
def searcher(index_dir, model):
  return engine.Searcher(search_index.SearchIndex(index_dir), model, max_pixels=1_000_000)


@pytest.fixture(scope='module')
def client(searcher):
  app = server.create_app(searcher, server.Settings(max_upload_bytes=200_000, default_k=4),
                          warm_up=False)
  with TestClient(app, raise_server_exceptions=False) as client:
    yield client


@pytest.fixture(scope='module')
def image_seeds(make_image):
  return {fmt: _encoded(make_image(3, 1, (24, 20)), fmt) for fmt in _FORMATS}


@pytest.fixture
def loaded_model(monkeypatch, model):
  """The command line's SearchModel is the session's model, loaded once: the fuzz is about
  the inputs, and loading a checkpoint per command would take most of its time."""
  from fashion_jax.search import model as search_model
  monkeypatch.setattr(model, 'batch_size', model.batch_size)
  monkeypatch.setattr(search_model, 'SearchModel', lambda *args, **kwargs: model)
  return model


# The cases seen failing.

@pytest.mark.parametrize('cut', [14, 20, 2775])  # PIL raised IndexError, IndexError, ValueError
def test_truncated_qoi_is_one_line_400_and_exit_2(client, index_dir, make_image, tmp_path,
                                                  capfd, cut):
  data = _encoded(make_image(0, 0, (40, 40)), 'QOI')[:cut]
  response = client.post('/api/search', content=data)
  assert response.status_code == 400, response.text
  assert 'truncated or corrupt' in response.json()['error']
  (tmp_path / 'photo.qoi').write_bytes(data)
  line = _cli_error(capfd, ['query', '--index', index_dir, str(tmp_path / 'photo.qoi'),
                            '--out', str(tmp_path / 'out')])
  assert 'truncated or corrupt' in line and not (tmp_path / 'out').exists()


@pytest.mark.usefixtures('loaded_model')
def test_devices_fifos_and_huge_files_are_refused_unread(index_dir, workdir, tmp_path, capfd):
  os.mkfifo(tmp_path / 'fifo.png')
  with open(tmp_path / 'sparse.png', 'wb') as f:
    f.truncate(1 << 40)  # a terabyte that takes no disk
  cases = {'/dev/zero': 'not a regular file', str(tmp_path / 'fifo.png'): 'not a regular file',
           str(tmp_path / 'sparse.png'): 'over the size limit'}
  for path, words in cases.items():
    with pytest.raises(InputError, match=re.escape(words)):
      _within(10, image_io.read, path)
    with pytest.raises(InputError, match=re.escape(words)):
      _within(10, search_catalogue.read_catalogue, path)
    assert words in _cli_error(capfd, ['query', '--index', index_dir, path, '--out',
                                       str(tmp_path / 'out')])
    new = ['index', '--workdir', workdir, '--index', str(tmp_path / 'new'), '--catalogue']
    assert words in _cli_error(capfd, new + [path])  # the catalogue itself
    (tmp_path / 'catalogue.csv').write_text(f'image,product_id\n{path},sku-1\n')
    assert words in _cli_error(capfd, new + [str(tmp_path / 'catalogue.csv')])  # one image
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'new' / 'index.json').exists()


_CSV_CASES = {
    'nul_byte': ('image,product_id,category\np0_0.png,sku\x00-0,dress\n', 'NUL'),
    'binary': (bytes(np.random.default_rng(0).integers(128, 256, 300, np.uint8)), 'not a UTF-8'),
    'empty': ('', 'empty'),
    'header_only': ('image,product_id,category\n', 'empty'),
    'partial_box_columns': ('image,product_id,category,x,y\np0_0.png,sku-0,dress,1,2\n',
                            'lacks the column(s) w, h'),
    'more_fields_than_header': ('image,product_id\np0_0.png,sku-0,dress\n', 'more fields'),
    'part_of_a_box_in_a_row': ('image,product_id,category,x,y,w,h\n'
                               'p0_0.png,sku-0,dress,1,2,30,\n', 'row 2 gives part of a box'),
    'misspelt_column': ('image,product_id,categroy\np0_0.png,sku-0,dress\n',
                        "column 'categroy' is not one this reads; did you mean 'category'?"),
    'misspelt_in_capitals': ('Image,Product_ID,CATEGROY\np0_0.png,sku-0,dress\n',
                             "column 'CATEGROY' is not one this reads; did you mean "
                             "'category'?"),
    'column_twice': ('image,product_id,Category,category \np0_0.png,sku-0,dress,top\n',
                     "the header names the column 'category' twice"),
}


def test_missing_image_files_are_named_before_anything_is_embedded(index_dir, workdir,
                                                                   catalogue, tmp_path, capfd):
  rows = ['image,product_id', 'p0_0.png,sku-0', 'gone_1.png,sku-1', 'p2_0.png,sku-2',
          'gone_2.png,sku-2']
  (tmp_path / 'shop.csv').write_text('\n'.join(rows) + '\n')
  new = tmp_path / 'new'
  line = _cli_error(capfd, ['index', '--workdir', workdir, '--index', str(new), '--catalogue',
                            str(tmp_path / 'shop.csv'), '--images-root', catalogue['dir']])
  gone = os.path.join(catalogue['dir'], 'gone_1.png')
  assert f'2 of the 4 images to index cannot be read: {gone} (No such file or directory)' in line
  assert line.rstrip().endswith('nothing was embedded')
  assert not new.exists()  # no half-made index folder
  # Adding to an index: only the images not in it yet count, and the index stays as it was.
  copy = tmp_path / 'copy'
  shutil.copytree(index_dir, copy)
  before = (copy / 'index.json').read_text()
  line = _cli_error(capfd, ['update', '--index', str(copy), '--catalogue',
                            str(tmp_path / 'shop.csv'), '--images-root', catalogue['dir']])
  assert '2 of the 4 images to index cannot be read' in line
  assert (copy / 'index.json').read_text() == before


def test_csv_columns_are_matched_whatever_their_case(catalogue, tmp_path):
  path = tmp_path / 'rows.csv'
  # As a spreadsheet writes it: a byte-order mark, capitals, spaces, CRLF line ends.
  path.write_bytes('\ufeffImage, Product_ID ,Category,X,Y,W,H,Title\r\n'
                   'p0_0.png,sku-0,dress,1,2,30,40,Red dress\r\n'.encode())
  (row,) = search_catalogue.read_catalogue(str(path), catalogue['dir'])
  assert (row['product_id'], row['category'], tuple(row['box'])) == ('sku-0', 'dress',
                                                                    (1, 2, 30, 40))
  assert row['image'] == os.path.join(catalogue['dir'], 'p0_0.png')


@pytest.mark.parametrize('case', sorted(_CSV_CASES))
def test_malformed_csv_is_one_line_exit_2(index_dir, workdir, catalogue, tmp_path, capfd, case):
  text, words = _CSV_CASES[case]
  path = tmp_path / 'rows.csv'
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_text(text)
  with pytest.raises(InputError, match=re.escape(words)):
    search_catalogue.read_catalogue(str(path), catalogue['dir'])
  assert words in _cli_error(capfd, ['index', '--workdir', workdir, '--index',
                                     str(tmp_path / 'new'), '--catalogue', str(path),
                                     '--images-root', catalogue['dir']])
  assert not (tmp_path / 'new' / 'index.json').exists()
  # The same file as queries (their CSV needs only an image column).
  assert words in _cli_error(capfd, ['query', '--index', index_dir, str(path), '--out',
                                     str(tmp_path / 'out')])


def _damage(path, how: str) -> None:
  """Removes or truncates the file, or writes `how` over it ('+...': appends it)."""
  if how == 'missing':
    os.remove(path)
  elif how == 'truncated':
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2])
  else:
    with open(path, 'a' if how.startswith('+') else 'w') as f:
      f.write(how.lstrip('+'))


_INDEX_CASES = {  # (file, or its role in index.json's 'files'; damage; words of the error)
    'index_json_corrupt': ('index.json', '{"format": 1, "mod', 'not valid JSON'),
    'index_json_missing': ('index.json', 'missing', 'not a search index'),
    'index_json_a_list': ('index.json', '[1, 2]', 'not a JSON object'),
    'embeddings_missing': ('embeddings', 'missing', '{} cannot be read'),
    'embeddings_truncated': ('embeddings', 'truncated', '{} cannot be read'),
    'items_missing': ('items', 'missing', '{} cannot be read'),
    'items_bad_line': ('items', '+{"image": oops\n', 'is not valid JSON'),
    'items_one_too_many': ('items', '+{"image": "a", "product_id": "p", "category": "", '
                           '"box": null, "thumb": "t"}\n', 'damaged index'),
    'items_wrong_type': ('items', '+[1]\n', 'not a JSON object'),
}


@pytest.mark.parametrize('recorded', [True, False], ids=['sizes_recorded', 'no_sizes'])
@pytest.mark.parametrize('case', sorted(_INDEX_CASES))
def test_damaged_index_is_one_line_exit_2(index_dir, catalogue, tmp_path, capfd, case, recorded):
  """With index.json's record of each file's size, a file of another size is named as damaged
  before it is parsed; without it (an index written before the record, or damage that keeps
  the size), the parsers find the damage."""
  name, how, words = _INDEX_CASES[case]
  damaged = tmp_path / 'index'
  shutil.copytree(index_dir, damaged)
  if not recorded:
    meta = json.loads((damaged / 'index.json').read_text())
    del meta['checksums'], meta['meta_sha256']
    (damaged / 'index.json').write_text(json.dumps(meta))
  if '.' not in name:
    name = index_file(damaged, name)
  words = words.format(name)
  if recorded and how != 'missing' and name != 'index.json':
    words = f'{name} has '
  _damage(damaged / name, how)
  with pytest.raises(InputError, match=re.escape(words)) as error:
    search_index.SearchIndex(str(damaged))
  _one_line_error(error.value, case)
  line = _cli_error(capfd, ['query', '--index', str(damaged),
                            os.path.join(catalogue['dir'], 'p0_0.png'), '--out',
                            str(tmp_path / 'out')])
  assert words in line


@pytest.mark.parametrize('field, value, words', [
    ('dtype', 'float64', 'dtype'), ('dim', 3, 'float32 [N, 3]'), ('categories', 'dress', 'list'),
    ('model', {'workdir': 'w'}, 'model.step (missing)'),
    ('centroids', True, 'names no centroids file'),
    ('format', 2, 'format 2 is not 1')])
def test_index_json_fields_are_checked(index_dir, tmp_path, field, value, words):
  damaged = tmp_path / 'index'
  shutil.copytree(index_dir, damaged)
  meta = json.loads((damaged / 'index.json').read_text())
  meta[field] = value
  # As a hand edit that also wrote the sha256 of the fields: each field's check names it.
  meta['meta_sha256'] = search_index.meta_digest(meta)
  (damaged / 'index.json').write_text(json.dumps(meta))
  with pytest.raises(InputError, match=re.escape(words)):
    search_index.SearchIndex(str(damaged))


def test_index_json_changed_after_it_was_written_is_refused_on_load(index_dir, tmp_path, capfd,
                                                                    catalogue):
  damaged = tmp_path / 'index'
  shutil.copytree(index_dir, damaged)
  meta = json.loads((damaged / 'index.json').read_text())
  meta['categories'] = [c + 'x' for c in meta['categories']]  # well-typed, but not as written
  (damaged / 'index.json').write_text(json.dumps(meta))
  words = 'index.json was changed after it was written'
  with pytest.raises(InputError, match=re.escape(words)) as error:
    search_index.SearchIndex(str(damaged))
  _one_line_error(error.value, 'edited')
  assert words in _cli_error(capfd, ['query', '--index', str(damaged),
                                     os.path.join(catalogue['dir'], 'p0_0.png'), '--out',
                                     str(tmp_path / 'out')])


def test_usage_mistakes_are_one_line(index_dir, capfd):
  for argv in (['query'], ['query', '--index', index_dir, 'x.png', '-k', 'many'],
               ['query', '--index', index_dir, 'x.png', '-k', '0'],
               ['serve', '--index', index_dir, '--port', '70000'], ['nonsense']):
    _cli_error(capfd, argv)
  # Backend settings out of range, refused before anything is read.
  new = ['index', '--workdir', 'w', '--index', 'i', '--catalogue', 'c.csv']
  for flag, value in (('--qdrant-shards', '0'), ('--qdrant-replicas', '-1'),
                      ('--faiss-refine', 'nan'), ('--faiss-refine', '0.5')):
    assert f'{flag} must be at least 1, got ' in _cli_error(capfd, new + [flag, value])


# The fuzz.

def test_fuzz_image_decoder(image_seeds, capfd):
  rng = np.random.default_rng(1)
  decoded = 0
  for case in range(280):
    fmt = _FORMATS[case % len(_FORMATS)]
    data = _mutate(rng, image_seeds[fmt])
    try:
      image = image_io.decode(data, max_pixels=1_000_000)
    except InputError as error:
      _one_line_error(error, (case, fmt))
    else:
      assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, (case, fmt)
      decoded += 1
  out, err = capfd.readouterr()
  assert not out and not err  # nothing printed by PIL's plugins or C libraries
  assert 0 < decoded < 280


def _random_text(rng) -> str:
  return rng.bytes(rng.integers(0, 24)).decode('latin-1')


_QUERY_VALUES = ('', '0', '1', '4', '-3', '101', '1e309', 'nan', 'inf', '0x10', '\u00b2',
                 '1,2,3,4', '0,0,10,10', '1,2,3', ',,,', 'nan,0,1,1', '1e308,1e308,1,1',
                 'dress', 'shoe', 'hats', '\x00', '\u2028', '..%2f..%2f', '9' * 5000)


def _random_query(rng) -> str:
  """box, category and k (and unknown names) with odd values, some of them bytes that are not
  UTF-8 once decoded."""
  parts = []
  for _ in range(rng.integers(0, 4)):
    key = ('box', 'category', 'k', 'colour')[rng.integers(4)]
    if rng.integers(5) == 0:
      key = _random_text(rng)
    value = (urllib.parse.quote_from_bytes(rng.bytes(rng.integers(1, 12)))
             if rng.integers(6) == 0 else urllib.parse.quote(
                 _QUERY_VALUES[rng.integers(len(_QUERY_VALUES))] if rng.integers(3)
                 else _random_text(rng), safe=''))
    parts.append(f"{urllib.parse.quote(key, safe='')}={value}")
  return '&'.join(parts)


def test_fuzz_http_service(client, image_seeds, index_dir, catalogue):
  rng = np.random.default_rng(2)
  server_paths = (index_dir, catalogue['dir'], os.path.dirname(fashion_jax.__file__),
                  'site-packages')
  seeds = [image_seeds[fmt] for fmt in ('PNG', 'JPEG', 'QOI', 'GIF')]
  statuses = {}
  for case in range(300):
    # Half damaged photos alone; half odd query strings, with a damaged photo or a whole one.
    query = _random_query(rng) if case % 2 else ''
    if case % 10 == 9:  # the other routes, with odd paths
      path = ('/thumb/' + urllib.parse.quote(_random_text(rng) or '-1') if case % 20 == 9 else
              '/' + urllib.parse.quote_from_bytes(rng.bytes(rng.integers(1, 12))))
      response = client.get(path)
      request = ('GET', path)
    else:
      body = seeds[rng.integers(len(seeds))]
      body = body if case % 4 == 1 else _mutate(rng, body)
      response = client.post('/api/search' + ('?' + query if query else ''), content=body)
      request = ('POST', query, body[:64])
    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert response.status_code < 500, (case, request, response.text)
    if response.status_code == 200 and request[0] == 'POST':
      assert isinstance(response.json()['results'], list), (case, request)
    elif response.status_code != 200:
      assert response.headers['content-type'] == 'application/json', (case, request)
      error = response.json()['error']
      assert isinstance(error, str) and '\n' not in error, (case, request, error)
      assert not any(path in error for path in server_paths), (case, request, error)
  assert statuses.get(200) and statuses.get(400) and statuses.get(422), statuses


def _catalogue_seeds(catalogue) -> dict[str, bytes]:
  rows = [{'image': r['image'], 'product_id': r['product_id'], 'category': r['category'],
           'box': [float(v) for v in r['box'].split(',')] if r['box'] else None}
          for r in catalogue['rows']]
  with open(catalogue['csv_first'], 'rb') as f:
    csv_bytes = f.read()
  return {'.csv': csv_bytes, '.json': json.dumps(rows).encode(),
          '.jsonl': ''.join(json.dumps(row) + '\n' for row in rows).encode()}


def test_fuzz_catalogue_reader(catalogue, tmp_path):
  rng = np.random.default_rng(3)
  seeds = _catalogue_seeds(catalogue)
  read = 0
  for case in range(240):
    suffix = ('.csv', '.json', '.jsonl')[case % 3]
    if suffix != '.csv' and rng.integers(2):
      rows = _mutate_json(rng, json.loads(seeds['.json']))
      data = (json.dumps(rows) if suffix == '.json' or not isinstance(rows, list) else
              ''.join(json.dumps(row) + '\n' for row in rows)).encode()
    else:
      data = _mutate(rng, seeds[suffix])
    path = tmp_path / f'catalogue{suffix}'
    path.write_bytes(data)
    try:
      entries = search_catalogue.read_catalogue(str(path), catalogue['dir'])
    except InputError as error:
      _one_line_error(error, (case, data[:200]))
    else:
      assert entries and all(isinstance(e['product_id'], str) for e in entries), case
      read += 1
  assert 0 < read < 240


def test_fuzz_index_loader(index_dir, model, tmp_path):
  rng = np.random.default_rng(4)
  copy = tmp_path / 'index'
  shutil.copytree(index_dir, copy)
  names = ('index.json', index_file(copy, 'items'), index_file(copy, 'embeddings'))
  originals = {name: (copy / name).read_bytes() for name in names}
  loaded = 0
  for case in range(240):
    name = names[case % 3]
    data = originals[name]
    if name == 'index.json' and rng.integers(2):
      data = json.dumps(_mutate_json(rng, json.loads(data))).encode()
    elif name == names[1] and rng.integers(2):
      lines = data.decode().splitlines()
      line = rng.integers(len(lines))
      lines[line] = json.dumps(_mutate_json(rng, json.loads(lines[line])))
      data = ('\n'.join(lines) + '\n').encode()
    elif name == names[2] and rng.integers(2):  # the header, where sizes are declared
      data = _mutate(rng, data[:128]) + data[128:]
    else:
      data = _mutate(rng, data)
    (copy / name).write_bytes(data)
    try:
      index = search_index.SearchIndex(str(copy))
      engine.Searcher(index, model)
    except InputError as error:
      _one_line_error(error, (case, name, data[:200]))
    else:
      loaded += 1
    (copy / name).write_bytes(originals[name])
  assert 0 < loaded < 240


def _query_csv(catalogue) -> bytes:
  folder = catalogue['dir']
  return (f'image,x,y,w,h,category\n{os.path.join(folder, "p5_1.jpg")},16,0,64,48,\n'
          f'{os.path.join(folder, "p4_0.png")},,,,,dress\n').encode()


@pytest.mark.usefixtures('loaded_model')
def test_fuzz_command_line(index_dir, workdir, catalogue, image_seeds, tmp_path, capfd):
  rng = np.random.default_rng(5)
  copy = str(tmp_path / 'index')
  shutil.copytree(index_dir, copy)
  catalogues = _catalogue_seeds(catalogue)
  os.mkfifo(tmp_path / 'fifo.png')
  with open(tmp_path / 'sparse.jpg', 'wb') as f:
    f.truncate(1 << 36)
  specials = ['/dev/zero', str(tmp_path / 'fifo.png'), str(tmp_path / 'sparse.jpg'),
              str(tmp_path / 'missing.png'), copy, os.path.join(copy, 'index.json')]
  flags = ['-k', '0', '-k', 'x', '--box', '1,2,3', '--box', '0,0,5,5', '--category', 'hats',
           '--category', 'dress', '--max-pixels', '-1', '--nope', '--out', '--index']
  statuses = {}
  for case in range(150):
    folder = tmp_path / f'case{case}'
    folder.mkdir()
    out = ['--out', str(folder / 'out')]
    kind = case % 6
    if kind == 0:
      fmt = _FORMATS[rng.integers(len(_FORMATS))]
      photo = folder / f'photo{(".png", ".jpg", ".qoi")[rng.integers(3)]}'
      photo.write_bytes(_mutate(rng, image_seeds[fmt]))
      argv = ['query', '--index', index_dir, str(photo), '--max-pixels', '1000000', *out]
    elif kind == 1:
      (folder / 'queries.csv').write_bytes(_mutate(rng, _query_csv(catalogue)))
      argv = ['query', '--index', index_dir, str(folder / 'queries.csv'), *out]
    elif kind in (2, 3):
      suffix = ('.csv', '.json', '.jsonl')[rng.integers(3)]
      (folder / f'catalogue{suffix}').write_bytes(_mutate(rng, catalogues[suffix]))
      argv = (['index', '--workdir', workdir, '--index', str(folder / 'new')] if kind == 2 else
              ['update', '--index', copy]) + [
                  '--catalogue', str(folder / f'catalogue{suffix}'), '--images-root',
                  catalogue['dir']]
    elif kind == 4:
      (folder / 'products.txt').write_bytes(_mutate(rng, b'sku-0\nsku-1\n'))
      argv = ['remove', '--index', copy, '--products-file', str(folder / 'products.txt')]
    else:
      special = specials[rng.integers(len(specials))]
      argv = (['query', '--index', index_dir, special, *out] if rng.integers(2) else
              ['index', '--workdir', workdir, '--index', str(folder / 'new'), '--catalogue',
               special])
    if rng.integers(4) == 0:
      start = rng.integers(0, len(flags) - 1)
      argv = argv + flags[start:start + rng.integers(1, 3)]
    status = _within(120, _exit_status, argv)
    err = capfd.readouterr().err
    statuses[status] = statuses.get(status, 0) + 1
    assert status in (0, 2), (case, argv, status, err)
    if status == 2:
      assert err.count('\n') == 1 and err.rsplit('\r', 1)[-1].startswith('error: '), (
          case, argv, err)
  assert statuses.get(0) and statuses.get(2), statuses


def test_fuzz_weight_readers(tmp_path):
  rng = np.random.default_rng(6)
  arrays = {'conv1.weight': np.ones((4, 3, 3, 3), np.float32), 'bn1.bias': np.zeros(4, np.float32)}
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for key, value in arrays.items():
    header[key] = {'dtype': 'F32', 'shape': list(value.shape),
                   'data_offsets': [offset, offset + value.nbytes]}
    offset += value.nbytes
  text = json.dumps(header).encode()
  npz = io.BytesIO()
  np.savez(npz, **{pretrained.ARCH_KEY: np.asarray('resnet18')}, **arrays)
  seeds = {'.safetensors': (struct.pack('<Q', len(text)) + text +
                            b''.join(v.tobytes() for v in arrays.values()),
                            convert_weights.read_safetensors),
           '.npz': (npz.getvalue(), pretrained.read_backbone_weights)}
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None:
    pth = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, pth)
    seeds['.pth'] = (pth.getvalue(), convert_weights.read_torch)
  read = 0
  for case in range(100 * len(seeds)):
    suffix = sorted(seeds)[case % len(seeds)]
    data, reader = seeds[suffix]
    path = tmp_path / f'weights{suffix}'
    path.write_bytes(_mutate(rng, data))
    try:
      tensors = reader(str(path))
    except ValueError as error:  # ConversionError is one
      _one_line_error(error, (case, suffix))
    else:
      read += 1
      tensors = tensors[1] if isinstance(tensors, tuple) else tensors
      assert all(isinstance(v, np.ndarray) for v in tensors.values()), case
  assert 0 < read < 100 * len(seeds)


def test_paths_ports_and_checkpoints_the_user_names_are_one_line(index_dir, workdir, catalogue,
                                                                   tmp_path, capfd):
  afile = tmp_path / 'notes.txt'
  afile.write_text('mine')
  photo = os.path.join(catalogue['dir'], os.listdir(catalogue['dir'])[0])
  # An output folder that is a file: named, and the file left as it was.
  assert f'cannot use {afile}' in _cli_error(
      capfd, ['query', '--index', index_dir, photo, '--out', str(afile)])
  assert f'cannot export to {afile}: it is a file' in _cli_error(
      capfd, ['export', '--workdir', workdir, '--out', str(afile), '--no-saved-model'])
  assert afile.read_text() == 'mine'
  # A checkpoint step the workdir does not have.
  assert 'no checkpoint of step 5 (saved: ' in _cli_error(
      capfd, ['export', '--workdir', workdir, '--step', '5', '--out', str(tmp_path / 'export'),
              '--no-saved-model'])
  # A port another program holds.
  import socket
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert f'cannot serve on 127.0.0.1:{port}: Address already in use' in _cli_error(
        capfd, ['serve', '--index', index_dir, '--port', str(port), '--host', '127.0.0.1'])


def test_adding_to_an_index_with_other_settings_is_refused(index_dir, workdir, catalogue, capfd):
  # The index was made float32 with the exact backend: settings chosen at creation are kept,
  # and asking for others is refused before anything is embedded, not silently ignored.
  add = ['index', '--workdir', workdir, '--index', index_dir, '--catalogue',
         catalogue['csv_first']]
  with open(os.path.join(index_dir, 'index.json')) as f:
    before = f.read()
  assert 'stores float32 embeddings, not float16' in _cli_error(capfd, add + ['--dtype',
                                                                             'float16'])
  assert "the exact backend has no setting 'nprobe'" in _cli_error(capfd, add + ['--nprobe', '8'])
  with open(os.path.join(index_dir, 'index.json')) as f:
    assert f.read() == before


@pytest.mark.parametrize('settings, words', [
    (['--faiss-factory', 'garbage'], "faiss factory 'garbage' for 64 dims: could not parse "
                                     'index string garbage'),
    (['--faiss-factory', 'IVF4096,Flat'], "faiss factory 'IVF4096,Flat' has 4096 lists, more "
                                          'than the '),
])
def test_faiss_settings_are_checked_before_any_image_is_read(workdir, catalogue, tmp_path, capfd,
                                                             settings, words):
  pytest.importorskip('faiss')
  new = tmp_path / 'new'
  assert words in _cli_error(capfd, ['index', '--workdir', workdir, '--index', str(new),
                                     '--catalogue', catalogue['csv_first'], '--backend', 'faiss',
                                     *settings])
  assert not (new / 'thumbs').exists() and not (new / 'index.json').exists()


@pytest.fixture(scope='module')
def faiss_index_dir(workdir, catalogue, tmp_path_factory):
  pytest.importorskip('faiss')
  path = str(tmp_path_factory.mktemp('faiss') / 'index')
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue',
               catalogue['csv_first'], '--backend', 'faiss']) == 0
  return path


@pytest.mark.parametrize('name, how', [
    ('faiss.index', 'truncated'), ('faiss.index', ''), ('faiss.index', 'zeros'),
    ('faiss_rows.npz', 'truncated'), ('faiss_rows.npz', ''), ('faiss_rows.npz', 'flipped')])
def test_damaged_faiss_files_are_one_line_exit_2(faiss_index_dir, catalogue, tmp_path, capfd,
                                                 name, how):
  damaged = tmp_path / 'index'
  shutil.copytree(faiss_index_dir, damaged)
  path = damaged / index_file(damaged, 'backend') / name
  data = path.read_bytes()
  if how in ('zeros', 'flipped'):
    middle = len(data) // 2
    data = data[:middle] + (bytes(64) if how == 'zeros' else bytes(
        b ^ 0xFF for b in data[middle:middle + 64])) + data[middle + 64:]
    if how == 'zeros':
      data = bytes(len(data))
  path.write_bytes(data if how else b'')
  if how == 'truncated':
    _damage(path, 'truncated')
  photo = os.path.join(catalogue['dir'], 'p0_0.png')
  for command in (['query', '--index', str(damaged), photo, '--out', str(tmp_path / 'out')],
                  ['remove', '--index', str(damaged), '--products', 'sku-0']):
    line = _cli_error(capfd, command)
    assert f'{name} cannot be read' in line or 'do not agree' in line, line


def test_a_damaged_thumbnail_leaves_the_query_and_its_picture(index_dir, catalogue, tmp_path,
                                                             capfd):
  copy = tmp_path / 'index'
  shutil.copytree(index_dir, copy)
  for thumb in (copy / 'thumbs').iterdir():
    thumb.write_bytes(bytes(100))
  out = tmp_path / 'out'
  assert main(['query', '--index', str(copy), os.path.join(catalogue['dir'], 'p0_0.png'),
               '--out', str(out)]) == 0
  with open(out / 'results.json') as f:
    assert json.load(f)['queries'][0]['results'][0]['product_id'] == 'sku-0'


def test_a_full_disk_while_indexing_is_one_line_and_leaves_the_index(index_dir, workdir,
                                                                     catalogue, tmp_path, capfd,
                                                                     monkeypatch):
  import errno
  copy = tmp_path / 'index'
  shutil.copytree(index_dir, copy)
  before = (copy / 'index.json').read_text()

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(image_io, 'thumbnail_bytes', no_space)
  (tmp_path / 'more.csv').write_text(
      'image,product_id\n' + os.path.join(catalogue['dir'], 'p0_1.jpg') + ',sku-new\n')
  line = _cli_error(capfd, ['index', '--workdir', workdir, '--index', str(copy), '--catalogue',
                            str(tmp_path / 'more.csv')])
  assert line.strip() == 'error: writing failed: No space left on device', line
  assert (copy / 'index.json').read_text() == before
