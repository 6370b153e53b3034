"""The console of a run: its setup, a progress bar, a line per evaluation and nothing from the
libraries unless --verbosity asks for it."""

import io
import os
import re
import subprocess
import sys
import time

import pytest

from fashion_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An INFO record as absl prints it, from Python ('I0512 13:02:01.123456 1401 file.py:12]') or C++.
_INFO_RECORD = re.compile(r'I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]')


def _main(*args, workdir, data_dir):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # the tests' own setting would hide what users see
  result = subprocess.run(
      [sys.executable, '-m', 'fashion_jax.main', '--config', 'tests/tiny_config.py',
       f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}', *args],
      cwd=REPO, env=env, capture_output=True, timeout=600)
  # Decoded by hand: text=True would turn the progress bars' carriage returns into line breaks.
  result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
  return result


def _shown(text: str) -> list[str]:
  """The lines a terminal would end up showing: a progress bar's refreshes (carriage returns)
  leave only their last state, blank lines none."""
  lines = (line.rsplit('\r', 1)[-1].strip() for line in text.split('\n'))
  return [line for line in lines if line]


def test_run_prints_setup_progress_and_results_only(tiny_data_dir, tmp_path):
  result = _main(workdir=tmp_path / 'run', data_dir=tiny_data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  shown = _shown(result.stdout) + _shown(result.stderr)
  assert len(shown) < 40, '\n'.join(shown)
  assert not [line for line in shown if _INFO_RECORD.search(line)], '\n'.join(shown)
  assert 'oneDNN' not in result.stderr and 'absl::InitializeLog' not in result.stderr
  assert 'deprecated' not in result.stderr
  out = result.stdout.split('\n')[:-1]
  assert out[0].startswith('JAX ') and ' cpu devices in 1 process' in out[0]
  assert out[1].startswith('fashion_synth/tiny/1.0.0: 16 training identities; 8 query and 11 '
                           'gallery items')
  assert out[2].startswith('4 steps: 2 epochs of 2, batch 16 (8 identities x 2)')
  assert [line.split(':')[0] for line in out if line.startswith('step ')] == ['step 0', 'step 4']
  assert out[-1].startswith('done: step 4 in ')
  # Not a terminal: one line per logging step (the tiny config logs every step).
  progress = [line for line in shown if re.match(r'step \d/4  epoch \d/2  loss \d', line)]
  assert len(progress) == 4, '\n'.join(shown)

  # A dataset not built: our one line, which names the build command; no TFDS warning first.
  unbuilt = _main('--config.dataset.name=street2shop', workdir=tmp_path / 'unbuilt',
                  data_dir=tmp_path / 'empty')
  assert unbuilt.returncode == 2
  assert (len(_shown(unbuilt.stderr)) == 1 and
          _shown(unbuilt.stderr)[0].startswith("error: dataset 'street2shop' ") and
          'data_pipelines.build street2shop' in unbuilt.stderr), unbuilt.stderr

  verbose = _main('--verbosity=0', '--mode=evaluate', workdir=tmp_path / 'run',
                  data_dir=tiny_data_dir)
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  records = [line for line in verbose.stderr.split('\n') if _INFO_RECORD.search(line)]
  assert any('checkpoint' in line for line in records), verbose.stderr[-3000:]


def test_native_info_lines_are_dropped_and_the_rest_kept(capfd):
  with console._native_info_dropped():
    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written '
                b'to STDERR\nI0000 00:00:1796018809.365773   14333 port.cc:153] oneDNN custom '
                b'operations are on.\nE0000 00:00:1796018809.4   14333 x.cc:1] a real error\n')
  err = capfd.readouterr().err
  assert err == 'E0000 00:00:1796018809.4   14333 x.cc:1] a real error\n'


def test_verbosity_is_found_in_every_spelling_absl_takes():
  assert console.verbosity_requested(['main', '--verbosity=1'])
  assert console.verbosity_requested(['main', '-v', '0'])
  assert console.verbosity_requested(['main', '--v=1'])
  assert not console.verbosity_requested(['main', '--config.eval.verification_fprs=(1e-3,)'])
  assert not console.verbosity_requested(['main', '--workdir=-v'])
  # absl refuses these itself, or they ask for fewer lines: TensorFlow's start-up lines stay off.
  assert not console.verbosity_requested(['main', '--verbosity=abc'])
  assert not console.verbosity_requested(['main', '--verbosity=-1'])
  assert not console.verbosity_requested(['main', '-v'])


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_on_a_terminal_and_lines_elsewhere():
  terminal = _Terminal()
  bar = console.TrainingProgress(total_steps=6, steps_per_epoch=3, start_step=2, stream=terminal)
  bar.update(3)
  bar.update(4, loss=1.25)
  bar.close()
  last = terminal.getvalue().rsplit('\r', 1)[-1]
  assert 'epoch 2/2' in last and '4/6' in last and 'loss 1.2500' in last and 'step/s' in last

  log = io.StringIO()
  lines = console.TrainingProgress(total_steps=6, steps_per_epoch=3, start_step=0, stream=log)
  for step in range(1, 7):
    lines.update(step, loss=0.5 if step % 3 == 0 else None)
  assert re.fullmatch(r'step 3/6  epoch 1/2  loss 0.5000  [\d.]+ steps/s  ETA \S+\n'
                      r'step 6/6  epoch 2/2  loss 0.5000  [\d.]+ steps/s  ETA 00:00\n',
                      log.getvalue())


def test_other_bars_refresh_in_place_on_a_terminal_and_write_lines_to_a_log(monkeypatch):
  # A log file used to get every refresh of `search index`'s bar, joined by carriage returns
  # into one long line, and the transient bars of `search evaluate` and `verify` as well.
  terminal = _Terminal()
  monkeypatch.setattr('sys.stderr', terminal)
  with console.bar(total=4, desc='indexing', unit='img', mininterval=0) as lasting:
    lasting.update(2)
  with console.bar(total=4, desc='checksums', leave=False, mininterval=0) as transient:
    transient.update(2)
  assert '\r' in terminal.getvalue() and 'indexing:  50%' in terminal.getvalue()
  assert 'checksums:  50%' in terminal.getvalue()

  log = io.StringIO()
  monkeypatch.setattr('sys.stderr', log)
  with console.bar(total=4, desc='indexing', unit='img', initial=1, log_every_s=0) as lasting:
    for _ in range(3):
      lasting.update(1)
  with console.bar(total=4, desc='checksums', leave=False) as transient:
    transient.update(4)
  with console.bar(total=4, desc='hidden', enabled=False) as hidden:
    hidden.update(4)
  lines = log.getvalue().splitlines()
  assert '\r' not in log.getvalue() and len(lines) == 3, lines
  assert re.fullmatch(r'indexing: 2/4 img \(50%\)  [\d,.]+ img/s  ETA \S+', lines[0])
  assert re.fullmatch(r'indexing: 3/4 img \(75%\)  [\d,.]+ img/s  ETA \S+', lines[1])
  assert re.fullmatch(r'indexing: 4/4 img in 00:00 \([\d,.]+ img/s\)', lines[2])

  log = io.StringIO()
  monkeypatch.setattr('sys.stderr', log)
  with console.bar(total=1000, desc='indexing', unit='img') as lasting:  # every 30 s at most
    for _ in range(1000):
      lasting.update(1)
  assert log.getvalue().startswith('indexing: 1,000/1,000 img in ') and log.getvalue().count(
      '\n') == 1
  log = io.StringIO()
  monkeypatch.setattr('sys.stderr', log)
  with pytest.raises(OSError):  # a failed run's last line is its error: no summary
    with console.bar(total=10, desc='indexing', unit='img') as lasting:
      lasting.update(5)
      raise OSError('disk full')
  assert log.getvalue() == ''


def test_the_rate_and_time_left_leave_out_the_first_steps_compilation():
  log = io.StringIO()
  lines = console.TrainingProgress(total_steps=1001, steps_per_epoch=10, start_step=0, stream=log)
  time.sleep(0.5)  # the first step, compiling
  lines.update(1, loss=2.0)
  for step in range(2, 12):
    lines.update(step, loss=1.0 if step == 11 else None)
  first, second = log.getvalue().splitlines()
  assert re.fullmatch(r'step 1/1001  epoch 1/101  loss 2.0000  \(compiled in 00:00\)', first)
  # 10 steps at once: far above the 20 steps/s that counting the compilation would give.
  rate = float(re.search(r'([\d.]+) steps/s', second).group(1))
  assert rate > 1000, second


def test_setup_says_which_weights_a_new_run_starts_from(tiny_builder, tmp_path):
  # They used to be named only in the INFO log, which the console leaves out.
  import tiny_config
  from fashion_jax import train
  from fashion_jax.models.pretrained import LoadReport
  config = tiny_config.get_config()
  config.mode = 'train'
  config.model.pretrained = 'weights/r10'
  report = LoadReport('resnet10_ibn_a', ['backbone.conv1.kernel'] * 40,
                      ['bottleneck.scale', 'classifier.kernel'])
  s = {'builder': tiny_builder, 'item_ids': list(range(16)), 'steps_per_epoch': 2,
       'weights': report}
  lines = train._setup_lines(config, s, str(tmp_path), 0, 4)
  assert lines[-2] == ('resnet10_ibn_a weights from weights/r10: 40 backbone tensors loaded; 2 '
                       'tensors of the head start fresh')
  assert lines[-1] == f'workdir {tmp_path}: checkpoints; tensorboard --logdir {tmp_path}'
  # Resumed, the checkpoint's weights replace them: no such line.
  assert not any('weights from' in line for line in train._setup_lines(config, s, str(tmp_path),
                                                                        2, 4))
