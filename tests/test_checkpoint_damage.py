"""A damaged newest checkpoint: reported in one line, the previous complete step restored and
the damaged one set aside (not deleted); never a silent start from step 0."""

import logging
import os

import numpy as np
import pytest

from fashion_jax import checkpointing


def _state(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {'step': np.asarray(step, np.int32),
          'params': {'dense': {'kernel': rng.normal(size=(64, 32)).astype(np.float32),
                               'bias': rng.normal(size=(32,)).astype(np.float32)}},
          'loss_state': {'center': {'centers': rng.normal(size=(8, 32)).astype(np.float32)}}}


def _saved(directory, steps=(1, 2, 3)) -> checkpointing.Checkpointer:
  checkpointer = checkpointing.Checkpointer(directory, keep=5)
  for step in steps:
    checkpointer.save(step, _state(step))
  checkpointer.wait()
  return checkpointer


def _data_files(step_dir):
  found = []
  for root, _, files in os.walk(os.path.join(step_dir, 'default', 'd')):
    found += [os.path.join(root, name) for name in files]
  assert found, step_dir
  return found


def _delete_data(step_dir):
  for path in _data_files(step_dir):
    os.unlink(path)


def _truncate_data(step_dir):
  for path in _data_files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete(name):
  return lambda step_dir: os.unlink(os.path.join(step_dir, 'default', name))


DAMAGE = {
    'data file deleted': _delete_data,
    'data file truncated': _truncate_data,
    '_METADATA deleted': _delete('_METADATA'),
    'manifest deleted': _delete('manifest.ocdbt'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_a_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, capsys, caplog, damage):
  directory = str(tmp_path / 'checkpoints')
  _saved(directory).close()
  DAMAGE[damage](os.path.join(directory, '3'))

  checkpointer = checkpointing.Checkpointer(directory, keep=5)
  restored = checkpointer.restore(_state(0), set_aside_damaged=True)
  assert int(restored['step']) == 2
  np.testing.assert_array_equal(restored['params']['dense']['kernel'],
                                _state(2)['params']['dense']['kernel'])
  out = capsys.readouterr().out.strip().splitlines()
  assert out == [f'warning: checkpoint step(s) 3 in {directory} damaged; restored step 2 '
                 '(moved to damaged_checkpoints/ beside it)'], out
  # That line is the console's only one: the cause and the move are logged at INFO.
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING
              and r.pathname == checkpointing.__file__], caplog.records
  # Set aside, not deleted; the step number is free again for the resumed run.
  assert os.path.isdir(tmp_path / checkpointing.DAMAGED_DIR / '3')
  assert checkpointer.latest_step() == 2
  checkpointer.save(3, _state(33))
  checkpointer.wait()
  assert int(checkpointer.restore(_state(0))['step']) == 33
  # Damaged again: set aside beside the first, which stays as it was.
  DAMAGE[damage](os.path.join(directory, '3'))
  assert int(checkpointer.restore(_state(0), set_aside_damaged=True)['step']) == 2
  assert sorted(os.listdir(tmp_path / checkpointing.DAMAGED_DIR)) == ['3', '3.1']
  checkpointer.close()


def test_a_bucket_directory_is_kept_as_a_url_and_a_local_one_made_absolute(tmp_path,
                                                                           monkeypatch):
  assert checkpointing.absolute('gs://bucket/runs/s2s/checkpoints') == \
      'gs://bucket/runs/s2s/checkpoints'
  monkeypatch.chdir(tmp_path)
  assert checkpointing.absolute('runs/x') == os.path.join(str(tmp_path), 'runs', 'x')


def test_an_explicit_damaged_step_and_an_all_damaged_directory_are_one_line(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  _saved(directory, steps=(1, 2)).close()
  for step in ('1', '2'):
    _delete_data(os.path.join(directory, step))
  checkpointer = checkpointing.Checkpointer(directory)
  with pytest.raises(checkpointing.CheckpointDamaged,
                     match=r'checkpoint step 2 in .* cannot be read: ') as error:
    checkpointer.restore(_state(0), step=2)
  assert '\n' not in str(error.value) and len(str(error.value)) < 600
  with pytest.raises(checkpointing.CheckpointDamaged,
                     match=r'every checkpoint in .* is damaged \(steps 2, 1; the newest: \w+'):
    checkpointer.restore(_state(0))
  checkpointer.close()


def test_another_model_is_not_mistaken_for_damage(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  _saved(directory, steps=(1, 2)).close()
  other = _state(0)
  other['params']['dense']['kernel'] = np.zeros((64, 16), np.float32)
  checkpointer = checkpointing.Checkpointer(directory)
  with pytest.raises(checkpointing.CheckpointMismatch, match='step 2 .* does not fit this model'):
    checkpointer.restore(other, set_aside_damaged=True)
  assert checkpointer.latest_step() == 2  # nothing set aside
  checkpointer.close()


def test_only_the_closed_event_loop_of_a_failed_restore_is_kept_quiet():
  """A failed restore's other reads complete into Orbax's closed event loop, each reported as
  unraisable from TensorStore's threads: those reports are dropped, no other."""
  import types
  reported = []
  hook = checkpointing._quiet_closed_loop(reported.append)
  for error in (RuntimeError('Event loop is closed'), RuntimeError('something else'),
                ValueError('Event loop is closed')):
    hook(types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                               err_msg=None, object=None))
  assert [str(r.exc_value) for r in reported] == ['something else', 'Event loop is closed']


def test_search_on_a_damaged_checkpoint_is_one_line(tmp_path):
  """The real command, twice (the in-flight reads race the error): one line on stderr."""
  import subprocess
  import sys
  import importlib.util
  here = os.path.dirname(os.path.abspath(__file__))
  spec = importlib.util.spec_from_file_location('search_fixtures',
                                                os.path.join(here, 'search', 'conftest.py'))
  fixtures = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fixtures)
  workdir = fixtures.write_workdir(str(tmp_path / 'run'))
  _truncate_data(os.path.join(workdir, 'checkpoints', '3'))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for attempt in range(2):
    result = subprocess.run(
        [sys.executable, '-m', 'fashion_jax.search', 'export', '--workdir', workdir, '--out',
         str(tmp_path / f'export{attempt}'), '--no-saved-model'], cwd=repo, capture_output=True,
        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=repo))
    assert result.returncode == 2
    assert result.stderr.startswith('error: checkpoint step 3 in ') and \
        result.stderr.count('\n') == 1, result.stderr[:3000]
    assert '(other steps saved: none; choose one with --step)' in result.stderr
