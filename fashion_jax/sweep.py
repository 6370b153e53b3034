r"""Grid search over config fields, each point trained in a workdir of its own (docs/sweeps.md):

  python -m fashion_jax.sweep --config configs/demo.py --workdir runs/sweep \
      --sweep 'optim.base_lr=1e-3,2e-3' --sweep 'loss.metric=triplet,quadruplet'

Points run one after the other on this machine; a finished point is skipped, an interrupted one
resumes. Then <workdir>/sweep.csv and sweep.md list every point's final metrics, best mAP first.
--print_commands prints one `fashion_jax.main` command per point instead, for a cluster scheduler.
"""

import copy
import csv
import dataclasses
import io
import itertools
import json
import os
import re
import shlex
import sys

from fashion_jax import console

if __name__ == '__main__':
  console.quiet_start(sys.argv)  # before TensorFlow and JAX load

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections.config_flags import config_flags, config_path, tuple_parser  # noqa: E402

from data_pipelines import datasets, input_pipeline  # noqa: E402
from fashion_jax import checkpointing, configlib, evaluate, train  # noqa: E402
from fashion_jax import main as train_cli  # noqa: E402  (--config, --workdir, their parsing)
from fashion_jax.models import pretrained  # noqa: E402

FLAGS = flags.FLAGS
for _name in ('config', 'workdir'):  # defined by fashion_jax.main; --help lists them with ours
  flags.declare_key_flag(_name)
flags.DEFINE_multi_string('sweep', [], "A field and its values, e.g. 'optim.base_lr=1e-3,2e-3'; "
                          'each --sweep adds a dimension to the grid.')
flags.DEFINE_bool('print_commands', False, 'Print one training command per point (for a cluster '
                  'scheduler) instead of running the points here.')

_UNSAFE = re.compile(r'[/\s]+')
# The parsers ml_collections gives a `--config.<field>` override of each type, and the type's name.
_PARSERS = {bool: (flags.BooleanParser(), 'a boolean'), int: (flags.IntegerParser(), 'an integer'),
            float: (flags.FloatParser(), 'a number'), str: (flags.ArgumentParser(), 'a string'),
            tuple: (tuple_parser.TupleParser(), 'a tuple')}


@dataclasses.dataclass(frozen=True)
class Axis:
  """One --sweep: a config field and its values, each with the text it was written as."""
  field: str
  texts: tuple[str, ...]
  values: tuple


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of the grid: its name (also its workdir's), overrides and the config they make."""
  name: str
  overrides: tuple[tuple[str, str], ...]  # (field, value as written)
  config: ml_collections.ConfigDict


def split_values(text: str) -> list[str]:
  """'1e-3,2e-3' -> ['1e-3', '2e-3']; commas inside brackets or quotes ('(32,32),(64,64)') stay."""
  values, depth, quote, start = [], 0, None, 0
  for i, char in enumerate(text):
    if quote:
      quote = None if char == quote else quote
    elif char in '\'"':
      quote = char
    elif char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    elif char == ',' and depth == 0:
      values.append(text[start:i].strip())
      start = i + 1
  values.append(text[start:].strip())
  return values


def parse_axis(config: ml_collections.ConfigDict, spec: str) -> Axis:
  """'optim.base_lr=1e-3,2e-3' -> Axis, each value parsed as `--config.optim.base_lr=` would be
  (None too, for a field that may be None: 'train.steps_per_epoch=None,100').

  Raises a one-line ValueError for a field the config lacks or a value its type refuses.
  """
  field, sep, text = spec.partition('=')
  field = field.strip()
  texts = tuple(split_values(text)) if sep else ()
  if not field or not texts or '' in texts:
    raise ValueError(f'--sweep {spec!r}: write a field and its values, e.g. '
                     f"--sweep 'optim.base_lr=1e-3,2e-3'")
  configlib.check_field_name(config, field)
  kind = config_path.get_type(field, config)
  if kind not in _PARSERS:
    raise ValueError(f'--sweep {field}: a group of fields cannot be swept; name one of its fields')
  parser, kind_name = _PARSERS[kind]
  values = []
  for value in texts:
    if value == 'None':  # as on the command line (configlib.set_none)
      if field in configlib.FIELDS and (problem := configlib.FIELDS[field].problem(field, None)):
        raise ValueError(f'--sweep {problem}')
      values.append(None)
      continue
    try:
      values.append(parser.parse(value))
    except (ValueError, SyntaxError):
      raise ValueError(f'--sweep {field}: {value!r} is not {kind_name}') from None
  if len(set(texts)) < len(texts) or len(set(map(repr, values))) < len(values):
    raise ValueError(f'--sweep {field}: a value is listed twice ({", ".join(texts)})')
  return Axis(field, texts, tuple(values))


def grid(config: ml_collections.ConfigDict, axes: list[Axis]) -> list[Point]:
  """Every combination of the axes' values, in the order given (the last axis varies fastest).

  The workdir name joins `field=value` with commas, as Hydra names its multirun folders.
  """
  fields = [axis.field for axis in axes]
  if len(set(fields)) < len(fields):
    raise ValueError(f'--sweep names a field twice: {", ".join(fields)}')
  points = []
  for choice in itertools.product(*(zip(axis.texts, axis.values) for axis in axes)):
    point_config = copy.deepcopy(config)
    for field, (_, value) in zip(fields, choice):
      config_path.set_value(field, point_config, value)
    overrides = tuple((field, text) for field, (text, _) in zip(fields, choice))
    # A path separator or a space in a value (a dataset name, a tuple) stays out of the name.
    name = ','.join(f'{field}={re.sub(_UNSAFE, "_", text)}' for field, text in overrides)
    if len(name.encode()) > 255:  # the longest file name most file systems take
      raise ValueError(f'--sweep: the workdir name {name[:60]}... is {len(name.encode())} bytes, '
                       f'over the 255 a folder name may have; sweep shorter values')
    same = next((point for point in points if point.name == name), None)
    if same is not None:
      raise ValueError(f'--sweep: {", ".join(f"{f}={t}" for f, t in same.overrides)} and '
                       f'{", ".join(f"{f}={t}" for f, t in overrides)} would share the workdir '
                       f'{name!r}')
    points.append(Point(name, overrides, point_config))
  return points


def check_points(points: list[Point], *, num_devices: int | None) -> None:
  """Raises a one-line ValueError, naming the point, for the first config that cannot run.

  Without `num_devices` (commands for another machine) only each field's own domain is checked.
  """
  builders = {}
  for point in points:
    try:
      if num_devices is None:
        configlib.check_fields(point.config)
        continue
      configlib.validate_config(point.config, num_devices=num_devices,
                                num_processes=jax.process_count())
      # The dataset each point trains and evaluates on, as training would find it.
      dataset = (point.config.dataset.name, point.config.dataset.data_dir)
      if dataset not in builders:
        builders[dataset] = datasets.get_builder(*dataset)
      evaluate.check_eval_settings(point.config, builders[dataset])
      if point.config.model.pretrained:  # only found missing when the point starts, else
        pretrained.check_weights_file(point.config.model.pretrained)
    except (ValueError, FileNotFoundError, datasets.DatasetMissingError) as e:
      raise ValueError(f'{point.name}: {e}') from None


def check_sweep_folder(workdir: str) -> None:
  """A one-line ValueError for a local folder that is a training workdir or a search index:
  the sweep would put its points' workdirs and its tables inside it."""
  if '://' in workdir:
    return
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir} is a file, not a folder: give a new or empty folder, '
                     "or a sweep's")
  if not os.path.isdir(workdir):
    return
  names = set(os.listdir(workdir))
  what = ('a search index' if 'index.json' in names else
          'a training workdir' if names & {'config.json', 'checkpoints'} else None)
  if what:
    raise ValueError(f"--workdir {workdir} is {what}, not a sweep's folder: give a new or empty "
                     "folder, or a sweep's, where each point trains in a workdir of its own")


def commands(points: list[Point], config_file: str, workdir: str, fixed: dict) -> list[str]:
  """One `python -m fashion_jax.main` command per point; `fixed`: the overrides of every point."""
  lines = []
  for point in points:
    args = ['python', '-m', 'fashion_jax.main', '--config', config_file,
            '--workdir', os.path.join(workdir, point.name)]
    # str() is what the parsers read back: 0.002, (32, 32), True, triplet.
    args += [f'--config.{field}={value}' for field, value in fixed.items()]
    args += [f'--config.{field}={text}' for field, text in point.overrides]
    lines.append(' '.join(shlex.quote(arg) for arg in args))
  return lines


def finished_metrics(config, workdir: str, identities: dict | None = None) -> dict | None:
  """The point's final metrics when it is finished: its last checkpoint is the final step, its
  metrics.json that step's, computed with the point's eval settings. Refuses (ValueError) a
  workdir trained with another config, or past the point's final step.

  `identities` caches the training identities of each dataset, read to count the steps.
  """
  path = epath.Path(workdir) / evaluate.report_folder(config) / 'metrics.json'
  if not path.exists():
    return None
  train.check_workdir_config(config, workdir)
  identities = {} if identities is None else identities
  key = (config.dataset.name, config.dataset.data_dir, config.dataset.train_split)
  if key not in identities:
    builder = datasets.get_builder(config.dataset.name, config.dataset.data_dir)
    identities[key] = len(input_pipeline.train_item_ids(builder, config.dataset.train_split))
  final_step = config.train.num_epochs * train.epoch_steps(config, identities[key])
  metrics = json.loads(path.read_text())
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  latest = checkpointer.latest_step()
  checkpointer.close()
  if latest is not None and latest > final_step:
    # Its metrics would be of a longer training than the point's.
    raise ValueError(f'{workdir} has trained to step {latest}, past the final step {final_step} '
                     f'of this point (train.num_epochs {config.train.num_epochs}); use another '
                     '--workdir')
  if not evaluate.metrics_settings_match(config, workdir):
    return None  # evaluated again, from the final checkpoint
  return metrics if metrics.get('step') == final_step == latest else None


@dataclasses.dataclass
class Result:
  point: Point
  metrics: dict | None  # None: the point stopped on a non-finite loss
  skipped: bool = False
  error: str = ''


def run(points: list[Point], workdir: str, results: list[Result] | None = None) -> list[Result]:
  """Trains and evaluates each point in <workdir>/<point name>, skipping the finished ones.

  A point whose loss stops being finite is reported and the sweep goes on; any other error
  (train.Preempted included) stops it, and the same command resumes it. Each point's result
  is appended to `results` as it ends (those before an interruption stay there).
  """
  if not jax.config.jax_compilation_cache_dir:
    # One cache for all points: most programs (evaluation, often the step) are the same.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
  results = [] if results is None else results
  identities = {}
  for i, point in enumerate(points, 1):
    point_dir = os.path.join(workdir, point.name)
    metrics = finished_metrics(point.config, point_dir, identities)
    if metrics is not None:
      console.print_result(f'[{i}/{len(points)}] {point.name}: finished, skipped')
      results.append(Result(point, metrics, skipped=True))
      continue
    console.print_result(f'[{i}/{len(points)}] {point.name}')
    try:
      results.append(Result(point, train.train_and_evaluate(point.config, point_dir)))
    except train.NonFiniteLossError as e:
      print(f'error: {point.name}: {e}', file=sys.stderr)
      results.append(Result(point, None, error=str(e).split(';')[0]))
  return results


def table(results: list[Result]) -> tuple[list[str], list[dict]]:
  """The columns and rows of the sweep's table: swept fields, final metrics, step and workdir;
  best mAP first, points without metrics last."""
  fields = [field for field, _ in results[0].point.overrides] if results else []
  metric_columns, rows = [], []
  for result in results:
    row = dict(result.point.overrides)
    metrics = result.metrics or {}
    named = {'mAP': metrics.get('mAP'), 'mINP': metrics.get('mINP'),
             'Acc@1': metrics.get('acc@1'), 'Acc@10': metrics.get('acc@10')}
    named.update((key.upper(), value) for key, value in metrics.get('verification', {}).items()
                 if key.startswith('tpr@'))
    for column, value in named.items():
      if value is not None:
        row[column] = value
        if column not in metric_columns:
          metric_columns.append(column)
    row['step'] = metrics.get('step', result.error)
    row['workdir'] = result.point.name
    rows.append(row)
  rows.sort(key=lambda row: -row['mAP'] if 'mAP' in row else float('inf'))
  return fields + metric_columns + ['step', 'workdir'], rows


def csv_text(columns: list[str], rows: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def markdown_text(columns: list[str], rows: list[dict]) -> str:
  """The table in Markdown: mAP and mINP to 4 decimals, the other metrics to 3."""
  def cell(column, value) -> str:
    if not isinstance(value, float):  # swept values stay as they were written
      return str(value)
    return f'{value:.4f}' if column in ('mAP', 'mINP') else f'{value:.3f}'

  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(c, row.get(c, '')) for c in columns) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def write_tables(results: list[Result], workdir: str) -> str:
  """<workdir>/sweep.csv and sweep.md; returns the markdown."""
  columns, rows = table(results)
  (epath.Path(workdir) / 'sweep.csv').write_text(csv_text(columns, rows))
  # The workdir names repeat the swept values: the CSV keeps them, the Markdown stays narrow.
  markdown = markdown_text([column for column in columns if column != 'workdir'], rows)
  (epath.Path(workdir) / 'sweep.md').write_text(markdown)
  return markdown


def _partial_tables(results: list[Result], workdir: str, before: str = 'the interruption') -> str:
  """The tables of the points that ended before an interruption or error; what to say of them."""
  if not results:
    return ''
  write_tables(results, workdir)
  return (f' (sweep.csv and sweep.md list the {len(results)} of its points that ended before '
          f'{before})')


def _fixed_overrides() -> dict:
  """The command line's `--config.<field>=<value>` overrides, which every point shares."""
  fixed = config_flags.get_override_values(FLAGS['config'])
  fixed.update(dict.fromkeys(train_cli.NONE_OVERRIDES))
  return fixed


def main(argv):
  if len(argv) > 1:
    train_cli.exit_with(train_cli.unexpected_arguments(argv))
  console.set_verbosity()
  if FLAGS.distributed or FLAGS.mode:
    train_cli.exit_with('a sweep trains and evaluates its points here, one after the other; '
                        'for other machines, --print_commands prints one command per point')
  config, workdir = FLAGS.config, FLAGS.workdir
  try:
    if not FLAGS.sweep:
      raise ValueError("name the fields to sweep, e.g. --sweep 'optim.base_lr=1e-3,2e-3'")
    if config.mode != 'train_and_evaluate':
      raise ValueError(f'mode {config.mode!r}: a sweep compares final evaluations, it needs '
                       f"mode 'train_and_evaluate'")
    axes = [parse_axis(config, spec) for spec in FLAGS.sweep]
    fixed = _fixed_overrides()
    both = [axis.field for axis in axes if axis.field in fixed]
    if both:  # the sweep's values would replace the fixed one without a word
      raise ValueError(f'--config.{both[0]} is also swept (--sweep {both[0]}=...); drop one')
    points = grid(config, axes)
    check_points(points, num_devices=None if FLAGS.print_commands else jax.device_count())
    check_sweep_folder(workdir)
  except ValueError as e:
    train_cli.exit_with(str(e))
  if FLAGS.print_commands:
    fixed = _fixed_overrides()
    for line in commands(points, config_flags.get_config_filename(FLAGS['config']), workdir,
                         fixed):
      print(line)
    return
  results = []
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a bucket's too (gs://...)
    run(points, workdir, results)
  except (ValueError, datasets.DatasetMissingError, FileNotFoundError,
          checkpointing.CheckpointDamaged) as e:
    train_cli.exit_with(f'{e}{_partial_tables(results, workdir, "the error")}')
  except checkpointing.CheckpointWriteError as e:  # at once, as fashion_jax.main does
    print(f'error: {e}{_partial_tables(results, workdir, "the error")}', file=sys.stderr)
    train_cli.stop(2)
  except OSError as e:  # a workdir that is a file, or cannot be written
    if e.filename is None:
      raise
    train_cli.exit_with(f'{console.path_error(e)}{_partial_tables(results, workdir, "the error")}')
  except train.Preempted as e:
    print(f'{e}; the same sweep command resumes the sweep{_partial_tables(results, workdir)}',
          file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # a Ctrl-C outside a point's training loop
    print(f'interrupted; the same sweep command resumes the sweep'
          f'{_partial_tables(results, workdir)}', file=sys.stderr, flush=True)
    train_cli.stop(128 + 2)
  print(write_tables(results, workdir), end='')
  print(f'wrote {os.path.join(workdir, "sweep.csv")} and sweep.md; compare the points in '
        f"TensorBoard's HParams tab: tensorboard --logdir {workdir}")
  failed = [result for result in results if result.metrics is None]
  if failed:
    print(f'error: {len(failed)} of {len(results)} points stopped on a non-finite loss',
          file=sys.stderr)
    sys.exit(3)


if __name__ == '__main__':
  train_cli.run_as_program(main, hint=lambda workdir: 'the same sweep command resumes the sweep')
