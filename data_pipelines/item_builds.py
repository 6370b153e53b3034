"""How the raw-download builders turn their list of items into examples, with or without Apache
Beam, through one per-item function.

A builder plans its splits on the driver (reading the annotation files) into a work list: one
picklable element per item, holding everything its processing needs (file paths, boxes,
which photo's file faults it counts). `process(element)` then returns `((key, example) or None,
faults)` and touches no shared state, so:

- plain build (the default): the elements are processed one by one in a streamed generator and
  their faults added to the builder's FaultCounter;
- Beam build (the build is given Beam options or a runner, e.g. `tfds build ...
  --beam_pipeline_options=runner=DirectRunner`): the work list is written to a few files beside
  the build, and `_generate_examples` returns a beam.PTransform that reads them, spreads the
  items over the workers and runs the same `process` there. Workers cannot add to a Python
  counter of the driver, so each fault is a Beam metrics counter (namespace FAULT_NAMESPACE);
  once the pipeline has finished, TFDS hands its result to `_process_pipeline_result`, which
  adds the committed counter values to the builder's FaultCounter.

Either way the build report is written from that FaultCounter, so both builds report the same
counts for the same raw tree.
"""

import os
import pickle
from collections.abc import Callable, Iterator, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines.street2shop import raw_images

FAULT_NAMESPACE = 'build_faults'
WORK_DIR = 'beam_work'  # inside the build's temporary folder; removed when the build ends
ITEMS_PER_FILE = 1000

Process = Callable[[object], tuple[tuple[str, dict] | None, raw_images.FaultCounter]]


def _beam():
  return tfds.core.lazy_imports.apache_beam


def _read_work(path: str) -> list:
  with tf.io.gfile.GFile(path, 'rb') as f:
    return pickle.load(f)


def _process_on_worker(element, process: Process) -> Iterator[tuple[str, dict]]:
  example, faults = process(element)
  for reason, count in faults.items():
    if count:
      _beam().metrics.Metrics.counter(FAULT_NAMESPACE, reason).inc(int(count))
  if example is not None:
    yield example


def beam_fault_counts(pipeline_result) -> raw_images.FaultCounter:
  """The fault counters of a finished pipeline, summed over steps (committed values where the
  runner reports them, else attempted)."""
  beam = _beam()
  query = pipeline_result.metrics().query(
      beam.metrics.MetricsFilter().with_namespace(FAULT_NAMESPACE))
  counts = raw_images.FaultCounter()
  for counter in query['counters']:
    value = counter.committed if counter.committed is not None else counter.attempted
    counts[counter.key.metric.name] += int(value or 0)
  return counts


class ItemBuilds:
  """Mixin for a tfds.core.GeneratorBasedBuilder (put it first among the bases).

  The builder's `_split_generators` returns, per split, `self._generate_examples(split, work,
  process)`; faults found while planning go to `self._faults` directly.
  """

  REPORT_FILE = 'build_report.json'

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._faults = raw_images.FaultCounter()
    self._on_beam = download_config is not None and (
        download_config.beam_runner is not None or download_config.beam_options is not None)
    work_dir = os.path.join(self.data_dir, WORK_DIR)
    try:
      super()._download_and_prepare(dl_manager, download_config)
    finally:
      if tf.io.gfile.exists(work_dir):
        tf.io.gfile.rmtree(work_dir)
    self._faults.write(self, self.REPORT_FILE)

  def _process_pipeline_result(self, pipeline_result) -> None:
    super()._process_pipeline_result(pipeline_result)
    self._faults.update(beam_fault_counts(pipeline_result))

  def _generate_examples(self, split: str, work: Sequence, process: Process):
    """A generator of (key, example) for a plain build, a beam.PTransform for a Beam build."""
    if not self._on_beam:
      return self._examples_here(work, process)
    work_dir = os.path.join(self.data_dir, WORK_DIR)
    tf.io.gfile.makedirs(work_dir)
    paths = []
    for start in range(0, len(work), ITEMS_PER_FILE):
      paths.append(os.path.join(work_dir, f'{split}-{start // ITEMS_PER_FILE:05d}.pkl'))
      with tf.io.gfile.GFile(paths[-1], 'wb') as f:
        pickle.dump(list(work[start:start + ITEMS_PER_FILE]), f)
    beam = _beam()

    @beam.ptransform_fn
    def generate(pbegin):
      return (pbegin
              | 'WorkFiles' >> beam.Create(paths)
              | 'ReadWork' >> beam.FlatMap(_read_work)
              | 'SpreadItems' >> beam.Reshuffle()
              | 'Examples' >> beam.FlatMap(_process_on_worker, process=process))

    return generate()  # pylint: disable=no-value-for-parameter

  def _examples_here(self, work: Sequence, process: Process) -> Iterator[tuple[str, dict]]:
    for element in work:
      example, faults = process(element)
      self._faults.update(faults)
      if example is not None:
        yield example

