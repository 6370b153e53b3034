"""Builds a dataset from the user's own raw download, without TFDS's command line (which needs
apache-beam): `python -m data_pipelines.build street2shop --manual_dir=<raw root> [--data_dir=...]`.
"""

import importlib
import sys

import tensorflow_datasets as tfds
from absl import app, flags

from data_pipelines import datasets

FLAGS = flags.FLAGS
flags.DEFINE_string('manual_dir', None, 'Root of the raw download (see docs/datasets.md).')
flags.DEFINE_string('data_dir', None, "Where the built dataset goes (TFDS's default if unset).")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f'name one dataset: {", ".join(sorted(datasets.BUILDER_MODULES))}')
  name = argv[1]
  base = name.split('/')[0].split(':')[0]
  if base not in datasets.BUILDER_MODULES:
    print(f'error: unknown dataset {name!r}; choose one of '
          f'{", ".join(sorted(datasets.BUILDER_MODULES))}', file=sys.stderr)
    sys.exit(2)
  importlib.import_module(datasets.BUILDER_MODULES[base])
  builder = tfds.builder(name, data_dir=FLAGS.data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=FLAGS.manual_dir))
  print(f'built {name} in {builder.data_dir}')


if __name__ == '__main__':
  app.run(main)
