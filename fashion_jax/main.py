r"""Command line: `python -m fashion_jax.main --config configs/demo.py --workdir runs/demo`.

Override any config field with `--config.<field>=<value>`, e.g. `--config.train.batch_size=128`.
Evaluate the latest checkpoint of a workdir on another dataset (cross-domain evaluation):

  python -m fashion_jax.main --config configs/deepfashion.py --workdir runs/df --mode=evaluate \
      --config.eval.dataset=street2shop --config.eval.data_dir=/data/tfds

The reports then go to runs/df/eval/street2shop/.

The console shows the run's setup, a progress bar and a line per evaluation; --verbosity=0 adds
the libraries' INFO records (absl, orbax, TensorFlow, clu, jax), --verbosity=1 their DEBUG ones.
"""

import os
import re
import signal
import sys

from fashion_jax import console

if __name__ == '__main__':
  console.quiet_start(sys.argv)  # before TensorFlow and JAX load

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from ml_collections.config_flags.config_flags import ConfigFileFlagParser  # noqa: E402

from data_pipelines.datasets import DatasetMissingError  # noqa: E402
from fashion_jax import checkpointing, configlib, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and evaluation reports.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() (multi-host: TPU pod slices, GPU clusters). '
                  'On TPU VMs and SLURM/Kubernetes GPU jobs --coordinator_address, '
                  '--num_processes and --process_id are detected.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (with --distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --distributed).')
flags.DEFINE_integer('process_id', None, 'This process (with --distributed).')
flags.DEFINE_enum('mode', None, configlib.MODES,
                  'Overrides config.mode: evaluate runs no training step, only an evaluation of '
                  "the workdir's latest checkpoint.")
flags.mark_flags_as_required(['config', 'workdir'])


def _initialize_distributed():
  if FLAGS.num_processes and FLAGS.num_processes > 1:
    # Cross-process collectives on CPU devices need an implementation; GPU/TPU ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def _config_arguments(argv: list[str]) -> tuple[str | None, list[str]]:
  """The config file argument and the overridden field names, found as ml_collections finds them
  (config_flags._ConfigFlag): `--config[=]<file>`, `--[no]config.<field>[=<value>]`."""
  path, names = None, []
  for i, arg in enumerate(argv):
    if match := re.match(r'-{1,2}config(=|$)', arg):
      path = arg[match.end():] if match.group(1) else next(iter(argv[i + 1:]), None)
    elif match := re.match(r'-{1,2}(?:no)?config\.([^=]+)', arg):
      names.append(match.group(1))
  return path, names


# The fields `--config.<field>=None` set to None, in the order given (the sweep repeats them).
NONE_OVERRIDES: list[str] = []


def _none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """argv without the overrides `--config.<field>=None` and `--config.<field> None`, and their
  fields: ml_collections would read the word as the string 'None', or refuse it for a number."""
  kept, fields, i = [], [], 0
  while i < len(argv):
    match = re.fullmatch(r'-{1,2}config\.([^=]+)(?:=(.*))?', argv[i], re.DOTALL)
    if match and match.group(2) == 'None':
      fields.append(match.group(1))
    elif match and match.group(2) is None and argv[i + 1:i + 2] == ['None']:
      fields.append(match.group(1))
      i += 1
    else:
      kept.append(argv[i])
    i += 1
  return kept, fields


def unexpected_arguments(argv: list[str]) -> str:
  """What absl leaves after the flags: words that are not options (absl's own answer is the
  whole usage text, exit status 1)."""
  return (f'unexpected arguments: {" ".join(argv[1:])} (options are --name=value; --help lists '
          'them)')


def exit_with(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with the config mistakes ml_collections reports as a traceback in one line
  (exit status 2): a config file that does not exist, an override naming no field of the config;
  and `--config.<field>=None`, which sets a field that may be None (model.pretrained) to None.
  """
  path, names = _config_arguments(argv[1:])
  file = path and path.split(':', 1)[0]  # after a colon: get_config's argument
  if file is not None and not os.path.isfile(file):
    exit_with(f'config file {file!r} does not exist')
  argv, nones = _none_overrides(argv)
  rest = _parse(argv, path, file, names)
  try:
    for name in nones:
      configlib.set_none(FLAGS.config, name)
  except ValueError as e:  # a field the config lacks, or one that has no None
    exit_with(str(e))
  NONE_OVERRIDES[:] = nones
  return rest


def _parse(argv, path, file, names):
  try:
    with console.help_exits_zero(argv):
      return FLAGS(argv)
  except flags.Error as e:
    # absl's own answer is "FATAL Flags parsing error", a hint about --helpshort and exit
    # status 1; a value of the wrong type (--config.train.batch_size=abc) is a bad value like
    # any other.
    text = str(e)
    if missing := re.search(r'Flag --(\w+) must have a value other than None', text):
      name = missing.group(1)
      exit_with(f'--{name} is required: {FLAGS[name].help[0].lower()}{FLAGS[name].help[1:]}')
    if 'Traceback (most recent call last)' in text:  # ml_collections quotes the config's own
      head = text.split('Error whilst parsing config file', 1)[0].rstrip(': ')
      text = f'{head}: {text.strip().splitlines()[-1].strip()}'
    exit_with(' '.join(text.split()))
  except Exception:  # noqa: BLE001 (an override naming no field, or the config file's own error)
    # ml_collections looks every override up in the loaded config. Load it again (only here, so
    # a config runs once in a good command) to name the field and the closest one it has, or
    # to say why the file itself does not load.
    try:
      config = ConfigFileFlagParser('config').parse(path)
    except SyntaxError as e:
      exit_with(f'config file {file!r} is not valid Python: {e.msg} at line {e.lineno}')
    except Exception as e:  # noqa: BLE001  (whatever the user's file raised, named in one line)
      exit_with(f'config file {file!r} does not load: {type(e).__name__}: {e}')
    try:
      for name in names:
        configlib.check_field_name(config, name)
    except ValueError as e:
      exit_with(str(e))
    raise


def main(argv):
  if len(argv) > 1:
    exit_with(unexpected_arguments(argv))
  console.set_verbosity()
  if FLAGS.distributed:
    _initialize_distributed()
    console.set_verbosity(jax.process_index())  # the others print errors only
  config = FLAGS.config
  if FLAGS.mode:
    config.mode = FLAGS.mode
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except (ValueError, DatasetMissingError, FileNotFoundError,
          checkpointing.CheckpointDamaged) as e:
    # Config and data problems are the user's to fix: one line, no traceback. The operating
    # system's own (a folder that cannot be made) reads "[Errno 2] ...": named like the others.
    raw = isinstance(e, FileNotFoundError) and e.filename is not None and e.strerror
    exit_with(console.path_error(e) if raw else str(e))
  except checkpointing.CheckpointWriteError as e:
    # At once: the failed save's writes still pending would each print a traceback as the
    # interpreter tears them down.
    print(f'error: {e}', file=sys.stderr)
    stop(2)
  except OSError as e:  # a workdir that is a file, or cannot be written
    if e.filename is None:
      raise
    exit_with(console.path_error(e))
  except train.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  except train.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)  # the conventional status of a process ended by that signal
  except KeyboardInterrupt:  # a Ctrl-C outside the training loop: setup, data, an evaluation
    print(f'interrupted; {resume_hint(FLAGS.workdir)}', file=sys.stderr, flush=True)
    stop(128 + 2)


def resume_hint(workdir: str) -> str:
  """What the same command will do after an interruption: resume, or start again."""
  folder = os.path.join(workdir, 'checkpoints')
  steps = [int(name) for name in (os.listdir(folder) if os.path.isdir(folder) else ())
           if name.isdigit()]
  if not steps:
    return 'no checkpoint was saved yet, so the same command starts the run again'
  return f'the same command resumes from the checkpoint of step {max(steps)}'


_PROCESS = {'exit_at_once': False}  # run as the program, not called from Python


def stop(status: int):
  """Ends the program with `status`. Run as the program it exits at once: unwinding after a
  Ctrl-C tears down TensorFlow's input threads, which can hang the process or crash it."""
  if _PROCESS['exit_at_once']:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


def run_as_program(main_function, hint=resume_hint) -> None:
  """absl's app.run of `main_function` with this module's flag parsing, as a program: an
  interruption ends the process at once (`stop`, `train.exit_on_second_interrupt`); so does a
  SIGTERM outside the training loop (which checkpoints and stops on it), with a line saying
  what the same command will do: hint(workdir)."""

  def terminated(signum, frame):
    del frame
    workdir = FLAGS.workdir if FLAGS.is_parsed() else None
    print(f'{signal.Signals(signum).name}; ' + (hint(workdir) if workdir else 'stopped'),
          file=sys.stderr, flush=True)
    stop(128 + signum)

  _PROCESS['exit_at_once'] = True
  train.exit_on_second_interrupt()
  signal.signal(signal.SIGTERM, terminated)
  app.run(main_function, flags_parser=parse_flags)


if __name__ == '__main__':
  run_as_program(main)
