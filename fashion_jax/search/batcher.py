"""One thread owns the devices: requests queue up, and those arriving together run as one batch.

Concurrent searches are never run from several threads at once (XLA's CPU collectives abort
when many threads drive a sharded computation), and queries that arrive within `max_wait_s` of
each other are embedded in one call, so throughput grows with concurrency instead of queueing.
"""

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future


_POLL_S = 0.0005


class Busy(Exception):
  """The queue is full: the caller should answer 503 and let the client retry."""


class Batcher:
  """run(items) -> results, called from one worker thread on batches of submitted items.

  Args:
    run: list of items -> list of results, same order. A result that is an exception fails
      that item alone; an exception raised by `run` fails the whole batch.
    max_batch: the most items per call (1 switches batching off; calls stay serialised).
    max_wait_s: how long the first item of a batch waits for company.
    max_queue: the most items waiting; `submit` raises Busy beyond it.
    coming: () -> how many items are on their way (a service's requests still being read and
      decoded). When given, a batch waits for company only while some are: a lone request
      runs at once instead of waiting `max_wait_s` for nobody.
  """

  def __init__(self, run: Callable[[list], list], *, max_batch: int = 16,
               max_wait_s: float = 0.005, max_queue: int = 64,
               coming: Callable[[], int] | None = None):
    if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
      raise ValueError('max_batch and max_queue must be >= 1 and max_wait_s >= 0')
    self._run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
    self._coming = coming
    self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
    self._stopped = threading.Event()
    self.batches = 0  # calls of `run` so far, for tests and the info page
    self._thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
    self._thread.start()

  def submit(self, item) -> Future:
    """Queues `item`; the future holds its result. Raises Busy when the queue is full."""
    future: Future = Future()
    try:
      self._queue.put_nowait((item, future))
    except queue.Full:
      raise Busy(f'the service is busy ({self._queue.maxsize} requests waiting); '
                 'retry shortly') from None
    return future

  def pending(self) -> int:
    return self._queue.qsize()

  def _loop(self) -> None:
    while not self._stopped.is_set():
      try:
        first = self._queue.get(timeout=0.1)
      except queue.Empty:
        continue
      batch = [first]
      deadline = time.monotonic() + self.max_wait_s
      while len(batch) < self.max_batch:
        remaining = deadline - time.monotonic()
        if remaining > 0 and self._coming is not None and not self._coming():
          remaining = 0  # nothing else is on its way: waiting would only delay this batch
        try:
          # With `coming`, wait in short steps, to notice when the last one on its way fails.
          batch.append(self._queue.get_nowait() if remaining <= 0 else self._queue.get(
              timeout=remaining if self._coming is None else min(remaining, _POLL_S)))
        except queue.Empty:
          if remaining <= 0:
            break
      # A client that gave up (cancelled future) costs nothing more.
      batch = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
      if not batch:
        continue
      try:
        results = self._run([item for item, _ in batch])
        self.batches += 1
      except BaseException as error:  # noqa: BLE001 (reported to every waiting request)
        for _, future in batch:
          future.set_exception(error)
        continue
      for (_, future), result in zip(batch, results):
        if isinstance(result, BaseException):
          future.set_exception(result)
        else:
          future.set_result(result)

  def close(self) -> None:
    self._stopped.set()
    self._thread.join(timeout=5)
