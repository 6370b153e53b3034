"""Config mistakes on the command line: one line on stderr, exit status 2, no traceback."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, '-m', 'fashion_jax.main', '--workdir', str(tmp_path / 'run'), *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_missing_real_dataset_names_it_and_how_to_build_it(tmp_path):
  result = _cli('--config', 'configs/street2shop.py',
                f'--config.dataset.data_dir={tmp_path / "tfds"}', tmp_path=tmp_path)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: dataset 'street2shop'")
  assert 'python -m data_pipelines.build street2shop --manual_dir=<raw root>' in last
  assert 'Traceback' not in result.stderr


def test_cli_bad_override_is_one_line(tmp_path):
  result = _cli('--config', 'configs/demo.py', '--config.train.k=1', tmp_path=tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: train.k must be >= 2 (batch-hard mining needs a positive), got 1')
