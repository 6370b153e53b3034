"""Bad configs fail with one clear line before any compilation, from Python and from the CLI."""

import os
import subprocess
import sys

import pytest

from fashion_jax import configlib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(data_dir):
  c = configlib.base_config()
  c.dataset.name = 'fashion_synth/tiny'
  c.dataset.data_dir = data_dir
  c.input.image_size = (32, 32)
  c.model.backbone = 'resnet10_ibn_a'
  c.train.batch_size = 16
  c.train.k = 2
  return c


@pytest.mark.parametrize('field,value,message', [
    ('model.backbone', 'resnet51_ibn_a', "unknown backbone 'resnet51_ibn_a'"),
    ('loss.metric', 'contrastive', "unknown metric loss 'contrastive'"),
    ('train.batch_size', 12, 'P = batch_size / k = 6 identities is not divisible by the 4 devices'),
    ('train.k', 1, 'train.k must be >= 2'),
    ('input.image_size', (40, 32), 'input.image_size must be positive multiples of 16, got 40x32'),
    ('mode', 'fit', "unknown mode 'fit'"),
])
def test_invalid_config_is_rejected_with_its_reason(field, value, message, tmp_path):
  config = _tiny(str(tmp_path / 'tfds'))
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  # Rejected before the dataset was generated or any state was created.
  assert not (tmp_path / 'tfds').exists()
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_valid_config_passes():
  c = _tiny(None)
  configlib.validate_config(c, num_devices=4)
  configlib.validate_config(c, num_devices=2, num_processes=2)


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


@pytest.mark.parametrize('name', ['demo', 'street2shop', 'deepfashion', 'osnet_ain'])
def test_experiment_configs_are_valid_and_document_their_command(name):
  import importlib.util
  path = os.path.join(REPO, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  configlib.validate_config(config, num_devices=4)
  assert f'python -m fashion_jax.main --config configs/{name}.py' in module.__doc__


def test_paper_defaults():
  c = configlib.base_config()
  assert c.model.backbone == 'resnet50_ibn_a' and c.model.last_stride == 1
  assert tuple(c.input.image_size) == (320, 320)
  assert (c.loss.label_smoothing, c.loss.center_weight, c.loss.center_lr) == (0.1, 5e-4, 0.5)
  assert (c.optim.base_lr, c.optim.weight_decay, tuple(c.optim.milestones)) == (3.5e-4, 5e-4, (40, 70))


def test_steps_per_epoch_visits_every_identity_once():
  from data_pipelines import input_pipeline
  assert input_pipeline.steps_per_epoch(16, 4) == 4
  assert input_pipeline.steps_per_epoch(17, 4) == 5
  assert input_pipeline.steps_per_epoch(3, 16) == 1


@pytest.mark.parametrize('overrides,devices,processes,message', [
    ({'train.batch_size': 30, 'train.k': 4}, 1, 1, 'batch_size 30 is not a multiple of train.k 4'),
    ({'train.batch_size': 16, 'train.k': 4}, 4, 1, 'each device gets 1 identity'),
    ({}, 4, 8, '4 devices do not split evenly over 8 processes'),
    ({'eval.batch_size': 10}, 4, 1, 'eval.batch_size 10 is not divisible by the 4 devices'),
    ({'loss.center_weight': -1.0}, 4, 1, 'loss.center_weight must be >= 0'),
])
def test_batch_device_and_process_layout_is_checked(overrides, devices, processes, message):
  config = configlib.base_config()
  config.dataset.name = 'fashion_synth/demo'
  for field, value in overrides.items():
    section, key = field.split('.')
    config[section][key] = value
  with pytest.raises(ValueError, match=message):
    configlib.validate_config(config, num_devices=devices, num_processes=processes)


def test_workdir_config_check_accepts_fields_added_since_at_their_default(tmp_path):
  """A config.json written before a field existed resumes when that field keeps its default
  (the behaviour the run had); any other value, or any other difference, is refused."""
  import json

  config = configlib.base_config()
  config.dataset.name = 'fashion_synth/tiny'
  saved = json.loads(config.to_json_best_effort())
  del saved['input']['resize_mode']  # as written before the field was added
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved, f)
  train.check_workdir_config(config, str(tmp_path))
  config.input.resize_mode = 'letterbox'
  with pytest.raises(ValueError, match=r"different config: input.resize_mode \(None -> "
                                       r"'letterbox'\)"):
    train.check_workdir_config(config, str(tmp_path))
  config.input.resize_mode = 'stretch'
  config.loss.metric = 'quadruplet'
  with pytest.raises(ValueError, match=r"loss.metric \('triplet' -> 'quadruplet'\)"):
    train.check_workdir_config(config, str(tmp_path))
