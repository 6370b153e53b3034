"""What the command-line programs print: libraries' start-up notices and INFO records kept out of
the console unless --verbosity is given, and the training progress bar.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import traceback

from absl import flags
from absl import logging as absl_logging
from tqdm import tqdm

# absl's C++ INFO line ('I0512 13:02:01.123456   8112 port.cc:153] ...'; before
# absl::InitializeLog(), 'I0000 00:00:1796018809.365773'), and the notice absl prints above the
# first of them.
_NATIVE_INFO = re.compile(r'I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] '
                          r'|WARNING: All log messages before absl::InitializeLog\(\) is called')
_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   package) + os.sep
                      for package in ('fashion_jax', 'data_pipelines'))


def transient_bars() -> bool:
  """Whether bars that are erased when done (embedding, metrics) are drawn: on a terminal only.
  In a log file their carriage-return refreshes would leave one long garbled line."""
  return sys.stderr.isatty()


class _LogProgress:
  """A lasting progress bar's counterpart in a log file: a line at most every `every` seconds,
  and a last one when it closes, unless it closes after a failure (then the error is the last
  line); no carriage-return refreshes."""

  def __init__(self, *, total: int, initial: int = 0, desc: str = '', unit: str = 'it',
               every: float = 30.0):
    self.total, self.n, self.desc, self.unit = total, initial, desc, unit
    self.leave = True
    self._initial, self._every = initial, every
    self._start = self._last = time.monotonic()
    self._closed = False

  def _line(self, *, final: bool) -> None:
    elapsed = time.monotonic() - self._start
    rate = (self.n - self._initial) / max(elapsed, 1e-9)
    done = f'{self.desc}: {self.n:,}/{self.total:,} {self.unit}'
    if final:
      text = f'{done} in {tqdm.format_interval(elapsed)} ({rate:,.1f} {self.unit}/s)'
    else:
      left = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else '?'
      text = (f'{done} ({100 * self.n // max(self.total, 1)}%)  {rate:,.1f} {self.unit}/s  '
              f'ETA {left}')
    print(text, file=sys.stderr, flush=True)

  def update(self, n: int = 1) -> None:
    self.n += n
    if time.monotonic() - self._last >= self._every and self.n < self.total:
      self._last = time.monotonic()
      self._line(final=False)

  def close(self) -> None:
    if not self._closed and self.leave:
      self._line(final=True)
    self._closed = True

  def __enter__(self):
    return self

  def __exit__(self, error_type, *_):
    if error_type is not None:
      self.leave = False
    self.close()


def bar(*, leave: bool = True, enabled: bool = True, log_every_s: float = 30.0, **kwargs):
  """A progress bar on stderr: tqdm's, drawn in place, on a terminal. Elsewhere (a log file, a
  scheduler's output) a transient bar (`leave=False`) is not drawn, and a lasting one writes a
  line at most every `log_every_s` seconds and one when done."""
  if enabled and transient_bars():
    return tqdm(leave=leave, file=sys.stderr, dynamic_ncols=True, **kwargs)
  if enabled and leave:
    return _LogProgress(total=kwargs['total'], initial=kwargs.get('initial', 0),
                        desc=kwargs.get('desc', ''), unit=kwargs.get('unit', 'it'),
                        every=log_every_s)
  return tqdm(disable=True, **kwargs)


_HELP_FLAGS = ('--help', '-help', '-?', '--helpshort', '--helpfull', '--helpxml')


@contextlib.contextmanager
def help_exits_zero(argv: list[str]):
  """Around absl's flag parsing: absl ends --help with status 1, as for an error; asking for
  help succeeds (status 0)."""
  try:
    yield
  except SystemExit as e:
    if e.code == 1 and any(arg.split('=', 1)[0] in _HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)
    raise


def verbosity_requested(argv: list[str]) -> bool:
  """Whether the command line asks for the libraries' logs: absl's --verbosity (-v), as absl
  spells it, at 0 (INFO) or more. A value absl refuses (--verbosity=abc) is its error to report,
  without TensorFlow's start-up lines before it; a negative one asks for fewer lines."""
  for i, arg in enumerate(argv[1:], start=1):
    if match := re.match(r'-{1,2}(?:v|verbosity)(=|$)', arg):
      value = arg[match.end():] if match.group(1) else next(iter(argv[i + 1:]), '')
      if re.fullmatch(r'\s*\d+\s*', value):
        return True
  return False


def quiet_start(argv: list[str] = (), *, tensorflow: bool = True) -> None:
  """Keeps TensorFlow's C++ start-up notices off the console. Call before TF or JAX is imported.

  TF_CPP_MIN_LOG_LEVEL=1 drops the C++ INFO lines of TensorFlow and XLA, but not the oneDNN
  notice (and absl's 'All log messages before absl::InitializeLog()' line above it): TensorFlow
  prints it while its shared library loads, before it reads that variable, and the notice has no
  switch of its own (TF_ENABLE_ONEDNN_OPTS=0 would silence it by changing the numerics). So
  TensorFlow is imported here with native stderr captured, and whatever it printed apart from
  INFO lines is printed again. Nothing changes with --verbosity or TF_CPP_MIN_LOG_LEVEL=0.
  """
  if argv and verbosity_requested(argv):
    return
  if os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1') == '0':
    return
  if tensorflow and 'tensorflow' not in sys.modules:
    # TensorFlow gives its logger a handler of its own when the root logger has none yet, which
    # would print its records a second time, past absl's; absl's handler is the one app.run sets.
    absl_logging.use_absl_handler()
    with _native_info_dropped():
      try:
        import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      except ImportError:
        pass  # the JAX side runs without TensorFlow; whoever needs it reports it missing


@contextlib.contextmanager
def _native_info_dropped():
  """Captures file descriptor 2 (C++ writes there, not to sys.stderr) and prints again, once the
  block is over, every line but absl's C++ INFO lines."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode(errors='replace')
      sys.stderr.write(''.join(line for line in text.splitlines(keepends=True)
                               if not _NATIVE_INFO.match(line)))
      sys.stderr.flush()


_ORBAX = f'{os.sep}orbax{os.sep}'


def _failed_orbax_save(record: logging.LogRecord) -> bool:
  """A traceback of a failed background save, logged by each Orbax thread it passed through,
  and by asyncio for each of its writes that failed alike ('Task exception was never
  retrieved'): the save's caller gets the error, which the program reports in one line."""
  if _ORBAX in record.pathname:
    return bool(record.exc_info)
  if record.name != 'asyncio' or 'exception was never retrieved' not in record.getMessage():
    return False
  if 'orbax' in record.getMessage():  # the coroutine's file, the checkpoint's folder
    return True
  trace = record.exc_info[2] if record.exc_info else None
  return any(_ORBAX in frame.filename for frame, _ in traceback.walk_tb(trace))


class _LibraryNoise(logging.Filter):
  """Drops Orbax's tracebacks of a failed save (its caller reports it), and two kinds of
  libraries' warnings: that an API they call is deprecated (TFDS's `TensorInfo.dtype`,
  TensorFlow's map_fn `dtype`), notes to their developers that nobody running this can act on;
  and TFDS's "Variant folder ... has no dataset_info.json" for a dataset not built, which our
  own error then names with the command that builds it."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and _failed_orbax_save(record):
      return False
    if record.levelno != logging.WARNING or record.pathname.startswith(_PROJECT_DIRS):
      return True
    message = record.getMessage()
    return not ('deprecated' in message or (
        message.startswith('Variant folder ') and message.endswith('has no dataset_info.json')
        and 'tensorflow_datasets' in record.pathname))


_NOISE = _LibraryNoise()


def set_verbosity(process_index: int = 0, *, requested: bool | None = None) -> None:
  """Libraries' INFO records off (absl, orbax, TensorFlow, clu, jax all log through Python's
  logging), unless --verbosity was given; on processes other than 0, errors only. Call after absl
  has parsed the flags, or pass `requested` (a program with its own arguments)."""
  if flags.FLAGS['verbosity'].present if requested is None else requested:
    return
  absl_logging.set_verbosity(absl_logging.ERROR if process_index else absl_logging.WARNING)
  handler = absl_logging.get_absl_handler()
  if _NOISE not in handler.filters:
    handler.addFilter(_NOISE)


def path_error(error: OSError) -> str:
  """One line for an OSError about a file or folder the user named ("cannot use runs/x: File
  exists"). One whose `filename` is None names no path: that is not the user's to fix."""
  return f'cannot use {error.filename}: {error.strerror or type(error).__name__}'


def print_result(line: str) -> None:
  """Prints a line of results (stdout) without breaking a progress bar on the terminal."""
  tqdm.write(line, file=sys.stdout)
  sys.stdout.flush()


class TrainingProgress:
  """The training phase's progress on stderr: step, epoch, loss, steps/s and time left.

  On a terminal one bar refreshed in place; otherwise (a log file, a scheduler's output) one line
  per `update` that brings a loss, since refreshes by carriage return make such files unreadable.
  Time spent in a `paused()` block (evaluations) counts in neither steps/s nor the time left.
  """

  def __init__(self, *, total_steps: int, steps_per_epoch: int, start_step: int,
               enabled: bool = True, stream=None):
    self._stream = stream or sys.stderr
    self._total, self._per_epoch = total_steps, steps_per_epoch
    self._enabled = enabled
    self._bar = None
    if enabled and self._stream.isatty():
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step', file=self._stream,
                       desc=self._epoch(start_step + 1), dynamic_ncols=True)
    self._since, self._since_step = time.monotonic(), start_step
    self._first = True

  def _epoch(self, step: int) -> str:
    epochs = -(-self._total // self._per_epoch)
    return f'epoch {min(epochs, (step - 1) // self._per_epoch + 1)}/{epochs}'

  def update(self, step: int, loss: float | None = None) -> None:
    """Step `step` is done; `loss` on the steps whose metrics were fetched."""
    if self._bar is not None:
      self._bar.set_description_str(self._epoch(step), refresh=False)
      if loss is not None:
        self._bar.set_postfix_str(f'loss {loss:.4f}', refresh=False)
      self._bar.update(step - self._bar.n)
    elif self._enabled and self._first:
      # The first step of a run compiles it: steps/s and the time left are measured from its
      # end, or they would count the compilation as if every step took part of it.
      self._first = False
      if loss is not None:
        print(f'step {step}/{self._total}  {self._epoch(step)}  loss {loss:.4f}  (compiled in '
              f'{tqdm.format_interval(time.monotonic() - self._since)})', file=self._stream,
              flush=True)
      self._since, self._since_step = time.monotonic(), step
    elif self._enabled and loss is not None:
      now = time.monotonic()
      rate = (step - self._since_step) / max(now - self._since, 1e-9)
      left = tqdm.format_interval((self._total - step) / rate) if rate > 0 else '?'
      print(f'step {step}/{self._total}  {self._epoch(step)}  loss {loss:.4f}  '
            f'{rate:.2f} steps/s  ETA {left}', file=self._stream, flush=True)
      self._since, self._since_step = now, step

  @contextlib.contextmanager
  def paused(self):
    start = time.monotonic()
    try:
      yield
    finally:
      self._since += time.monotonic() - start
      if self._bar is not None:
        self._bar.unpause()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
