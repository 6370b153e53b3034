"""Orbax checkpoints of the training state in `<workdir>/checkpoints`, one per saved step.

Saves are asynchronous; a partially written step is never listed by Orbax. A step damaged
afterwards (a file deleted or truncated) is reported in one line and restoring falls back to
the newest step that reads whole; training moves the damaged step aside, never deletes it.
"""

import contextlib
import errno
import os
import re
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

DAMAGED_DIR = 'damaged_checkpoints'  # beside the checkpoint directory


class CheckpointMismatch(ValueError):
  """The checkpoint is whole but holds another architecture or class count."""


class CheckpointDamaged(RuntimeError):
  """No listed step of the checkpoint directory could be read."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (a full disk, a folder that became read-only); the steps
  saved before it are whole."""


# Arrays whose place in the state moved: old top-level name -> path in today's state. A
# checkpoint with the old layout restores into the new one.
MOVED = {'centers': ('loss_state', 'center', 'centers')}


def _quiet_closed_loop(hook):
  """sys.unraisablehook without the tracebacks of a damaged checkpoint's reads still in
  flight: when one array fails to read, Orbax's restore ends and closes its event loop, and
  TensorStore's other reads then complete into the closed loop ('Event loop is closed',
  reported from their threads as unraisable). Everything else is reported as before."""
  def unraisablehook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return
    hook(unraisable)
  unraisablehook.quiets_closed_loop = True
  return unraisablehook


if not getattr(sys.unraisablehook, 'quiets_closed_loop', False):
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)


def absolute(directory: str) -> str:
  """A local path made absolute; a URL (gs://bucket/run) as it is, not a folder named 'gs:'."""
  directory = os.fspath(directory)
  if '://' in directory:
    return directory
  return os.path.abspath(os.path.expanduser(directory))


class Checkpointer:
  """A thin CheckpointManager: save(step, state), restore(like), latest_step()."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = absolute(directory)
    # A save that failed part-way (a full disk, a killed process) leaves a temporary folder,
    # never listed as a step; the next manager deletes it and frees its space.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    # A registered handler lets a new manager read metadata before any save or restore.
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())
    self._writing = None  # the step of the save that may still be in flight

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """The steps saved, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Starts writing `step` in the background. Raises CheckpointWriteError if this save, or
    the one still in flight before it, cannot be written."""
    self.wait()  # as Orbax would, but then a failure names the step it was writing
    self._writing = step
    with self._writes():
      self._manager.save(step, args=ocp.args.StandardSave(state))

  @contextlib.contextmanager
  def _writes(self):
    """Around the Orbax calls that finish a save: its failure, raised from Orbax's threads with
    TensorStore's many-line message, becomes one CheckpointWriteError naming the step, the
    cause and the newest step that is whole."""
    try:
      yield
    except Exception as error:  # noqa: BLE001 (whatever Orbax or TensorStore raise)
      step, self._writing = self._writing, None
      try:
        self._manager.reload()
        whole = self._manager.latest_step()
      except Exception:  # noqa: BLE001 (the folder itself may be gone)
        whole = None
      kept = (f'the newest whole checkpoint is step {whole}, which the same command resumes'
              if whole is not None else 'no checkpoint was saved')
      which = f'step {step}' if step is not None else 'a step'
      raise CheckpointWriteError(f'cannot write the checkpoint of {which} in {self.directory}: '
                                 f'{_write_cause(error)}; {kept}') from None

  def restore(self, like=None, step: int | None = None, *, set_aside_damaged: bool = False):
    """Restores `step`, or by default the newest step that reads whole.

    With `like`, arrays come back with its shapes, dtypes and shardings (any device count);
    without it, as saved, on one local device, e.g. for inspecting a checkpoint. A damaged
    step is logged in one line and skipped (an explicit `step` is not: that raises
    CheckpointDamaged); with `set_aside_damaged` it is moved to `damaged_checkpoints/` beside
    the checkpoint directory, so later saves of those step numbers go through. A checkpoint
    of another model raises CheckpointMismatch at once.
    """
    if step is not None:
      try:
        return self._restore_step(like, step)
      except CheckpointMismatch:
        raise
      except Exception as error:  # noqa: BLE001 (whatever Orbax or TensorStore raise)
        raise CheckpointDamaged(f'checkpoint step {step} in {self.directory} cannot be read: '
                                f'{_summary(error)}') from None
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    damaged, causes = [], []
    for candidate in steps:
      try:
        restored = self._restore_step(like, candidate)
      except CheckpointMismatch:
        raise
      except Exception as error:  # noqa: BLE001
        damaged.append(candidate)
        causes.append(_summary(error))
        # The console's line is the one below; the cause of each is in the log.
        logging.info('checkpoint step %d in %s is damaged (%s); trying the previous one',
                     candidate, self.directory, causes[-1])
        continue
      if damaged:
        print(f'warning: checkpoint step(s) {", ".join(map(str, damaged))} in {self.directory} '
              f'damaged; restored step {candidate}'
              + (f' (moved to {DAMAGED_DIR}/ beside it)' if set_aside_damaged else ''),
              flush=True)
        if set_aside_damaged:
          self._set_aside(damaged)
      return restored
    raise CheckpointDamaged(f'every checkpoint in {self.directory} is damaged (steps '
                            f'{", ".join(map(str, damaged))}; the newest: {causes[0]}); nothing '
                            'restored')

  def _set_aside(self, steps) -> None:
    # epath: in a bucket (gs://...) too, where a rename is a copy and a delete.
    directory = epath.Path(self.directory)
    target = directory.parent / DAMAGED_DIR
    if jax.process_index() == 0:
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        destination, copies = target / str(step), 0
        while destination.exists():  # set aside before: 5, 5.1, 5.2, ...
          copies += 1
          destination = target / f'{step}.{copies}'
        (directory / str(step)).rename(destination)
        logging.info('moved damaged checkpoint step %d to %s', step, destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('checkpoint damaged steps set aside')
    self._manager.reload()

  def _restore_step(self, like, step: int):
    if like is None:
      # Onto this process's first device, whatever devices wrote it.
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              self._manager.item_metadata(step).tree)
    else:
      like, moved = self._in_saved_layout(step, like)
      self._check_fits(step, like)
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
      if moved:
        return _move_back(self._manager.restore(step, args=ocp.args.StandardRestore(abstract)),
                          moved)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def _in_saved_layout(self, step: int, like):
    """`like` rearranged as the checkpoint at `step` stores it, and the moves undone."""
    saved = self._manager.item_metadata(step).tree
    moved = [(old, path) for old, path in MOVED.items()
             if isinstance(like, dict) and old in saved and old not in like
             and _get(like, path) is not None]
    if not moved:
      return like, []
    like = dict(like)
    for old, path in moved:
      like[old] = _get(like, path)
      like = _without(like, path)
    return like, moved

  def _check_fits(self, step: int, like) -> None:
    """Names every array that the checkpoint lacks, adds, or holds with another shape."""
    saved = _shapes(self._manager.item_metadata(step))
    wanted = _shapes(like)
    # Parameters first: the optimizer state only repeats their shapes.
    order = lambda name: (not name.startswith('params/'), name.startswith('opt_state/'), name)
    problems = [f'{name}: saved {saved[name]}, model {wanted[name]}'
                for name in sorted(saved.keys() & wanted.keys(), key=order)
                if saved[name] != wanted[name]]
    problems += [f'{name}: not in the checkpoint'
                 for name in sorted(wanted.keys() - saved.keys(), key=order)]
    problems += [f'{name}: not in the model'
                 for name in sorted(saved.keys() - wanted.keys(), key=order)]
    if problems:
      shown = '; '.join(problems[:8]) + (f'; and {len(problems) - 8} more' if len(problems) > 8
                                         else '')
      raise CheckpointMismatch(f'checkpoint step {step} in {self.directory} does not fit this '
                               f'model (another architecture or class count?): {shown}')

  def wait(self) -> None:
    """Waits for the save in flight; CheckpointWriteError if it failed."""
    with self._writes():
      self._manager.wait_until_finished()
    self._writing = None

  def close(self) -> None:
    with self._writes():
      self._manager.close()


def _write_cause(error: BaseException) -> str:
  """The operating system's reason for a failed write where the message has one (TensorStore
  quotes it as os_error_code='28'), else the error's first line."""
  if isinstance(error, OSError) and error.errno:
    return os.strerror(error.errno)
  if code := re.search(r"os_error_code='?(\d+)", str(error)):
    return os.strerror(int(code.group(1)))
  for number in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
    if os.strerror(number) in str(error):
      return os.strerror(number)
  return _summary(error)


def _summary(error: Exception) -> str:
  """The first line of an error, shortened: TensorStore's messages run to many lines."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= 200 else text[:197] + '...'


def _get(tree, path):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _without(tree: dict, path) -> dict:
  """`tree` without the leaf at `path`, and without the dicts that leaves empty."""
  head, *rest = path
  if not rest:
    return {k: v for k, v in tree.items() if k != head}
  inner = _without(tree[head], rest)
  return {k: v for k, v in tree.items() if k != head} | ({head: inner} if inner else {})


def _move_back(state: dict, moved) -> dict:
  state = dict(state)
  for old, path in moved:
    value = state.pop(old)
    node = state
    for key in path[:-1]:
      node[key] = dict(node.get(key, {}))
      node = node[key]
    node[path[-1]] = value
  return state


def _key_name(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'params/backbone/conv1/kernel' -> shape, for every array of a state or its metadata."""
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
