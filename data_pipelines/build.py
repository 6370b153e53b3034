"""Builds a dataset from the user's own raw download:
`python -m data_pipelines.build street2shop --manual_dir=<raw root> [--data_dir=...]`, or on
Apache Beam (needs the `beam` extra) with `--beam_pipeline_options=runner=DirectRunner,...`
(comma-separated Beam flags without their dashes, as for `tfds build`).

The datasets, each with its configs (NAME/CONFIG; the first is the default):
  street2shop                 default, max1024 (crops at most 1024 px), resized320
  deepfashion_consumer2shop   default, highres (from img_highres/), resized320
  deepfashion_inshop          default, resized320
  fashion_synth               tiny, demo (synthetic; generated, no --manual_dir)
resized320 stores the crops already resized to the training size (docs/datasets.md).
"""

import os
import sys

from fashion_jax import console

if __name__ == '__main__':
  console.quiet_start(sys.argv)  # before TensorFlow loads

import tensorflow_datasets as tfds  # noqa: E402
from absl import app, flags  # noqa: E402

from data_pipelines import datasets  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('manual_dir', None, 'Root of the raw download (see docs/datasets.md).')
flags.DEFINE_string('data_dir', None, "Where the built dataset goes (TFDS's default if unset).")
flags.DEFINE_string('beam_pipeline_options', None,
                    'Build on Apache Beam with these comma-separated pipeline options, e.g. '
                    '"runner=DirectRunner,direct_num_workers=2" (pip install ".[beam]").')


def beam_options(pipeline_options: str):
  """PipelineOptions from `key=value,key=value` (the `tfds build` syntax)."""
  try:
    from apache_beam.options import pipeline_options as beam_pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit('error: --beam_pipeline_options needs apache-beam: pip install '
                     '"fashion_jax[beam]"') from e
  return beam_pipeline_options.PipelineOptions(
      flags=[f'--{option}' for option in pipeline_options.split(',') if option])


def build(name: str, manual_dir: str | None, data_dir: str | None = None,
          pipeline_options: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds `name` from `manual_dir`, on Beam when `pipeline_options` is given."""
  base = name.split('/')[0].split(':')[0]
  if base not in datasets.BUILDER_MODULES:
    raise SystemExit(f'error: unknown dataset {name!r}; choose one of '
                     f'{", ".join(sorted(datasets.BUILDER_MODULES))}')
  try:
    builder = datasets.make_builder(name, data_dir)
  except datasets.DatasetMissingError as e:
    raise SystemExit(f'error: {e}') from None
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None) and not (
      manual_dir and os.path.isdir(manual_dir) and os.listdir(manual_dir)):
    where = ('no --manual_dir was given' if not manual_dir else
             f'--manual_dir {manual_dir} is not a folder' if not os.path.isdir(manual_dir) else
             f'--manual_dir {manual_dir} is empty')
    raise SystemExit(f'error: {name} is built from its raw download and {where}; pass '
                     '--manual_dir=<raw root> (docs/datasets.md)')
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if pipeline_options:
    config.beam_options = beam_options(pipeline_options)
  try:
    builder.download_and_prepare(download_config=config)
  except (FileNotFoundError, ValueError) as e:
    # The builders name the part of the raw download that is missing or malformed; a traceback
    # adds nothing.
    raise SystemExit(f'error: {e}') from None
  except AssertionError as e:
    # TFDS's own checks while writing: a split that came out empty, two records with one key.
    text = ' '.join(str(e).split())
    if 'No examples were yielded' in text:
      text = (f'{text[:200]}: the raw download gives this split no usable record (see its '
              'build report, docs/datasets.md)')
    raise SystemExit(f'error: {name}: {text[:400]}') from None
  return builder


def main(argv):
  console.set_verbosity()
  if len(argv) != 2:
    raise app.UsageError(f'name one dataset: {", ".join(sorted(datasets.BUILDER_MODULES))}')
  try:
    builder = build(argv[1], FLAGS.manual_dir, FLAGS.data_dir, FLAGS.beam_pipeline_options)
  except SystemExit as e:
    print(e, file=sys.stderr)
    sys.exit(2)
  print(f'built {argv[1]} in {builder.data_dir}')


def _parse_flags(argv: list[str]) -> list[str]:
  with console.help_exits_zero(argv):
    return app.parse_flags_with_usage(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
