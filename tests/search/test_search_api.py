"""The service's production behaviour: health and readiness, OpenAPI, limits while reading,
admission control (503), batching, and hundreds of simultaneous clients."""

import contextlib
import http.client
import json
import os
import shutil
import socket
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from fashion_jax.search import engine, server
from fashion_jax.search import index as search_index


@contextlib.contextmanager
def _serving(searcher, **settings):
  httpd = server.make_server(searcher, port=0, quiet=True, **settings)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield httpd.server_address[1], httpd
  finally:
    httpd.shutdown()
    httpd.server_close()


def _call(port, method, path, body=None, headers=None, timeout=120):
  connection = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
  try:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.getheader('Content-Type'), response.read()
  finally:
    connection.close()


def _search(port, data, **params):
  query = urllib.parse.urlencode(params)
  status, _, body = _call(port, 'POST', '/api/search' + ('?' + query if query else ''), data)
  return status, json.loads(body)


def _photo(catalogue, product, variant=0):
  name = f'p{product}_{variant}.' + ('png' if variant == 0 else 'jpg')
  with open(os.path.join(catalogue['dir'], name), 'rb') as f:
    return f.read()


class _Gated:
  """The real searcher, whose batched answers wait until the gate opens (to hold requests in
  flight on purpose)."""

  def __init__(self, searcher):
    self._searcher = searcher
    self.gate = threading.Event()

  def __getattr__(self, name):
    return getattr(self._searcher, name)

  def answer_crops(self, requests):
    self.gate.wait(60)
    return self._searcher.answer_crops(requests)


@pytest.fixture(scope='module')
def searcher(index_dir, model):
  return engine.Searcher(search_index.SearchIndex(index_dir), model, max_pixels=1_000_000)


def test_health_readiness_and_openapi(searcher):
  gated = _Gated(searcher)
  with _serving(gated) as (port, _):
    assert _call(port, 'GET', '/healthz')[0] == 200
    status, _, body = _call(port, 'GET', '/readyz')
    assert status == 503 and 'not ready' in json.loads(body)['error']
    gated.gate.set()
    for _ in range(600):
      if _call(port, 'GET', '/readyz')[0] == 200:
        break
      threading.Event().wait(0.1)
    assert _call(port, 'GET', '/readyz')[0] == 200
    status, content_type, page = _call(port, 'GET', '/docs')
    assert status == 200 and content_type.startswith('text/html') and b'openapi' in page
    schema = json.loads(_call(port, 'GET', '/openapi.json')[2])
    k = {p['name']: p for p in schema['paths']['/api/search']['post']['parameters']}['k']
    assert k['schema']['anyOf'][0]['maximum'] == 100 and k['schema']['anyOf'][0]['minimum'] == 1
    assert {'/healthz', '/readyz', '/api/info', '/thumb/{row}'} <= set(schema['paths'])


def test_upload_limit_is_enforced_while_reading(searcher, catalogue):
  with _serving(searcher, max_upload_bytes=50_000) as (port, _):
    # Declared too large: refused before the body is read.
    status, _, body = _call(port, 'POST', '/api/search', bytes(60_000))
    assert status == 413 and 'over the limit of 50,000 bytes' in json.loads(body)['error']
    # Chunked, with no length: refused once the bytes received pass the limit.
    chunks = (bytes(8_000) for _ in range(20))  # http.client sends an iterable chunked
    status, _, body = _call(port, 'POST', '/api/search', chunks)
    assert status == 413 and 'over the limit' in json.loads(body)['error']
    status, answer = _search(port, _photo(catalogue, 2), k=1)
    assert status == 200 and answer['results'][0]['product_id'] == 'sku-2'


def test_other_methods_and_missing_thumbnails_are_json_errors(index_dir, model, tmp_path):
  copy = str(tmp_path / 'index')
  shutil.copytree(index_dir, copy)
  index = search_index.SearchIndex(copy)
  os.unlink(index.thumb_path(3))
  with _serving(engine.Searcher(index, model)) as (port, _):
    for method in ('PUT', 'DELETE', 'PATCH'):
      status, content_type, body = _call(port, method, '/api/search', b'x')
      assert status == 405 and content_type == 'application/json', method
      assert 'error' in json.loads(body)
    status, _, body = _call(port, 'GET', '/thumb/3')
    error = json.loads(body)['error']
    assert status == 404 and 'missing' in error and copy not in error and '/' not in error
    assert _call(port, 'GET', '/thumb/2')[0] == 200


def test_more_searches_than_admitted_are_answered_503(searcher, catalogue):
  gated = _Gated(searcher)
  data = _photo(catalogue, 1)
  with _serving(gated, max_in_flight=2, max_batch=1) as (port, _):
    with ThreadPoolExecutor(8) as pool:
      futures = [pool.submit(_search, port, data, k=2) for _ in range(8)]
      threading.Event().wait(2.0)  # all 8 have arrived; 2 are admitted and held
      gated.gate.set()
      answers = [f.result() for f in futures]
  statuses = sorted(status for status, _ in answers)
  assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
  for status, answer in answers:
    if status == 503:
      assert 'busy' in answer['error']
    else:
      assert answer['results'][0]['product_id'] == 'sku-1'


def test_batched_answers_equal_one_at_a_time(searcher, catalogue):
  jobs = [(_photo(catalogue, p, v), ('dress', 'shoe', None)[p % 3], 1 + (p + v) % 4)
          for p in range(6) for v in range(2)]
  expected = [searcher.search_crops([searcher.crop_of(data)], k=k, category=category)[0]
              for data, category, k in jobs]
  for max_batch in (1, 8):
    gated = _Gated(searcher)
    with _serving(gated, max_batch=max_batch, max_wait_ms=50) as (port, httpd):
      gated.gate.set()
      while _call(port, 'GET', '/readyz')[0] != 200:
        threading.Event().wait(0.05)
      before = httpd.app.state.batcher.batches
      gated.gate.clear()  # hold the first batch so the others queue up behind it
      with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_search, port, d, **({'category': c} if c else {}), k=k)
                   for d, c, k in jobs]
        threading.Event().wait(1.0)
        gated.gate.set()
        answers = [f.result() for f in futures]
      batches = httpd.app.state.batcher.batches - before
    for (status, answer), want in zip(answers, expected):
      assert status == 200, answer
      assert [r['product_id'] for r in answer['results']] == [r['product_id'] for r in want]
      assert [r['score'] for r in answer['results']] == pytest.approx(
          [r['score'] for r in want], abs=1e-5)
    if max_batch == 1:
      assert batches == len(jobs)
    else:
      assert batches < len(jobs), batches


def test_two_hundred_simultaneous_clients(searcher, catalogue):
  """Far past the 35-50 concurrent queries that once aborted the process: every request gets
  an answer (results or 503), and the service answers correctly afterwards."""
  data = _photo(catalogue, 4)
  with _serving(searcher, max_in_flight=64) as (port, _):
    barrier = threading.Barrier(200)

    def client(_):
      barrier.wait(30)
      return _search(port, data, k=3)

    with ThreadPoolExecutor(200) as pool:
      answers = list(pool.map(client, range(200)))
    statuses = [status for status, _ in answers]
    assert len(answers) == 200 and set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(200) >= 1
    for status, answer in answers:
      if status == 200:
        assert answer['results'][0]['product_id'] == 'sku-4'
    status, answer = _search(port, _photo(catalogue, 0), k=2)
    assert status == 200 and answer['results'][0]['product_id'] == 'sku-0'


def test_prometheus_metrics_count_what_happened(searcher, catalogue):
  from prometheus_client.parser import text_string_to_metric_families
  with _serving(searcher) as (port, _):
    for _ in range(600):
      if _call(port, 'GET', '/readyz')[0] == 200:
        break
      threading.Event().wait(0.1)
    for product in (1, 2, 3):
      assert _search(port, _photo(catalogue, product), k=2)[0] == 200
    assert _search(port, _photo(catalogue, 1), k=0)[0] == 422
    assert _call(port, 'GET', '/thumb/2')[0] == 200
    assert _call(port, 'GET', '/no/such/page')[0] == 404
    # A client that leaves during its upload: counted as 499, not as the 400 no one receives.
    with socket.create_connection(('127.0.0.1', port)) as client:
      client.sendall(b'POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n'
                     + _photo(catalogue, 1)[:1000])
    for _ in range(100):
      status, content_type, body = _call(port, 'GET', '/metrics')
      if b'status="499"' in body:
        break
      threading.Event().wait(0.1)
  assert status == 200 and content_type.startswith('text/plain')
  samples = {}
  for family in text_string_to_metric_families(body.decode()):
    for sample in family.samples:
      samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

  def value(name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]

  assert value('fashion_search_requests_total', route='/api/search', status='200') == 3
  assert value('fashion_search_requests_total', route='/api/search', status='422') == 1
  assert value('fashion_search_requests_total', route='/thumb/{row}', status='200') == 1
  assert value('fashion_search_requests_total', route='other', status='404') == 1
  assert value('fashion_search_requests_total', route='/api/search', status='499') == 1
  assert ('fashion_search_requests_total', (('route', '/api/search'), ('status', '400'))) \
      not in samples
  assert value('fashion_search_seconds_count') == 3
  for stage in ('decode', 'resize', 'embed', 'search'):
    assert value('fashion_search_stage_seconds_count', stage=stage) == 3
    assert value('fashion_search_stage_seconds_sum', stage=stage) >= 0  # never negative
  assert value('fashion_search_seconds_sum') > 0
  # The searches' own batches, not the start-up compilation's.
  assert value('fashion_search_batch_size_sum') == 3
  assert value('fashion_search_ready') == 1 and value('fashion_search_in_flight') == 0
  assert value('fashion_search_index_images') == searcher.index.num_live
  assert value('fashion_search_index_generation') == searcher.index.generation
