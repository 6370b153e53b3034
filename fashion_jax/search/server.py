"""The search service: one process, standard library HTTP, loopback by default.

  GET  /                  the web page (static/index.html)
  GET  /api/info          {'images', 'products', 'categories', 'model', 'default_k', limits}
  POST /api/search        body: the encoded photo; query string: box=x,y,w,h, category=, k=
                          -> {'results': [{'product_id', 'category', 'score', 'thumb'}], ...}
  GET  /thumb/<row>       the index's thumbnail of catalogue row <row> (JPEG)

Bad input is answered 400 with {'error': one line}; an upload over the limit 413; the service
keeps serving. Files are read only from the index directory, and only those the index lists.
"""

import json
import os
import re
import sys
import time
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fashion_jax.search import images as image_io
from fashion_jax.search.images import InputError

_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static', 'index.html')
_THUMB = re.compile(r'^/thumb/(\d{1,12})$')
_MAX_K = 100


class _UploadTooLarge(Exception):
  pass


class _Handler(BaseHTTPRequestHandler):
  server_version = 'fashion-jax-search'
  protocol_version = 'HTTP/1.1'

  # -- plumbing -------------------------------------------------------------------------------
  def log_message(self, format, *args):  # noqa: A002 (the base class's name)
    if not self.server.quiet:
      sys.stderr.write(f'{self.address_string()} {format % args}\n')

  def _send(self, status: int, body: bytes, content_type: str, *, cache: bool = False) -> None:
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.send_header('X-Content-Type-Options', 'nosniff')
    self.send_header('Cache-Control', 'max-age=3600' if cache else 'no-store')
    if self.close_connection:
      self.send_header('Connection', 'close')
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _json(self, status: int, payload: dict) -> None:
    self._send(status, json.dumps(payload).encode(), 'application/json')

  def _error(self, status: int, message: str) -> None:
    self._json(status, {'error': ' '.join(str(message).split())})

  def _body(self) -> bytes:
    limit = self.server.max_upload_bytes
    if self.headers.get('Transfer-Encoding'):
      self.close_connection = True
      raise InputError('send the photo with a Content-Length (no chunked transfer)')
    try:
      length = int(self.headers.get('Content-Length', ''))
    except ValueError:
      self.close_connection = True
      raise InputError('missing or invalid Content-Length') from None
    if length < 0:
      self.close_connection = True
      raise InputError('missing or invalid Content-Length')
    if length > limit:
      # Drop a moderate excess so the client reads the answer; close on anything bigger.
      if length <= 4 * limit:
        self.rfile.read(length)
      else:
        self.close_connection = True
      raise _UploadTooLarge(f'upload of {length:,} bytes is over the limit of {limit:,} bytes')
    return self.rfile.read(length)

  def _guarded(self, handler) -> None:
    try:
      handler()
    except InputError as e:
      self._error(HTTPStatus.BAD_REQUEST, str(e))
    except _UploadTooLarge as e:
      self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e))
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    except Exception as e:  # noqa: BLE001 (one bad request must not stop the service)
      traceback.print_exc()
      self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f'internal error: {type(e).__name__}: {e}')

  # -- routes ---------------------------------------------------------------------------------
  def do_GET(self):  # noqa: N802 (the base class's name)
    self._guarded(self._get)

  def do_HEAD(self):  # noqa: N802
    self._guarded(self._get)

  def do_POST(self):  # noqa: N802
    self._guarded(self._post)

  def _get(self):
    path = urllib.parse.urlsplit(self.path).path
    if path in ('/', '/index.html'):
      with open(_PAGE, 'rb') as f:
        self._send(HTTPStatus.OK, f.read(), 'text/html; charset=utf-8')
    elif path == '/api/info':
      searcher = self.server.searcher
      self._json(HTTPStatus.OK, {
          'images': len(searcher.index), 'products': searcher.num_products,
          'categories': searcher.index.categories, 'default_k': self.server.default_k,
          'max_k': _MAX_K, 'max_upload_bytes': self.server.max_upload_bytes,
          'max_pixels': searcher.max_pixels, 'centroids': searcher.use_centroids,
          'model': {key: searcher.index.meta['model'][key] for key in ('backbone', 'step')}})
    elif (match := _THUMB.match(path)) is not None:
      row = int(match.group(1))
      searcher = self.server.searcher
      if row >= len(searcher.index):
        self._error(HTTPStatus.NOT_FOUND, f'no catalogue row {row}')
        return
      with open(searcher.index.thumb_path(row), 'rb') as f:
        self._send(HTTPStatus.OK, f.read(), 'image/jpeg', cache=True)
    else:
      self._error(HTTPStatus.NOT_FOUND, f'no such page: {path}')

  def _post(self):
    parts = urllib.parse.urlsplit(self.path)
    if parts.path != '/api/search':
      self._body()
      self._error(HTTPStatus.NOT_FOUND, f'no such endpoint: {parts.path}')
      return
    data = self._body()
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {'box', 'category', 'k'}
    if unknown:
      raise InputError(f'unknown parameter(s): {", ".join(sorted(unknown))}')
    get = lambda name: query.get(name, [''])[-1]
    k_text = get('k') or str(self.server.default_k)
    if not k_text.isdigit() or not 1 <= int(k_text) <= _MAX_K:
      raise InputError(f'k must be a whole number from 1 to {_MAX_K}, got {k_text!r}')
    searcher = self.server.searcher
    category = get('category') or None
    searcher.category_number(category)  # an unknown category fails before any work
    box = image_io.parse_box(get('box'))
    start = time.perf_counter()
    crop = searcher.crop_of(data, box)
    decoded = time.perf_counter()
    embedding = searcher.model.embed_crops([crop])
    embedded = time.perf_counter()
    results = searcher.search_embeddings(embedding, k=int(k_text), category=category)[0]
    searched = time.perf_counter()
    self._json(HTTPStatus.OK, {
        'results': [{'product_id': r['product_id'], 'category': r['category'],
                     'score': r['score'], 'thumb': f"/thumb/{r['row']}"} for r in results],
        'box': list(box) if box else None, 'category': category,
        'crop_size': [int(crop.shape[1]), int(crop.shape[0])],
        'timing_ms': {'decode': round(1e3 * (decoded - start), 2),
                      'embed': round(1e3 * (embedded - decoded), 2),
                      'search': round(1e3 * (searched - embedded), 2)}})


class SearchServer(ThreadingHTTPServer):
  daemon_threads = True
  # Many clients may connect at once (the benchmark uses 8).
  request_queue_size = 64


def make_server(searcher, *, host: str = '127.0.0.1', port: int = 8080,
                max_upload_bytes: int = 10 * 1024 * 1024, default_k: int = 12,
                quiet: bool = False) -> SearchServer:
  """A bound, not yet serving, server (port 0 picks a free port: see server_address)."""
  server = SearchServer((host, port), _Handler)
  server.searcher = searcher
  server.max_upload_bytes = max_upload_bytes
  server.default_k = default_k
  server.quiet = quiet
  return server
