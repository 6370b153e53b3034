"""The search service: a FastAPI app over a `Searcher`, served by uvicorn.

  GET  /                  the web page (static/index.html)
  GET  /api/info          {'images', 'products', 'categories', 'model', 'default_k', limits}
  POST /api/search        body: the encoded photo; query string: box=x,y,w,h, category=, k=
                          -> {'results': [{'product_id', 'category', 'score', 'thumb'}], ...}
  GET  /thumb/<row>       the index's thumbnail of catalogue row <row> (JPEG)
  GET  /healthz           the process is up;  GET /readyz: index and model loaded, compiled
  GET  /metrics           Prometheus metrics (telemetry.py)
  GET  /docs              the OpenAPI schema, interactive

Every error is JSON {'error': one line} (422 adds 'field'): 400 for a photo that cannot be
used, 422 for a bad parameter, 413 for an upload over the limit (counted while it arrives),
503 when more searches are in flight than configured. Searches run on one thread that owns
the devices (`batcher.py`). Files are read only from the index directory, and only those the
index lists.
"""

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import time

import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from fashion_jax.search import images as image_io
from fashion_jax.search import telemetry
from fashion_jax.search.batcher import Batcher, Busy
from fashion_jax.search.images import InputError

_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static', 'index.html')
_PARAMETERS = ('box', 'category', 'k')


@dataclasses.dataclass(frozen=True)
class Settings:
  """The service's limits; every one is a `serve` flag."""
  max_upload_bytes: int = 10 * 1024 * 1024
  default_k: int = 12
  max_k: int = 100
  max_in_flight: int = 64        # searches admitted at once; more are answered 503
  max_batch: int = 16            # queries embedded in one call (1: batching off)
  max_wait_ms: float = 5.0       # how long a query waits for others to batch with
  upload_timeout_s: float = 30.0  # a client that stalls mid-upload this long is dropped
  answer_timeout_s: float = 120.0


class _Refused(Exception):
  """An answer other than 200: status, one-line message, and the parameter at fault."""

  def __init__(self, status: int, message: str, field: str | None = None):
    super().__init__(message)
    self.status, self.field = status, field


def _one_line(text) -> str:
  return ' '.join(str(text).split())


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
  body = {'error': _one_line(message)}
  if field:
    body['field'] = field
  return JSONResponse(body, status_code=status, headers={'Cache-Control': 'no-store'})


async def _read_upload(request: Request, settings: Settings) -> bytes:
  """The body, refused with 413 as soon as it is known to exceed the limit."""
  limit = settings.max_upload_bytes
  declared = request.headers.get('content-length')
  if declared is not None and (not declared.isascii() or not declared.isdigit()):
    raise _Refused(400, 'invalid Content-Length')
  if declared is not None and int(declared) > limit:
    raise _Refused(413, f'upload of {int(declared):,} bytes is over the limit of {limit:,} bytes')
  chunks, size = [], 0
  stream = request.stream().__aiter__()
  while True:
    try:
      chunk = await asyncio.wait_for(stream.__anext__(), settings.upload_timeout_s)
    except StopAsyncIteration:
      break
    except asyncio.TimeoutError:
      raise _Refused(408, f'the upload stalled for {settings.upload_timeout_s:g} s') from None
    except ClientDisconnect:
      raise _Refused(400, 'the client disconnected during the upload') from None
    size += len(chunk)
    if size > limit:
      raise _Refused(413, f'upload of more than {limit:,} bytes is over the limit of '
                          f'{limit:,} bytes')
    chunks.append(chunk)
  return b''.join(chunks)


def create_app(searcher, settings: Settings = Settings(), *, warm_up: bool = True) -> FastAPI:
  """The service's app. With `warm_up`, the model and search are compiled at startup for every
  batch size the batcher can form (1, 2, 4, ... up to --max-batch; in the background:
  /healthz answers meanwhile, /readyz once done)."""
  # 'coming': searches admitted and not yet handed to the batcher (reading, decoding), which a
  # batch waits for; 'in_flight': all admitted searches.
  state = {'ready': not warm_up, 'in_flight': 0, 'coming': 0}

  def answer_batch(requests):
    if not all(request.get('warm_up') for request in requests):
      metrics.batch_size.observe(len(requests))
    return searcher.answer_crops(requests)

  batcher = Batcher(answer_batch, max_batch=settings.max_batch,
                    max_wait_s=settings.max_wait_ms / 1e3, max_queue=settings.max_in_flight,
                    coming=lambda: state['coming'])
  metrics = telemetry.ServiceMetrics(searcher, state, batcher.pending)

  async def lifespan(app):
    if warm_up:
      async def compile_first():
        # Each group is queued at once, so the batcher takes it as one batch: the model and
        # the search compile per power-of-two batch size.
        largest, size = min(settings.max_batch, settings.max_in_flight), 1
        while True:
          try:
            futures = [batcher.submit({'crop': _blank(searcher), 'k': 1, 'category': None,
                                       'warm_up': True}) for _ in range(size)]
          except Busy:  # early requests fill the queue: try again once it drains
            await asyncio.sleep(0.05)
            continue
          await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
          if size >= largest:
            break
          size = min(2 * size, largest)
        state['ready'] = True
      task = asyncio.create_task(compile_first())
    yield
    if warm_up:
      task.cancel()
    batcher.close()

  app = FastAPI(title='fashion_jax visual search', lifespan=lifespan,
                description='Street photo in, shop products out (docs/search.md).')
  app.state.batcher, app.state.settings, app.state.metrics = batcher, settings, metrics
  app.add_middleware(_Counted, metrics=metrics)

  @app.exception_handler(_Refused)
  async def refused(request, error: _Refused):
    return _error(error.status, str(error), error.field)

  @app.exception_handler(RequestValidationError)
  async def invalid(request, error: RequestValidationError):
    first = error.errors()[0]
    field = str(first['loc'][-1])
    if field == 'k':
      message = f"k must be a whole number from 1 to {settings.max_k}, got {first.get('input')!r}"
    else:
      message = f"{field}: {first['msg']} (got {first.get('input')!r})"
    return _error(422, message, field)

  @app.exception_handler(HTTPException)
  async def http_error(request, error: HTTPException):
    if error.status_code == 404:
      return _error(404, f'no such page: {request.url.path}')
    return _error(error.status_code, error.detail)

  @app.exception_handler(Exception)
  async def internal(request, error: Exception):
    return _error(500, f'internal error: {type(error).__name__}')

  @app.get('/', include_in_schema=False)
  @app.get('/index.html', include_in_schema=False)
  def page():
    return FileResponse(_PAGE, media_type='text/html; charset=utf-8',
                        headers={'Cache-Control': 'no-store'})

  @app.get('/healthz')
  def healthz():
    return {'status': 'ok'}

  @app.get('/readyz')
  def readyz():
    if not state['ready']:
      return _error(503, 'compiling the model; not ready yet')
    return {'status': 'ready'}

  @app.get('/metrics', include_in_schema=False)
  def prometheus():
    return Response(metrics.exposition(), media_type=telemetry.CONTENT_TYPE,
                    headers={'Cache-Control': 'no-store'})

  @app.get('/api/info')
  def info():
    index = searcher.latest_index
    return {'images': index.num_live, 'products': int(index.product_live.sum()),
            'categories': index.categories, 'default_k': settings.default_k,
            'max_k': settings.max_k, 'max_upload_bytes': settings.max_upload_bytes,
            'max_pixels': searcher.max_pixels, 'centroids': searcher.use_centroids,
            'backend': searcher.backend.name, 'batching': settings.max_batch > 1,
            'model': {key: index.meta['model'][key] for key in ('backbone', 'step')}}

  @app.get('/thumb/{row}', responses={200: {'content': {'image/jpeg': {}}}})
  def thumb(row: int):
    index = searcher.latest_index
    if not 0 <= row < len(index):
      raise _Refused(404, f'no catalogue row {row}')
    try:
      path = index.thumb_path(row)
    except InputError:
      raise _Refused(404, f'no thumbnail for row {row}') from None
    if not os.path.isfile(path):
      raise _Refused(404, f'the thumbnail of row {row} is missing from the index')
    return FileResponse(path, media_type='image/jpeg', headers={'Cache-Control': 'max-age=3600'})

  @app.post('/api/search', openapi_extra={'requestBody': {
      'required': True, 'content': {'application/octet-stream': {
          'schema': {'type': 'string', 'format': 'binary'}}}}})
  async def search(request: Request,
                   box: str | None = Query(None, description='x,y,w,h crop in pixels'),
                   category: str | None = Query(None, description='only this category'),
                   k: int | None = Query(None, ge=1, le=settings.max_k,
                                         description='products to return')):
    """The best products for the photo in the body (JPEG, PNG, WebP, ...)."""
    unknown = sorted(set(request.query_params) - set(_PARAMETERS))
    if unknown:
      raise _Refused(422, f'unknown parameter(s): {", ".join(unknown)}', unknown[0])
    if state['in_flight'] >= settings.max_in_flight:
      raise _Refused(503, f'the service is busy ({settings.max_in_flight} searches in '
                          'flight); retry shortly')
    state['in_flight'] += 1
    start = time.perf_counter()
    try:
      answer = await _search(request, box, category or None,
                             settings.default_k if k is None else k)
    finally:
      state['in_flight'] -= 1
    metrics.searched(time.perf_counter() - start, answer['timing_ms'])
    return answer

  async def _search(request, box_text, category, k):
    state['coming'] += 1
    try:
      crop, box, future, timing = await _submit(request, box_text, category, k)
    finally:
      state['coming'] -= 1
    try:
      answer = await asyncio.wait_for(asyncio.wrap_future(future), settings.answer_timeout_s)
    except asyncio.TimeoutError:
      future.cancel()
      raise _Refused(503, f'no answer within {settings.answer_timeout_s:g} s; retry') from None
    return {'results': [{'product_id': r['product_id'], 'category': r['category'],
                         'score': r['score'], 'thumb': f"/thumb/{r['row']}"}
                        for r in answer['results']],
            'box': list(box) if box else None, 'category': category,
            'crop_size': [int(crop.shape[1]), int(crop.shape[0])],
            'timing_ms': {**timing, **answer['timing_ms']}}

  def decode_and_prepare(data, box):
    """(crop, model input or None, ms resizing): the resize too where it needs no device."""
    crop = searcher.crop_of(data, box)
    start = time.perf_counter()
    prepared = searcher.model.prepare_on_host(crop)
    return crop, prepared, 1e3 * (time.perf_counter() - start)

  async def _submit(request, box_text, category, k):
    """Reads, decodes (and where it can, resizes) and queues one search: (crop, box, its
    future, {'decode': ms})."""
    try:
      box = image_io.parse_box(box_text)
    except InputError as error:
      raise _Refused(422, str(error), 'box') from None
    try:
      searcher.category_number(category)
    except InputError as error:
      raise _Refused(422, str(error), 'category') from None
    data = await _read_upload(request, settings)
    # The clock decode_and_prepare times the resize with: its interval lies inside this one,
    # so the decode's share is never negative.
    start = time.perf_counter()
    try:
      crop, prepared, resize_ms = await run_in_threadpool(decode_and_prepare, data, box)
    except InputError as error:
      raise _Refused(400, str(error)) from None
    decoded = time.perf_counter() - resize_ms / 1e3
    job = {'crop': crop, 'k': k, 'category': category}
    if prepared is not None:
      job.update(prepared=prepared, resize_ms=resize_ms)
    try:
      future = batcher.submit(job)
    except Busy as error:
      raise _Refused(503, str(error)) from None
    return crop, box, future, {'decode': round(1e3 * (decoded - start), 2)}

  return app


class _Counted:
  """ASGI middleware: counts each answered request by its route's pattern and status (500
  for an exception that escapes the app's handlers; 499, nginx's "client closed request", for
  a client that left before its answer, which then reaches no one)."""

  def __init__(self, app, metrics: telemetry.ServiceMetrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      await self.app(scope, receive, send)
      return
    status, started, left = 500, False, False

    async def send_noting_status(message):
      nonlocal status, started
      if message['type'] == 'http.response.start':
        status, started = message['status'], True
      await send(message)

    async def receive_noting_departure():
      # A disconnect once the answer has started is how a server says the exchange ended.
      nonlocal left
      message = await receive()
      left = left or (message['type'] == 'http.disconnect' and not started)
      return message

    try:
      await self.app(scope, receive_noting_departure, send_noting_status)
    finally:
      # The router names the matched route in the scope; unmatched paths share one label, so
      # that scanners cannot grow the metrics without bound.
      self.metrics.answered(getattr(scope.get('route'), 'path', 'other'), 499 if left else status)


def _blank(searcher) -> np.ndarray:
  height, width = searcher.model.image_size
  return np.zeros((height, width, 3), np.uint8)


class SearchServer:
  """The app on a bound socket: serve_forever() in any thread, shutdown() from another."""

  def __init__(self, app: FastAPI, *, host: str, port: int, quiet: bool):
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a keep-alive client waits ~40 ms per answer (Nagle against delayed ACKs).
    self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.socket.bind((host, port))
    self.socket.listen(256)
    self.server_address = self.socket.getsockname()
    self.app = app
    settings = app.state.settings
    self._server = uvicorn.Server(uvicorn.Config(
        app, log_level='warning' if quiet else 'info', access_log=not quiet,
        timeout_keep_alive=5, limit_concurrency=4 * settings.max_in_flight + 16,
        h11_max_incomplete_event_size=64 * 1024))
    # One access-log line per request (unless quiet); uvicorn's start-up and shut-down notices
    # are INFO records of its own that say nothing the 'serving ... on' line does not.
    logging.getLogger('uvicorn.error').setLevel(logging.WARNING)
    self._done = threading.Event()

  def serve_forever(self) -> None:
    try:
      self._server.run(sockets=[self.socket])
    finally:
      self._done.set()

  @property
  def started(self) -> bool:
    return self._server.started

  def shutdown(self) -> None:
    self._server.should_exit = True
    self._done.wait(timeout=30)

  def server_close(self) -> None:
    self.socket.close()


def make_server(searcher, *, host: str = '127.0.0.1', port: int = 8080, quiet: bool = False,
                warm_up: bool = True, **settings) -> SearchServer:
  """A bound, not yet serving, server (port 0 picks a free port: see server_address).
  `settings` are `Settings` fields (max_upload_bytes, default_k, max_batch, ...)."""
  return SearchServer(create_app(searcher, Settings(**settings), warm_up=warm_up), host=host,
                      port=port, quiet=quiet)
