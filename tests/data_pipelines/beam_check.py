"""Builds a raw-download dataset on Apache Beam's DirectRunner and checks it against the plain
build of the same raw tree: every split record by record, the build report and split sizes.
"""

import json
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from built_splits import records
from data_pipelines import build, item_builds

# The direct runner's in-process engine, one worker: the fixtures are tiny, and the point is the
# Beam code path. `runner=DirectRunner` itself would first try to download the Prism runner
# (apache-beam >= 2.6x) and, offline, fall back to this same FnApiRunner; naming it keeps the
# test hermetic.
DIRECT_RUNNER = 'runner=FnApiRunner,direct_num_workers=1,direct_running_mode=in_memory'


def raw_and_data_dir(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """The fixture's raw tree (`<tmp>/raw`) and TFDS data_dir of a plain-built builder."""
  root = pathlib.Path(builder.data_dir).parents[2]
  return str(root.parent / 'raw'), str(root)


def _assert_equal(plain, beamed, where: str) -> None:
  if isinstance(plain, dict):
    assert sorted(plain) == sorted(beamed), where
    for key in plain:
      _assert_equal(plain[key], beamed[key], f'{where}.{key}')
  else:
    np.testing.assert_array_equal(plain, beamed, err_msg=where)


def build_on_beam_and_compare(plain: tfds.core.DatasetBuilder, name: str,
                              data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds `name` from the plain build's raw tree into `data_dir` with the project's build
  command on the DirectRunner; asserts both builds are identical; returns the Beam one."""
  raw, _ = raw_and_data_dir(plain)
  beamed = build.build(name, raw, data_dir, DIRECT_RUNNER)
  assert beamed.data_dir != plain.data_dir
  assert list(beamed.info.splits) == list(plain.info.splits)
  for split in plain.info.splits:
    plain_records, beam_records = records(plain, split), records(beamed, split)
    assert len(beam_records) == len(plain_records) > 0, split
    for i, (p, b) in enumerate(zip(plain_records, beam_records)):
      _assert_equal(p, b, f'{split}[{i}] item {p["item_id"]}')
  report = plain.info.metadata['build_report']
  assert report and beamed.info.metadata['build_report'] == report, (
      beamed.info.metadata['build_report'], report)
  with open(os.path.join(beamed.data_dir, item_builds.ItemBuilds.REPORT_FILE)) as f:
    assert json.load(f) == report
  # The work list handed to the workers is gone; the dataset folder holds what a plain build has.
  assert sorted(os.listdir(beamed.data_dir)) == sorted(os.listdir(plain.data_dir))
  return beamed
