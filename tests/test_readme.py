"""README.md's commands: what .ci/readme_commands.py finds and runs (CI runs them all), and that
each `python -m` module the README names imports and accepts the flags it is given there."""

import importlib.util
import os
import re
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location(
      'readme_commands', os.path.join(REPO, '.ci', 'readme_commands.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


readme_commands = _script()
with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
  COMMANDS = readme_commands.readme_commands(f.read())

QUICK, REAL, SEARCH = 'Quick start', 'Training on the real datasets', 'Visual search'


def test_the_commands_found_in_the_readme_in_order():
  # (section, what it runs, where it is written, whether CI runs it)
  assert [(c.section, c.program, 'prose' if c.in_prose else 'block', not c.skip_reason)
          for c in COMMANDS] == [
      (QUICK, 'fashion_jax.main', 'block', True),
      (QUICK, 'pytest', 'block', True),
      (QUICK, 'tensorboard', 'prose', True),
      (QUICK, 'fashion_jax.sweep', 'prose', True),
      (REAL, 'data_pipelines.build', 'block', False),
      (REAL, 'fashion_jax.convert_weights', 'block', False),
      (REAL, 'fashion_jax.main', 'block', False),
      (SEARCH, 'pip', 'block', True),
      (SEARCH, 'fashion_jax.search', 'block', True),
      (SEARCH, 'data_pipelines.show', 'block', True),
      (SEARCH, 'fashion_jax.search', 'block', True),
      (SEARCH, 'fashion_jax.search', 'block', True),
      (SEARCH, 'fashion_jax.search', 'block', True),
  ]
  servers = [c.one_line for c in COMMANDS if readme_commands.server_of(c)]
  assert servers == ['tensorboard --logdir runs/demo',
                     '.venv/bin/python -m fashion_jax.search serve --index runs/demo_index']


def test_only_the_real_datasets_block_is_left_out():
  skipped = [c for c in COMMANDS if c.skip_reason]
  assert {c.section for c in skipped} == {REAL}
  assert all('download' in c.skip_reason for c in skipped)
  assert [c for c in COMMANDS if c.section == REAL] == skipped
  assert '--manual_dir=/data/street2shop' in skipped[0].one_line
  # A continued command is one command, kept as written.
  assert skipped[2].text.count('\\\n') == 1
  assert skipped[2].one_line.endswith('--config.model.pretrained=weights/r50ibna')


def test_ci_runs_the_readme_test_command_then_every_other_command():
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    lines = [line.strip() for line in f]
  tests = next(c for c in COMMANDS if 'pytest' in c.modules)
  assert tests.text in lines, "README's test command is not a line of .ci/run"
  assert lines.index(tests.text) < lines.index('python3 .ci/readme_commands.py --skip-tests')


def test_the_extras_the_readme_installs_exist():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    extras = set(tomllib.load(f)['project']['optional-dependencies'])
  named = {extra for c in COMMANDS for words in c.segments if 'pip' in words[0]
           for word in words if word.startswith('.[')
           for extra in word[2:-1].split(',')}
  assert named == {'data', 'test', 'search'}
  assert named <= extras


# Runs a module as `python -m` does, stopping as soon as its arguments are parsed (a complete
# argparse parse, as pytest's, or absl's app.run): exit 0 when they parse, the module's own usage
# error otherwise. Nothing else runs.
_PARSE_ONLY = '''
import argparse, runpy, sys
from absl import app

class Parsed(BaseException):
  pass

def stop_after(parse):
  def parse_and_stop(self, *args, **kwargs):
    parse(self, *args, **kwargs)
    raise Parsed
  return parse_and_stop
for name in ('parse_args', 'parse_intermixed_args'):
  setattr(argparse.ArgumentParser, name, stop_after(getattr(argparse.ArgumentParser, name)))

def run(main, argv=None, flags_parser=app.parse_flags_with_usage):
  flags_parser(sys.argv if argv is None else argv)
  raise Parsed
app.run = run

sys.argv = sys.argv[1:]
try:
  runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
except Parsed:
  sys.exit(0)
sys.exit(f'{sys.argv[0]} ended without parsing arguments with argparse or absl')
'''


def _module_runs():
  for command in COMMANDS:
    for words in command.segments:
      if '-m' in words[:-1] and words[words.index('-m') + 1] != 'venv':
        module_args = words[words.index('-m') + 1:]
        yield pytest.param(module_args, id=f'README.md:{command.line}:{module_args[0]}')


@pytest.mark.parametrize('module_args', list(_module_runs()))
def test_each_module_parses_the_flags_the_readme_gives_it(module_args):
  result = subprocess.run([sys.executable, '-c', _PARSE_ONLY, *module_args], cwd=REPO,
                          capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_a_module_with_bad_flags_fails_the_parse_check():
  result = subprocess.run([sys.executable, '-c', _PARSE_ONLY, 'data_pipelines.show',
                           'fashion_synth/demo', '--split', 'query', '--limit', 'many'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "--limit: invalid int value: 'many'" in result.stderr


SAMPLE = '''# Title

Install with `pip install x`, then `python -m pkg.tool --flag a
--other b`; see `runs/out/` and `tensorboard --logdir runs/out`.

```bash
# a comment
.venv/bin/python -m pkg.first \\
    --long value

echo two && echo three
```

```
not a command
```

## Later

<!-- not run in CI: needs a licence -->
```sh
fetch --everything
```

```python
print('not shell')
```
'''


def test_extraction_of_a_sample_readme():
  found = readme_commands.readme_commands(SAMPLE)
  assert [(c.line, c.section, c.in_prose, c.skip_reason, c.text) for c in found] == [
      (3, 'Title', True, '', 'python -m pkg.tool --flag a --other b'),
      (4, 'Title', True, '', 'tensorboard --logdir runs/out'),
      (8, 'Title', False, '', '.venv/bin/python -m pkg.first \\\n    --long value'),
      (11, 'Title', False, '', 'echo two && echo three'),
      (22, 'Later', False, 'needs a licence', 'fetch --everything'),
  ]
  assert found[2].one_line == '.venv/bin/python -m pkg.first --long value'
  assert found[3].segments == [['echo', 'two'], ['echo', 'three']]


@pytest.mark.parametrize('text, message', [
    ('<!-- not run in CI: x -->\ntext\n```bash\nls\n```\n', 'line 2: a "not run in CI" marker'),
    ('<!-- not run in CI: x -->\n```\nls\n```\n', 'not bash'),
    ('text\n\n<!-- not run in CI: x -->\n', 'must be followed by a ```bash block'),
    ('```bash\nls\n', 'line 1: a code block that is never closed'),
    ('```bash\nls \\\n```\n', 'line 2: the command ends with a line continuation'),
])
def test_readme_mistakes_are_refused(text, message):
  with pytest.raises(ValueError, match=message):
    readme_commands.readme_commands(text)


def test_a_failing_command_stops_the_run_and_is_named(tmp_path, capfd):
  readme = tmp_path / 'README.md'
  readme.write_text('# Try\n\n```bash\necho first-ran\nfalse\necho never-ran\n```\n\n'
                    '<!-- not run in CI: elsewhere -->\n```bash\necho skipped-ran\n```\n')
  assert readme_commands.main(['--readme', str(readme)]) == 1
  out = capfd.readouterr().out
  assert 'first-ran' in out and 'never-ran' not in out
  assert out.strip().splitlines()[-2].endswith('README.md:5: false')
  assert out.strip().splitlines()[-1].strip() == 'exit status 1'


def test_a_run_that_passes_reports_each_command(tmp_path, capfd):
  readme = tmp_path / 'README.md'
  readme.write_text('# Try\n\n```bash\necho first-ran\n```\n\n'
                    '<!-- not run in CI: elsewhere -->\n```bash\necho skipped-ran\n```\n')
  assert readme_commands.main(['--readme', str(readme)]) == 0
  out = capfd.readouterr().out
  assert 'first-ran' in out and 'skipped-ran' not in out.replace('$ echo skipped-ran', '')
  assert 'README commands: 1 ran, 1 skipped, none failed' in out


def _http_server(probe=lambda base, earlier: [f'probed {base}']):
  # Python's own file server: prints its URL once listening, exits 0 on Ctrl-C.
  return readme_commands.Server(r'http\.server', r'\((http://[^/\s]+)/\)', '/', probe)


def test_a_server_is_started_probed_and_stopped_with_ctrl_c(capfd):
  command = readme_commands.Command(
      f'{sys.executable} -m http.server 0 --bind 127.0.0.1', 1, 'Serve')
  note = readme_commands.run_server(command, _http_server(), dict(os.environ), [])
  out = capfd.readouterr().out
  assert re.search(r'^--- probed http://127\.0\.0\.1:\d+$', out, re.M)
  assert note.endswith('answered, then stopped by Ctrl-C')
  assert 'Keyboard interrupt received, exiting' in out


def test_a_server_that_fails_its_probe_or_never_serves_fails():
  def refuse(base, earlier):
    raise readme_commands.Failed('the probe refused')
  serve = readme_commands.Command(f'{sys.executable} -m http.server 0 --bind 127.0.0.1', 1, 'S')
  with pytest.raises(readme_commands.Failed, match='the probe refused'):
    readme_commands.run_server(serve, _http_server(refuse), dict(os.environ), [])
  crash = readme_commands.Command(f'{sys.executable} -c "import sys; sys.exit(3)"', 1, 'S')
  with pytest.raises(readme_commands.Failed, match='ended with exit status 3 before serving'):
    readme_commands.run_server(crash, _http_server(), dict(os.environ), [])


_SETUP = ('JAX 0.9.0: 2 cpu devices in 1 process\n'
          'fashion_synth/demo/1.0.0: 300 training identities; 360 query and 348 gallery items\n')


def test_the_training_console_check():
  progress = ''.join(f'step {n}/570  epoch {n // 19}/30  loss 5.1\n' for n in range(0, 570, 10))
  quiet = ('Requirement already satisfied: jax\n' * 50 + _SETUP + progress +
           'step 570: mAP 0.4695  mINP 0.4110\ndone: step 570 in 3 min 2 s\n')
  assert readme_commands.check_training_console(quiet) == (
      'console: 4 lines apart from progress, no INFO record')
  record = 'I1130 08:10:01.123456 1401 checkpoint_manager.py:12] saved\n'
  with pytest.raises(readme_commands.Failed, match='1 INFO record'):
    readme_commands.check_training_console(_SETUP + record + progress)
  with pytest.raises(readme_commands.Failed, match='41 lines apart from progress'):
    readme_commands.check_training_console(_SETUP + 'a warning\n' * 39)
  with pytest.raises(readme_commands.Failed, match='no .JAX'):
    readme_commands.check_training_console('Traceback (most recent call last):\n')
  # A terminal's refreshes: only the last state of a carriage-returned line counts.
  assert readme_commands.check_training_console(
      _SETUP + 'step 1/5  epoch 0/1\rstep 2/5  epoch 0/1\rdone\n').startswith('console: 3 lines')
