"""End to end on fashion_synth/tiny: train, checkpoint, resume, evaluate, reports."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import tiny_config
from fashion_jax import checkpointing, train


def _config(data_dir, num_epochs):
  c = tiny_config.get_config()
  c.dataset.data_dir = data_dir
  c.train.num_epochs = num_epochs
  return c


def _params(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  step = ckpt.latest_step()
  params = ckpt.restore()['params']
  ckpt.close()
  return step, params


@pytest.fixture(scope='module')
def trained(tiny_data_dir, tmp_path_factory):
  """A 2-epoch run, then the same run resumed to 3 epochs, and an uninterrupted 3-epoch run."""
  root = tmp_path_factory.mktemp('runs')
  resumed, straight = str(root / 'resumed'), str(root / 'straight')
  first = train.train_and_evaluate(_config(tiny_data_dir, 2), resumed)
  with open(os.path.join(resumed, 'eval', 'metrics.json')) as f:
    after_first = json.load(f)
  second = train.train_and_evaluate(_config(tiny_data_dir, 3), resumed)
  reference = train.train_and_evaluate(_config(tiny_data_dir, 3), straight)
  return dict(resumed=resumed, straight=straight, first=first, after_first=after_first,
              second=second, reference=reference, data_dir=tiny_data_dir)


def test_run_writes_checkpoint_logs_metrics_and_ranked_lists(trained):
  workdir = trained['resumed']
  assert trained['first']['step'] == 4
  assert trained['after_first'] == trained['first']
  for key in ('mAP', 'acc@1', 'acc@5', 'acc@10', 'acc@20', 'acc@50'):
    assert 0.0 <= trained['first'][key] <= 1.0
  assert os.path.exists(os.path.join(workdir, 'eval', 'ranked_lists.png'))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  with open(os.path.join(workdir, 'eval', 'history.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps[:3] == [0, 4, 6]  # untrained, end of run 1, end of the resumed run
  assert os.path.exists(os.path.join(workdir, 'config.json'))


def test_resumed_run_equals_uninterrupted_run(trained):
  step_a, params_a = _params(trained['resumed'])
  step_b, params_b = _params(trained['straight'])
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  assert trained['second']['mAP'] == trained['reference']['mAP']


def test_finished_run_started_again_reports_the_same_metrics(trained):
  again = train.train_and_evaluate(_config(trained['data_dir'], 3), trained['resumed'])
  assert again == trained['second']


def test_evaluate_mode_restores_the_checkpoint(trained, tmp_path):
  config = _config(trained['data_dir'], 3)
  config.mode = 'evaluate'
  assert train.train_and_evaluate(config, trained['straight']) == trained['reference']
  with pytest.raises(FileNotFoundError, match='mode=evaluate needs a checkpoint'):
    train.train_and_evaluate(config, str(tmp_path / 'empty'))
  assert not (tmp_path / 'empty').exists()  # refused before anything is written there


def test_evaluation_with_the_test_time_flip(trained, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(trained['straight'], workdir)
  config = _config(trained['data_dir'], 3)
  config.mode = 'evaluate'
  config.eval.flip = True
  flipped = train.train_and_evaluate(config, str(workdir))
  assert flipped['step'] == trained['reference']['step']
  assert flipped['mAP'] != trained['reference']['mAP']
  with open(workdir / 'eval' / 'eval_config.json') as f:
    assert json.load(f)['flip'] is True
