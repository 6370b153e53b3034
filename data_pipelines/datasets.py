"""Finds a dataset's TFDS builder by name and makes sure it is prepared before anything compiles.

Procedurally generated datasets are prepared on first use; real ones must be built by the user
from their own download, and a missing one fails with a message saying how.
"""

import contextlib
import importlib
import io
import os
import sys

import tensorflow_datasets as tfds

# Project builders, imported on demand so that TFDS can find them by name.
BUILDER_MODULES = {
    'fashion_synth': 'data_pipelines.fashion_synth.fashion_synth_dataset_builder',
    'street2shop': 'data_pipelines.street2shop.street2shop_dataset_builder',
    'deepfashion_consumer2shop':
        'data_pipelines.deepfashion_consumer2shop.deepfashion_consumer2shop_dataset_builder',
    'deepfashion_inshop': 'data_pipelines.deepfashion_inshop.deepfashion_inshop_dataset_builder',
}
# Generated from a seed, no download: safe to prepare automatically.
_GENERATED = frozenset({'fashion_synth'})
# Real datasets need the user's raw download (see docs/datasets.md).
_RAW_DATASETS = {
    'street2shop': 'Exact Street2Shop (meta/json + downloaded photos)',
    'deepfashion_consumer2shop': 'DeepFashion Consumer-to-shop (img/ + Anno/ + Eval/)',
    'deepfashion_inshop': 'DeepFashion In-shop (img/ + Anno/ + Eval/)',
}


class DatasetMissingError(RuntimeError):
  """The named dataset is unknown or not prepared in the data directory."""


def _base_name(name: str) -> str:
  return name.split('/')[0].split(':')[0]


def _check_data_dir(data_dir: str) -> None:
  """DatasetMissingError when a file stands where data_dir or one of its parents would be (TFDS
  fails deep inside, creating it). Paths of other filesystems (gs://...) never exist here."""
  path = os.path.abspath(os.path.expanduser(data_dir))
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise DatasetMissingError(f'data_dir {data_dir!r} is not a directory: {path} is a file')


def make_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """tfds.builder(name), the project's builders registered first; an unknown builder config
  ('street2shop/max2000') raises DatasetMissingError naming the configs there are, and so does a
  data_dir under a file."""
  base = _base_name(name)
  if data_dir:
    _check_data_dir(data_dir)
  if base in BUILDER_MODULES:
    importlib.import_module(BUILDER_MODULES[base])
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise
  except AssertionError as e:  # TFDS asserts a version it does not have ('name:9.9.9')
    raise DatasetMissingError(f'dataset {name!r}: ' + ' '.join(str(e).split())[:300]) from None
  except ValueError:
    config = name.split(':')[0].split('/')[1] if '/' in name else None
    known = tfds.builder_cls(base).BUILDER_CONFIGS if base in BUILDER_MODULES else None
    configs = [c.name for c in known or []]
    if config is None or config in configs:
      raise
    raise DatasetMissingError(f'dataset {base!r} has no config {config!r}; choose one of '
                              f'{", ".join(configs) or "(none)"}') from None


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared builder for `name` ('fashion_synth/demo', 'street2shop', ...).

  Raises DatasetMissingError with a one-line explanation and the command that prepares it.
  """
  base = _base_name(name)
  try:
    builder = make_builder(name, data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    if base in _RAW_DATASETS:
      raise DatasetMissingError(
          f'dataset {name!r} ({_RAW_DATASETS[base]}) has no builder in this release') from e
    raise DatasetMissingError(f'unknown dataset {name!r}: no TFDS builder has this name') from e
  if not builder.is_prepared():
    if base in _GENERATED:
      _generate(name, builder)
    else:
      raise DatasetMissingError(
          f'dataset {name!r} ({_RAW_DATASETS.get(base, "a real dataset")}) is not built in '
          f'{builder.data_dir}: download it yourself, then `{build_command(base, data_dir)}` '
          f'(docs/datasets.md)')
  return builder


def _generate(name: str, builder: tfds.core.DatasetBuilder) -> None:
  """Writes a generated dataset, saying so in one line: TFDS's own account ("Downloading and
  preparing dataset Unknown size ...", a bar per split and shard) reads as a download."""
  print(f'{name}: generating the dataset (once) into {builder.data_dir}', file=sys.stderr,
        flush=True)
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
  finally:
    tfds.enable_progress_bar()


def decoders() -> dict:
  """TFDS decoders that leave each image encoded, so that any split reads:
  `tfds.load(name, split=..., data_dir=..., decoders=datasets.decoders())`.

  An item's images differ in size, and TFDS decodes a Sequence of images into one stacked
  tensor, which fails on them ('Incompatible shapes during merge'). With these, `images/image`
  is an [N] tf.string of JPEG bytes, each decoded on its own (tf.io.decode_jpeg, PIL).
  """
  return {'images': {'image': tfds.decode.SkipDecoding()}}


def build_command(base: str, data_dir: str | None) -> str:
  """The command that builds `base` from the user's raw download."""
  target = f' --data_dir={data_dir}' if data_dir else ''
  return f'python -m data_pipelines.build {base} --manual_dir=<raw root>{target}'
