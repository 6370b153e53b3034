"""The service's Prometheus metrics, served at GET /metrics in the text exposition format.

  fashion_search_requests_total{route, status}   requests answered (route: the path pattern,
                                                 e.g. /api/search, /thumb/{row}; 'other' for
                                                 paths that match none; status 499 for a
                                                 client that left before its answer)
  fashion_search_seconds                         a successful search, from its arrival to its
                                                 answer (upload, decode, wait, embed, search)
  fashion_search_stage_seconds{stage}            its stages: decode, resize, embed and search
                                                 (embed and search: of the batch it ran in)
  fashion_search_batch_size                      queries per embedding call
  fashion_search_in_flight, _queued, _ready      admitted searches, those waiting for the
                                                 devices, and 1 once the model is compiled
  fashion_search_index_generation, _images,      the newest index generation loaded, and its
  _products                                      live images and products

Each app has a registry of its own, so several apps in one process (tests) do not mix.
"""

import prometheus_client
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# Seconds: a search on CPU takes tens to hundreds of ms, on an accelerator a few ms.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ('decode', 'resize', 'embed', 'search')


class ServiceMetrics:
  """The counters the app updates, and the gauges it reads when scraped.

  Args:
    searcher: the engine.Searcher (for the index's figures).
    state: the app's {'ready', 'in_flight', ...}.
    queued: () -> searches waiting for the devices.
  """

  def __init__(self, searcher, state: dict, queued):
    self.registry = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter(
        'fashion_search_requests', 'HTTP requests answered, by route pattern and status.',
        ['route', 'status'], registry=self.registry)
    self.seconds = prometheus_client.Histogram(
        'fashion_search_seconds', 'Successful searches, from arrival to answer.',
        buckets=_SECONDS, registry=self.registry)
    self.stage_seconds = prometheus_client.Histogram(
        'fashion_search_stage_seconds', "Successful searches' stages (embed and search: their "
        "batch's).", ['stage'], buckets=_SECONDS, registry=self.registry)
    self.batch_size = prometheus_client.Histogram(
        'fashion_search_batch_size', 'Queries per embedding call.', buckets=_BATCH_SIZES,
        registry=self.registry)
    self.registry.register(_Gauges(searcher, state, queued))

  def answered(self, route: str, status: int) -> None:
    self.requests.labels(route=route, status=str(status)).inc()

  def searched(self, seconds: float, timing_ms: dict) -> None:
    self.seconds.observe(seconds)
    for stage in STAGES:
      if stage in timing_ms:
        self.stage_seconds.labels(stage=stage).observe(timing_ms[stage] / 1e3)

  def exposition(self) -> bytes:
    return prometheus_client.generate_latest(self.registry)


class _Gauges:
  """Read at each scrape, from the live state (a custom collector: nothing to keep in step)."""

  def __init__(self, searcher, state: dict, queued):
    self._searcher, self._state, self._queued = searcher, state, queued

  def collect(self):
    index = self._searcher.latest_index
    figures = (
        ('in_flight', 'Searches admitted and not yet answered.', self._state['in_flight']),
        ('queued', 'Searches waiting for the devices.', self._queued()),
        ('ready', '1 once the model and search are compiled.', int(self._state['ready'])),
        ('index_generation', 'The newest index generation loaded.', index.generation),
        ('index_images', "Live images of that generation.", index.num_live),
        ('index_products', 'Live products of that generation.', int(index.product_live.sum())))
    for name, documentation, value in figures:
      yield GaugeMetricFamily(f'fashion_search_{name}', documentation, value=value)
