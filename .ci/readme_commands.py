#!/usr/bin/env python3
"""Runs the commands of README.md as a user types them, so that the README stays true.

  python3 .ci/readme_commands.py [--list] [--skip-tests]

From the repository root, in the README's order: each command of every ```bash block (a line,
or lines joined by a trailing backslash; comment lines dropped) and each command the prose
quotes in a code span starting with python, python3, tensorboard or .venv/bin/ (run as in an
activated virtual environment: .venv/bin first on PATH). A block whose line before the fence is
`<!-- not run in CI: <why> -->` (readers do not see it) is listed, not run. Servers are started
in the background, probed over HTTP and stopped with Ctrl-C: the search service (/readyz, its
page, one POST /api/search with the first photo an earlier command names) and TensorBoard (its
page, the runs it found). The first command that fails ends the run with a line naming it and
exit status 1. Standard library only.
"""

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_TIMEOUT_S = 45 * 60  # the demo takes ~4 min on 2 cores; this only catches a hang
SERVER_START_TIMEOUT_S = 5 * 60  # loading, restoring the checkpoint and compiling
SERVER_STOP_TIMEOUT_S = 60

_FENCE = re.compile(r'^\s*(`{3,}|~{3,})\s*([\w+-]*)')
_SHELL = ('bash', 'sh', 'shell')
_SKIP_MARKER = re.compile(r'^\s*<!--\s*not run in CI:\s*(.*?)\s*-->\s*$')
_HEADING = re.compile(r'^#{1,6}\s+(.*?)\s*#*\s*$')
_SPAN = re.compile(r'`([^`]+)`')
_PROSE_PROGRAMS = ('python', 'python3', 'tensorboard')
_IMAGE = re.compile(r'[\w./-]+\.(?:jpe?g|png|webp)\b', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Command:
  """One command of the README: its text as written and where it is."""
  text: str           # as written; a continued command keeps its backslash-newlines
  line: int           # README line where it starts
  section: str        # the heading above it
  in_prose: bool = False  # quoted in a paragraph (runs as in an activated venv)
  skip_reason: str = ''   # from the block's `not run in CI` marker

  @property
  def one_line(self) -> str:
    return ' '.join(self.text.replace('\\\n', ' ').split())

  @property
  def segments(self) -> list[list[str]]:
    """The words of each command the line chains with &&."""
    return [shlex.split(part) for part in re.split(r'\s*&&\s*', self.one_line)]

  @property
  def modules(self) -> list[str]:
    """The modules it runs with `-m`, in order."""
    return [words[words.index('-m') + 1] for words in self.segments
            if '-m' in words[:-1]]

  @property
  def program(self) -> str:
    """What it is for: the module of its last segment, else that segment's program."""
    last = self.segments[-1]
    return last[last.index('-m') + 1] if '-m' in last[:-1] else os.path.basename(last[0])


def readme_commands(text: str) -> list[Command]:
  """The commands of a README, in order (see the module docstring for what counts)."""
  commands, section, paragraph = [], '', []
  fence = language = marker = None
  block = []

  def end_paragraph():
    if paragraph:
      commands.extend(_prose_commands(paragraph, section))
      paragraph.clear()

  for number, line in enumerate(text.splitlines(), start=1):
    if fence:
      if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
        if language in _SHELL:
          commands.extend(Command(body, start, section, skip_reason=marker or '')
                          for start, body in _block_commands(block))
        elif marker:
          raise ValueError(f'line {block_line}: a "not run in CI" marker before a block that '
                           f'is not bash')
        fence = marker = None
        block = []
      else:
        block.append((number, line))
      continue
    if match := _FENCE.match(line):
      end_paragraph()
      fence, language, block_line = match.group(1), match.group(2).lower(), number
      continue
    if marker and line.strip():
      raise ValueError(f'line {number}: a "not run in CI" marker must be followed by a '
                       '```bash block')
    if match := _SKIP_MARKER.match(line):
      end_paragraph()
      marker = match.group(1) or 'marked not to run'
    elif match := _HEADING.match(line):
      end_paragraph()
      section = match.group(1)
    elif not line.strip():
      end_paragraph()
    else:
      paragraph.append((number, line))
  if fence:
    raise ValueError(f'line {block_line}: a code block that is never closed')
  if marker:
    raise ValueError('a "not run in CI" marker must be followed by a ```bash block')
  end_paragraph()
  return commands


def _block_commands(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
  """(first line, text) of each command of a shell block."""
  found, current, start = [], [], None
  for number, line in lines:
    if not current and (not line.strip() or line.strip().startswith('#')):
      continue
    start = start or number
    current.append(line.strip() if not current else line)
    if not line.rstrip().endswith('\\'):
      found.append((start, '\n'.join(current)))
      current, start = [], None
  if current:
    raise ValueError(f'line {start}: the command ends with a line continuation')
  return found


def _prose_commands(paragraph: list[tuple[int, str]], section: str) -> list[Command]:
  text = '\n'.join(line for _, line in paragraph)
  found = []
  for match in _SPAN.finditer(text):
    span = ' '.join(match.group(1).split())
    first = span.split()[0]
    if first in _PROSE_PROGRAMS or first.startswith('.venv/bin/'):
      line = paragraph[0][0] + text.count('\n', 0, match.start())
      found.append(Command(span, line, section, in_prose=True))
  return found


# Running them.

class Failed(Exception):
  """A command failed: the message says how."""


def _activated_env() -> dict:
  venv = os.path.join(ROOT, '.venv')
  env = dict(os.environ, VIRTUAL_ENV=venv)
  env['PATH'] = os.pathsep.join([os.path.join(venv, 'bin'), env.get('PATH', '')])
  return env


def _default_sigint() -> None:
  # Servers are stopped with Ctrl-C. A shell starts a background job (CI's, say) with SIGINT
  # ignored, which its children inherit, and then nothing they start would stop on it.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: Command, env: dict, **kwargs) -> subprocess.Popen:
  sys.stdout.flush()
  # A session of its own, so the command and everything it starts are stopped together.
  return subprocess.Popen(['bash', '-o', 'pipefail', '-c', command.text], cwd=ROOT, env=env,
                          start_new_session=True, preexec_fn=_default_sigint, **kwargs)


def _stop(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
  try:
    os.killpg(process.pid, sig)
  except ProcessLookupError:
    pass


def run_to_end(command: Command, env: dict) -> str:
  """Runs a command to its end, its output echoed; a training run's console is checked too."""
  training = command.program == 'fashion_jax.main'
  process = _start(command, env, **({'stdout': subprocess.PIPE, 'stderr': subprocess.STDOUT}
                                    if training else {}))
  output = []
  if training:
    # Echoed as it comes; the console check needs it whole.
    reader = threading.Thread(target=_echo_into, args=(process.stdout, output), daemon=True)
    reader.start()
  try:
    status = process.wait(timeout=COMMAND_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    raise Failed(f'still running after {COMMAND_TIMEOUT_S // 60} min') from None
  finally:
    _stop(process)
  if training:
    reader.join(timeout=60)
  if status:
    raise Failed(f'exit status {status}')
  return check_training_console(b''.join(output).decode(errors='replace')) if training else ''


def _echo_into(stream, chunks: list) -> None:
  for chunk in iter(lambda: stream.read1(1 << 16), b''):
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    chunks.append(chunk)


# What a training run promises to print by default (fashion_jax/console.py): its setup in a few
# lines from the 'JAX ...' line on, a progress bar (refreshed in place on a terminal, one
# 'step n/N  epoch ...' line per logging step otherwise), a line per evaluation, and no INFO
# records from the libraries (absl's format, from Python or C++).
_TRAINING_STARTS = re.compile(r'^JAX \S+ ', re.MULTILINE)
_PROGRESS_LINE = re.compile(r'^step \d+/\d+  epoch ')
_INFO_RECORD = re.compile(r'I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]')
_MOST_TRAINING_LINES = 40


def check_training_console(output: str) -> str:
  """A note on a training run's console (lines shown apart from progress), or Failed when it
  shows an INFO record or too many lines. Output before the run's first line (pip's) is not
  the run's."""
  start = _TRAINING_STARTS.search(output)
  if start is None:
    raise Failed("the training run printed no 'JAX ...' setup line")
  lines = (line.rsplit('\r', 1)[-1].strip() for line in output[start.start():].split('\n'))
  shown = [line for line in lines if line and not _PROGRESS_LINE.match(line)]
  records = [line for line in shown if _INFO_RECORD.search(line)]
  if records:
    raise Failed(f'the training console shows {len(records)} INFO record(s), e.g. {records[0]}')
  if len(shown) >= _MOST_TRAINING_LINES:
    raise Failed(f'the training console shows {len(shown)} lines apart from progress '
                 f'(at most {_MOST_TRAINING_LINES - 1})')
  return f'console: {len(shown)} lines apart from progress, no INFO record'


def _get(url: str, data: bytes | None = None, timeout: float = 120) -> tuple[int, str, bytes]:
  request = urllib.request.Request(url, data=data, headers={
      'Content-Type': 'application/octet-stream'} if data is not None else {})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as answer:
      return answer.status, answer.headers.get('Content-Type', ''), answer.read()
  except urllib.error.HTTPError as error:
    return error.code, error.headers.get('Content-Type', ''), error.read()
  except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
    return 0, '', str(error).encode()


def _expect_page(base: str) -> str:
  status, kind, _ = _get(base + '/')
  if status != 200 or 'text/html' not in kind:
    raise Failed(f'GET {base}/ answered {status} {kind or "(no content type)"}')
  return f'GET / {status} {kind.split(";")[0]}'


def _probe_search(base: str, earlier: list[Command]) -> list[str]:
  photos = [path for command in earlier for path in _IMAGE.findall(command.one_line)
            if os.path.isfile(os.path.join(ROOT, path))]
  if not photos:
    raise Failed('no photo to search with: no earlier command names an image file that exists')
  with open(os.path.join(ROOT, photos[0]), 'rb') as f:
    status, _, body = _get(base + '/api/search', data=f.read())
  if status != 200:
    raise Failed(f'POST /api/search with {photos[0]} answered {status}: {body[:300]!r}')
  results = json.loads(body)['results']
  if not results:
    raise Failed(f'POST /api/search with {photos[0]} found no product')
  best = results[0]
  return [_expect_page(base),
          f"POST /api/search {photos[0]} 200: {len(results)} products, first "
          f"{best['product_id']} ({best['category']}, score {best['score']:.4f})"]


def _probe_tensorboard(base: str, earlier: list[Command]) -> list[str]:
  page = _expect_page(base)
  deadline = time.monotonic() + 60  # it reads the event files in the background
  while True:
    status, _, body = _get(base + '/data/runs', timeout=10)
    runs = json.loads(body) if status == 200 else []
    if runs:
      return [page, f'GET /data/runs 200: {len(runs)} run{"s" * (len(runs) > 1)} '
                    f'({", ".join(runs[:4])})']
    if time.monotonic() > deadline:
      raise Failed(f'TensorBoard found no runs in 60 s (/data/runs: {status} {body[:200]!r})')
    time.sleep(2)


@dataclasses.dataclass(frozen=True)
class Server:
  """A README command that serves until stopped: how to know it and to check it works."""
  pattern: str  # searched in the command
  url: str      # the line it prints once listening; group 1: the base URL
  ready: str    # the path that answers 200 once it is ready
  probe: Callable[[str, list[Command]], list[str]]  # (base URL, earlier commands) -> checks
  missing: str = ''  # when its program may be absent: what to say instead of failing


SERVERS = (
    Server(r'-m\s+fashion_jax\.search\s+serve\b', r'^serving .* on (http://[^/\s]+)/',
           '/readyz', _probe_search),
    Server(r'(^|&&\s*)tensorboard\b', r'^TensorBoard .* at (http://[^/\s]+)/',
           '/data/environment',
           _probe_tensorboard,
           missing='tensorboard is not installed here (the data extra brings it)'),
)


def server_of(command: Command) -> Server | None:
  return next((s for s in SERVERS if re.search(s.pattern, command.one_line)), None)


def run_server(command: Command, server: Server, env: dict, earlier: list[Command]) -> str:
  """Starts it, waits for the URL it prints, probes it, stops it with Ctrl-C."""
  process = _start(command, dict(env, PYTHONUNBUFFERED='1'), stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, text=True, errors='replace', bufsize=1)
  url = threading.Event()
  found = []

  def echo():
    for line in process.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      if not found and (match := re.search(server.url, line)):
        found.append(match.group(1).replace('0.0.0.0', '127.0.0.1'))
        url.set()
    url.set()

  reader = threading.Thread(target=echo, daemon=True)
  reader.start()
  try:
    if not url.wait(SERVER_START_TIMEOUT_S) or not found:
      try:  # its output has ended, its exit may take a moment to be seen
        status = process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        raise Failed(f'printed no URL in {SERVER_START_TIMEOUT_S} s') from None
      raise Failed(f'ended with exit status {status} before serving')
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while (status := _get(found[0] + server.ready, timeout=10)[0]) != 200:
      if process.poll() is not None:
        raise Failed(f'ended with exit status {process.returncode} before it was ready')
      if time.monotonic() > deadline:
        raise Failed(f'{server.ready} still answers {status} after {SERVER_START_TIMEOUT_S} s')
      time.sleep(1)
    print(f'--- GET {server.ready} 200', flush=True)
    for check in server.probe(found[0], earlier):
      print(f'--- {check}', flush=True)
    _stop(process, signal.SIGINT)
    try:
      status = process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      raise Failed(f'still running {SERVER_STOP_TIMEOUT_S} s after Ctrl-C') from None
    if status not in (0, -signal.SIGINT, 128 + signal.SIGINT):
      raise Failed(f'exit status {status} on Ctrl-C')
    reader.join(timeout=10)
    return f'{found[0]} answered, then stopped by Ctrl-C'
  finally:
    _stop(process)


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(round(seconds), 60)
  return f'{minutes} min {seconds:02d} s' if minutes else f'{seconds} s'


def _where(command: Command, readme: str) -> str:
  return f'{os.path.relpath(readme, ROOT)}:{command.line}'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--readme', default=os.path.join(ROOT, 'README.md'),
                      help='the file to read (default: README.md)')
  parser.add_argument('--list', action='store_true', help='list the commands, run nothing')
  parser.add_argument('--skip-tests', action='store_true',
                      help='not the command that runs pytest (.ci/run has just run it)')
  args = parser.parse_args(argv)
  with open(args.readme, encoding='utf-8') as f:
    commands = readme_commands(f.read())
  start, report = time.monotonic(), []
  for position, command in enumerate(commands):
    where = _where(command, args.readme)
    server = server_of(command)
    env = _activated_env() if command.in_prose else dict(os.environ)
    reason = command.skip_reason
    if not reason and args.skip_tests and 'pytest' in command.modules:
      reason = 'the tests: .ci/run runs them'
    if not reason and server and server.missing and not shutil.which(
        command.segments[-1][0], path=env['PATH']):
      reason = server.missing
    kind = 'server' if server else 'in prose' if command.in_prose else 'block'
    if args.list:
      print(f'{where:<16} {command.section[:24]:<24} {"skipped" if reason else kind:<8} '
            f'{command.one_line}')
      continue
    print(f'\n=== {where} ({command.section}){" [skipped]" if reason else ""}\n'
          f'$ {command.one_line}', flush=True)
    if reason:
      print(f'--- skipped: {reason}')
      report.append(('skipped', '', where, command, reason))
      continue
    began = time.monotonic()
    try:
      note = (run_server(command, server, env, commands[:position]) if server
              else run_to_end(command, env))
    except Failed as failure:
      print(f'\nFAILED {where}: {command.one_line}\n  {failure}', flush=True)
      return 1
    taken = _duration(time.monotonic() - began)
    print(f'--- ok in {taken}' + (f': {note}' if note else ''), flush=True)
    report.append(('ok', taken, where, command, note))
  if args.list:
    return 0
  ran = sum(status == 'ok' for status, *_ in report)
  print(f'\nREADME commands: {ran} ran, {len(report) - ran} skipped, none failed, in '
        f'{_duration(time.monotonic() - start)}')
  for status, taken, where, command, note in report:
    print(f'  {status:<8} {taken:>12}  {where:<14} {command.program}'
          + (f': {note}' if status == 'skipped' else ''))
  return 0


if __name__ == '__main__':
  sys.exit(main())
