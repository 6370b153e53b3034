"""The training loop: data-parallel steps, periodic logging, checkpoints and evaluation.

`train_and_evaluate(config, workdir)` is the whole program behind `fashion_jax.main`.
"""

import collections
import contextlib
import fcntl
import json
import os
import signal
import sys
import tempfile
import time

import jax
import ml_collections
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import datasets, input_pipeline
from fashion_jax import augment, checkpointing, configlib, console, evaluate, optim
from fashion_jax import train_step as ts
from fashion_jax.models import build_model
from fashion_jax.models.pretrained import load_pretrained_from_config

# Fields a resumed run may change: how long, how often, where the data lives, how to evaluate.
# Anything else would silently change the experiment the checkpoints belong to.
RESUMABLE_CHANGES = ('mode', 'dataset.data_dir', 'model.pretrained', 'input.prefetch',
                     'train.num_epochs', 'train.log_every_steps', 'train.checkpoint_every_steps',
                     'train.keep_checkpoints', 'train.eval_every_epochs',
                     'train.allow_config_change', 'eval')


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss, gradient or update."""


class Preempted(Exception):
  """SIGTERM (or Ctrl-C) arrived; the state was checkpointed and training stopped."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.signum = int(signum)


def _device_batches(iterator, mesh, size: int):
  """Global arrays built from this process's batches, `size` batches ahead of the consumer."""
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  queue = collections.deque()

  def enqueue():
    batch = next(iterator)
    queue.append(tuple(jax.make_array_from_process_local_data(sharding, batch[key])
                       for key in ('images', 'labels')))

  for _ in range(size):
    enqueue()
  while True:
    enqueue()
    yield queue.popleft()


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def check_workdir_config(config, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoints were trained with a different config.

  The config is saved as `<workdir>/config.json` when a run starts; fields outside
  RESUMABLE_CHANGES must match it unless `train.allow_config_change` is set. A field the saved
  config lacks (added to the project since) matches when it has its default value, which keeps
  the behaviour the run had.
  """
  path = epath.Path(workdir) / 'config.json'
  if config.train.get('allow_config_change', False):
    return
  if not path.exists():
    raise ValueError(f'{workdir} holds checkpoints but no config.json, the record of the config '
                     'they were trained with: restore it, or resume with '
                     '--config.train.allow_config_change=True to record this one')
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f'{path} is damaged ({e}); it records the config these checkpoints were '
                     'trained with: restore it, or resume with '
                     '--config.train.allow_config_change=True to write it again') from None
  if not isinstance(saved, dict):
    raise ValueError(f'{path} is damaged (not a JSON object); restore it, or resume with '
                     '--config.train.allow_config_change=True to write it again')
  saved = _flatten(saved)
  current = _flatten(json.loads(config.to_json_best_effort()))
  defaults = _flatten(json.loads(configlib.base_config().to_json_best_effort()))
  differing = sorted(
      key for key in saved.keys() | current.keys()
      if saved.get(key) != current.get(key)
      and not (key not in saved and key in defaults and current.get(key) == defaults[key])
      and not any(key == field or key.startswith(field + '.') for field in RESUMABLE_CHANGES))
  if differing:
    details = ', '.join(f'{k} ({saved.get(k)!r} -> {current.get(k)!r})' for k in differing[:6])
    raise ValueError(f'{workdir} holds checkpoints of a different config: {details}; use '
                     f'another workdir or --config.train.allow_config_change=True')


def epoch_steps(config, num_identities: int) -> int:
  """config.train.steps_per_epoch, or by default about one visit of each identity."""
  return (config.train.steps_per_epoch
          or input_pipeline.steps_per_epoch(num_identities,
                                            config.train.batch_size // config.train.k))


def setup(config, workdir: str):
  """Validates the config, finds the dataset and builds the model, optimizer and state.

  Everything that can reject a config happens here, before any compilation.
  """
  configlib.validate_config(config, num_devices=jax.device_count(),
                            num_processes=jax.process_count())
  if jax.process_index() == 0:
    for line in configlib.unknown_fields(config):
      print(f'warning: {line}', file=sys.stderr, flush=True)
  if not jax.config.jax_compilation_cache_dir:
    # A resumed run (after preemption, say) loads its compiled programs instead of recompiling;
    # JAX_COMPILATION_CACHE_DIR shares one cache between runs instead.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                            keep=config.train.keep_checkpoints)
  if checkpointer.latest_step() is not None:
    check_workdir_config(config, workdir)
  builder = datasets.get_builder(config.dataset.name, config.dataset.data_dir)
  evaluate.check_eval_settings(config, builder)
  item_ids = input_pipeline.train_item_ids(builder, config.dataset.train_split)
  steps_per_epoch = epoch_steps(config, len(item_ids))
  model = build_model(config.model, len(item_ids), seed=config.seed)
  weights = load_pretrained_from_config(model, config.model)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch)
  graphdef, state = ts.create_train_state(model, tx, len(item_ids), loss_config=config.loss,
                                         seed=config.seed)
  mesh = ts.make_mesh()
  state = ts.replicate(state, mesh)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state, set_aside_damaged=True)
    logging.info('restored checkpoint at step %d from %s', int(state['step']),
                 checkpointer.directory)
  return dict(builder=builder, item_ids=item_ids, steps_per_epoch=steps_per_epoch, weights=weights,
              tx=tx, schedule=schedule, graphdef=graphdef, state=state, mesh=mesh,
              checkpointer=checkpointer)


class _StopSignals:
  """Records SIGTERM (the usual preemption notice) and a first Ctrl-C (SIGINT), so that the loop
  checkpoints and stops; a second Ctrl-C stops at once: KeyboardInterrupt, or in the
  command-line programs the end of the process (`exit_on_second_interrupt`)."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)
  exit_process = False

  def __init__(self):
    self.raised = None  # the signal's number, once one arrived
    self._previous = {}

  def __enter__(self):
    try:
      self._previous = {number: signal.signal(number, self._handle) for number in self._SIGNALS}
    except ValueError:  # not the main thread: leave signals to the caller
      self._previous = {}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.raised is not None:
        if self.exit_process:
          print('\ninterrupted again: stopped without a checkpoint; the same command resumes from '
                'the last one saved', file=sys.stderr, flush=True)
          os._exit(128 + signal.SIGINT)
        raise KeyboardInterrupt
      print('\ninterrupted: stopping after this step with a checkpoint (Ctrl-C again to stop '
            'at once, without one)', file=sys.stderr, flush=True)
    self.raised = signum

  def __exit__(self, *exc):
    for number, previous in self._previous.items():
      signal.signal(number, previous)


def exit_on_second_interrupt() -> None:
  """Makes a second Ctrl-C during training end the process at once, as the command-line
  programs want. KeyboardInterrupt, raised from the signal handler, lands wherever the main
  thread is: in a garbage-collection callback it is swallowed and training goes on; while
  Python tears down TensorFlow's input threads the process can hang or crash. A checkpoint
  being written then is left unfinished, which a restore never takes."""
  _StopSignals.exit_process = True


def _plural(count: int, noun: str, plural: str | None = None) -> str:
  return f'{count} {noun if count == 1 else plural or noun + "s"}'


def _split_items(builder, split: str) -> str:
  try:
    return f'{builder.info.splits[split].num_examples} {split}'
  except (KeyError, ValueError):  # a split TFDS keeps no count for
    return split


def _setup_lines(config, s: dict, workdir: str, start_step: int, total_steps: int) -> list[str]:
  """The run in a few lines: devices, data, steps, where the results go."""
  devices = _plural(jax.device_count(), f'{jax.default_backend()} device')
  lines = [f'JAX {jax.__version__}: {devices} in '
           f'{_plural(jax.process_count(), "process", "processes")}']
  builder = s['builder']
  data = f'{builder.info.full_name}: {len(s["item_ids"])} training identities'
  eval_builder = evaluate.eval_builder(config, builder)
  if config.mode != 'train':
    on = '' if eval_builder is builder else f' of {eval_builder.info.full_name}'
    data += (f'; {_split_items(eval_builder, config.dataset.query_split)} and '
             f'{_split_items(eval_builder, config.dataset.gallery_split)} items{on}')
  lines.append(data)
  if config.mode == 'evaluate':
    lines.append(f'evaluating the checkpoint of step {start_step}')
  else:
    t = config.train
    steps = (f'{total_steps} steps: {_plural(t.num_epochs, "epoch")} of {s["steps_per_epoch"]}, '
             f'batch {t.batch_size} ({t.batch_size // t.k} identities x {t.k})')
    if config.mode == 'train_and_evaluate':
      steps += f', evaluated every {_plural(t.eval_every_epochs, "epoch")}'
    if start_step:
      steps += f'; resuming at step {start_step}'
    lines.append(steps)
  if s.get('weights') is not None and not start_step:  # resumed: the checkpoint's own
    report = s['weights']
    lines.append(f'{report.arch} weights from {config.model.pretrained}: '
                 f'{_plural(len(report.loaded), "backbone tensor")} loaded; '
                 f'{_plural(len(report.not_loaded), "tensor")} of the head start fresh')
  reports = '' if config.mode == 'train' else f', {evaluate.report_folder(config)}/ reports'
  lines.append(f'workdir {workdir}: checkpoints{reports}; tensorboard --logdir {workdir}')
  return lines


def hparams(config) -> dict:
  """The config's fields as TensorBoard hparams ('optim.base_lr': 0.002, ...): numbers, booleans
  and strings stay; tuples and None become the text an override would take ('(64, 64)')."""
  flat = _flatten(json.loads(config.to_json_best_effort()))
  return {key: value if isinstance(value, (bool, int, float, str))
          else str(tuple(value) if isinstance(value, list) else value)
          for key, value in flat.items()}


def _write_config(writer, config, step: int) -> None:
  """The config in TensorBoard: hparams, so runs compare in the HParams tab, and its JSON."""
  writer.write_hparams(hparams(config))
  json_text = config.to_json_best_effort(indent=2)
  # The text plugin renders Markdown: an indented block keeps the JSON as it is.
  writer.write_texts(step, {'config': '\n'.join('    ' + line for line in json_text.splitlines())})


def _remove_empty_folders(root: str) -> None:
  """Removes `root` and the folders under it that hold no file (only folders, if any)."""
  for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
    try:
      os.rmdir(folder)  # fails, and so keeps the folder, when anything is in it
    except OSError:
      pass


# What a workdir holds, besides TensorBoard's event files (events.out.tfevents.*).
_WORKDIR_ENTRIES = frozenset(('checkpoints', 'config.json', 'eval', 'xla_cache'))


def check_workdir_folder(workdir: str) -> None:
  """A one-line ValueError for a local folder that is something other than a workdir (a
  search index, a workdir's checkpoints folder, a folder of other files), which training
  would fill with its own files; a new or empty folder, or a workdir, passes."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir} is a file, not a folder: give a new or empty folder, '
                     'or a workdir')
  if not os.path.isdir(workdir):
    return
  names = sorted(name for name in os.listdir(workdir) if not name.startswith('.'))
  if 'index.json' in names:
    raise ValueError(f'--workdir {workdir} is a search index, not a training workdir: give a new '
                     'or empty folder, or a workdir')
  others = [name for name in names if name not in _WORKDIR_ENTRIES
            and not name.startswith('events.out.tfevents.')]
  if not others or 'config.json' in names:
    return
  steps = sorted((name for name in others if name.isdigit()), key=int)
  if steps:
    parent = os.path.dirname(os.path.normpath(workdir)) or '.'
    raise ValueError(f"--workdir {workdir} holds checkpoints ({', '.join(steps[-3:])}): it is a "
                     f"workdir's checkpoints folder; give the workdir, {parent}")
  more = f' and {len(others) - 1} more' if len(others) > 1 else ''
  raise ValueError(f'--workdir {workdir} is not a training workdir: it holds {others[0]!r}{more} '
                   'and no config.json; give a new or empty folder, or a workdir')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates, per config.mode.

  Returns the last evaluation's metrics (None when mode is 'train'). Raises Preempted after
  checkpointing when SIGTERM or a first Ctrl-C arrives, NonFiniteLossError when the loss stops being finite.
  Process 0 prints the run's setup, a progress bar and a line per evaluation.
  """
  started = time.monotonic()
  if not str(workdir).strip():
    raise ValueError('--workdir is empty: give the folder for checkpoints, logs and reports')
  checkpoints = os.path.join(workdir, 'checkpoints')
  local = '://' not in workdir  # a bucket's checkpoints are looked for by the checkpointer
  if local:
    check_workdir_folder(workdir)
  if local and config.mode == 'evaluate' and not (
      os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))):
    raise FileNotFoundError(f'mode=evaluate needs a checkpoint in {checkpoints}')
  created = local and not os.path.exists(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a bucket's too (gs://...)
  with contextlib.ExitStack() as stack:
    if local and jax.process_index() == 0:
      stack.enter_context(_workdir_lock(workdir))
    try:
      s = setup(config, workdir)
      if local and jax.process_index() == 0:
        _check_writable(workdir)
    except Exception:
      if created:  # a refused config or dataset leaves no empty workdir behind
        _remove_empty_folders(workdir)
      raise
    return _run(config, workdir, s, started)


def _check_writable(workdir: str) -> None:
  """An OSError naming the folder when the workdir or its checkpoints folder cannot take a new
  file (read-only, a file where the folder goes): found before training, not at the first
  checkpoint or report."""
  for folder in (workdir, os.path.join(workdir, 'checkpoints')):
    os.makedirs(folder, exist_ok=True)
    try:
      with tempfile.TemporaryFile(dir=folder):
        pass
    except OSError as e:  # named by the folder, not by the probe's random file name
      raise OSError(e.errno, e.strerror, folder) from None


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Held while a run uses a local workdir: a second run there is refused in one line (both
  would write its checkpoints, config.json and reports, each taking the other's for its own).
  The lock is on the folder itself, so it leaves no file, and goes with the process."""
  descriptor = os.open(workdir, os.O_RDONLY)
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ValueError(f'--workdir {workdir} is in use by another run (training or evaluating '
                       'there now): wait for it to end, or give another workdir') from None
    yield
  finally:
    os.close(descriptor)


def _run(config, workdir: str, s: dict, started: float) -> dict | None:
  """train_and_evaluate once set up."""
  state, mesh, checkpointer = s['state'], s['mesh'], s['checkpointer']
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  embed_fn = ts.make_embed_fn(s['graphdef'], mesh, flip=config.eval.flip)
  do_eval = config.mode in ('train_and_evaluate', 'evaluate')

  def say(line: str):
    if is_main:
      console.print_result(line)

  def run_eval(state):
    metrics = evaluate.evaluate(
        config, embed=lambda images: embed_fn(state['params'], state['batch_stats'], images),
        builder=s['builder'], mesh=mesh, workdir=workdir, step=int(state['step']), writer=writer)
    say(f'step {metrics["step"]}: {evaluate.console_line(metrics, config.eval.ks)}')
    return metrics

  start_step = int(state['step'])
  steps_per_epoch = s['steps_per_epoch']
  total_steps = config.train.num_epochs * steps_per_epoch
  if is_main:
    for line in _setup_lines(config, s, workdir, start_step, total_steps):
      say(line)
    _write_config(writer, config, start_step)
  if config.mode == 'evaluate':
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f'mode=evaluate needs a checkpoint in {checkpointer.directory}')
    return run_eval(state)

  if start_step >= total_steps:
    say(f'training already finished at step {start_step}')
    return run_eval(state) if do_eval else None
  eval_every = config.train.eval_every_epochs * steps_per_epoch
  if is_main and (start_step == 0 or config.train.allow_config_change):
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))

  metrics = None
  if do_eval and start_step == 0:
    metrics = run_eval(state)  # the untrained model: the baseline the training must beat

  train_ds = input_pipeline.create_train_dataset(
      s['builder'], config, item_ids=s['item_ids'], start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  batches = _device_batches(train_ds.as_numpy_iterator(), mesh, config.input.prefetch)
  augmentation = (augment.Augmentation.from_config(config.input)
                  if config.input.get('augment_on_device', False) else None)
  step_fn = ts.make_train_step(s['graphdef'], s['tx'], mesh, config.loss, s['schedule'],
                               seed=config.seed, augmentation=augmentation)
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  progress = console.TrainingProgress(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                      start_step=start_step, enabled=is_main)
  last_checkpoint = checkpointer.latest_step()

  def check_finite(state):
    bad_step = int(state['nonfinite_step'])
    if bad_step >= 0:
      checkpointer.wait()
      good = (f'the last good checkpoint is step {last_checkpoint} in {checkpointer.directory}'
              if last_checkpoint is not None else 'no checkpoint was saved before it')
      raise NonFiniteLossError(
          f'non-finite loss, gradient or update at step {bad_step}; training stopped, {good}')

  with _StopSignals() as signals, contextlib.closing(progress):
    for step in range(start_step + 1, total_steps + 1):
      images, labels = next(batches)
      state, train_metrics = step_fn(state, images, labels)
      report_progress(step)
      is_last = step == total_steps
      is_log_step = step % config.train.log_every_steps == 0 or is_last
      stop = signals.raised is not None
      if jax.process_count() > 1:
        # All processes must stop at the same step, or the next collective hangs; agreeing costs
        # a host synchronisation, so it is done on logging steps only.
        stop = is_log_step and bool(multihost_utils.process_allgather(stop).any())
      loss = None
      if is_log_step:
        check_finite(state)
        fetched = jax.device_get(train_metrics)
        writer.write_scalars(step, {f'train/{k}': v for k, v in fetched.items()})
        loss = float(fetched['loss'])
      progress.update(step, loss)
      if step % config.train.checkpoint_every_steps == 0 or is_last or stop:
        check_finite(state)  # a non-finite state is never saved
        checkpointer.save(step, state)
        last_checkpoint = step
      if stop:
        checkpointer.wait()
        checkpointer.close()
        writer.flush()
        raise Preempted(f'{signal.Signals(signals.raised).name} at step {step}: checkpoint saved '
                        f'in {checkpointer.directory}; run the same command to resume',
                        signum=signals.raised)
      if do_eval and (step % eval_every == 0 or is_last):
        check_finite(state)  # nor evaluated: its reports would replace the last good ones
        with progress.paused():
          metrics = run_eval(state)

  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  minutes, seconds = divmod(round(time.monotonic() - started), 60)
  where = os.path.join(workdir, evaluate.report_folder(config) if do_eval else 'checkpoints')
  say(f'done: step {total_steps} in {minutes}m{seconds:02d}s; results in {where}')
  if metrics is not None:
    logging.info('final metrics: %s', json.dumps(metrics))
  return metrics
