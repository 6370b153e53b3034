"""Command line: `python -m fashion_jax.main --config configs/demo.py --workdir runs/demo`.

Override any config field with `--config.<field>=<value>`, e.g. `--config.train.batch_size=128`.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.datasets import DatasetMissingError
from fashion_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and evaluation reports.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.info('JAX %s: process %d of %d, %d local and %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, DatasetMissingError, FileNotFoundError) as e:
    # Config and data problems are the user's to fix: one line, no traceback.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
