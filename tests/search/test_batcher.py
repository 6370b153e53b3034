"""The batcher: batches of what arrives together, and no waiting for requests that are not coming."""

import threading
import time

from fashion_jax.search.batcher import Batcher


def _recording():
  batches = []

  def run(items):
    batches.append(list(items))
    return [item * 10 for item in items]

  return batches, run


def test_a_lone_item_does_not_wait_when_nothing_else_is_coming():
  batches, run = _recording()
  batcher = Batcher(run, max_batch=8, max_wait_s=2.0, coming=lambda: 0)
  try:
    start = time.monotonic()
    assert batcher.submit(3).result(timeout=10) == 30
    assert time.monotonic() - start < 1.0  # not the 2 s a batch may wait for company
  finally:
    batcher.close()
  assert batches == [[3]]


def test_a_batch_waits_for_items_on_their_way():
  batches, run = _recording()
  on_the_way = threading.Event()
  on_the_way.set()
  batcher = Batcher(run, max_batch=8, max_wait_s=5.0, coming=lambda: int(on_the_way.is_set()))
  try:
    first = batcher.submit(1)
    time.sleep(0.3)  # the second request is still being decoded
    second = batcher.submit(2)
    on_the_way.clear()
    assert (first.result(timeout=10), second.result(timeout=10)) == (10, 20)
  finally:
    batcher.close()
  assert batches == [[1, 2]]


def test_without_coming_a_batch_waits_its_time_for_company():
  batches, run = _recording()
  batcher = Batcher(run, max_batch=8, max_wait_s=0.5)
  try:
    start = time.monotonic()
    first = batcher.submit(1)
    assert first.result(timeout=10) == 10
    assert time.monotonic() - start >= 0.45
  finally:
    batcher.close()
  assert batches == [[1]]
