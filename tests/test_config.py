"""Bad configs fail with one clear line before any compilation (tests/test_config_cli.py: the
same from the command line)."""

import os

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
    ('model.backbone', 'resnet51_ibn_a', "model.backbone 'resnet51_ibn_a' is not one of "
                                         'resnet10, resnet10_ibn_a'),
    ('loss.metric', 'contrastive', "loss.metric 'contrastive' is not one of triplet, quadruplet"),
    ('train.batch_size', 12, 'P = batch_size / k = 6 identities is not divisible by the 4 devices'),
    ('train.k', 1, 'train.k must be >= 2'),
    ('input.image_size', (40, 32), 'input.image_size must be a tuple of 2 integers, each positive '
                                   'and a multiple of 16 (height, width), got (40, 32)'),
    ('mode', 'fit', "mode 'fit' is not one of train_and_evaluate, train, evaluate"),
    # A cosine to 0 that ends before training does: the rest would train at a rate of 0.
    ('optim', {'schedule': 'cosine', 'cosine_epochs': 20},
     'optim.cosine_epochs 20 is less than train.num_epochs 120: with optim.final_lr_factor 0 the '
     'last 100 epochs would train at a learning rate of 0; set --config.optim.cosine_epochs=120'),
    ('input', {'erasing_aspect': 1e-20}, 'input.erasing_aspect'),
])
def test_invalid_config_is_rejected_with_its_reason(field, value, message, tmp_path):
  config = _tiny(str(tmp_path / 'tfds'))
  if isinstance(value, dict):  # several fields of a section
    config[field].update(value)
  else:
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
  assert (c.optim.base_lr, c.optim.weight_decay) == (3.5e-4, 5e-4)
  assert tuple(c.optim.milestones) == (40, 70)


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


def test_a_workdir_whose_config_record_is_damaged_or_gone_is_refused(tmp_path):
  config = configlib.base_config()
  with pytest.raises(ValueError, match=r'holds checkpoints but no config.json.*'
                                       r'allow_config_change=True to record this one'):
    train.check_workdir_config(config, str(tmp_path))
  (tmp_path / 'config.json').write_text('{"train": {"batch_si')
  with pytest.raises(ValueError, match=r'config.json is damaged \(.*\); it records the config'):
    train.check_workdir_config(config, str(tmp_path))
  config.train.allow_config_change = True  # the way out each message names
  train.check_workdir_config(config, str(tmp_path))


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


def _outside(domain: configlib.Domain, default) -> list:
  """Values outside `domain`, from its declaration: another kind, None, past each bound, not a
  choice, too short or long, items outside the item domain; `default` is a value inside."""
  kinds = {int: [2.5, True, '1'], float: ['x', float('nan'), float('inf')],
           bool: [1, 'yes'], str: [3], tuple: [5, 'ab']}
  values = kinds[domain.kind] + ([] if domain.nullable else [None])
  if domain.kind is tuple:
    values += [(bad, *default[1:]) for bad in _outside(domain.item, default[0])]
    if domain.length is not None:
      values += [tuple(default[:-1]), (*default, default[0])]
    if domain.min_length:
      values.append(())
    if domain.increasing:
      values.append(tuple(reversed(default)))
    return values
  if domain.kind is str and domain.min_length:
    values.append('')
  if domain.choices is not None:
    values.append('no_such_choice' if domain.kind is str else max(domain.allowed()) + 1)
  for bound, outside in ((domain.gt, 0), (domain.ge, -1), (domain.lt, 0), (domain.le, 1)):
    if bound is not None:
      values.append(bound + outside)
  if domain.multiple_of is not None:
    values.append(default + 1)
  return values


# Seen accepted silently or as a traceback before fields had domains.
REPORTED = [('optim.base_lr', -0.1), ('optim.base_lr', 0.0), ('eval.ks', ()), ('eval.ks', (0, 5)),
            ('train.checkpoint_every_steps', 0), ('loss.label_smoothing', 1.5),
            ('train.num_epochs', -1), ('model.dtype', 'float8'), ('input.image_size', (320,)),
            ('model.width', -8), ('train.batch_size', -64), ('input.erasing_area', (0.4, 0.02)),
            ('eval.top_k_shown', 0), ('optim.gamma', -0.1), ('input.flip_prob', 2.0)]


def _set(config, field, value):
  section, _, key = field.rpartition('.')
  # Past ml_collections' own type check, as a config built without base_config() would be.
  with config.ignore_type():
    (config[section] if section else config)[key] = value


def test_every_field_refuses_values_outside_its_domain_in_one_line_naming_it():
  import tiny_config
  base = tiny_config.get_config()
  assert set(configlib.FIELDS) == set(configlib.field_paths(base))  # every field has a domain
  walked = set()
  cases = [(field, value) for field, domain in configlib.FIELDS.items()
           for value in _outside(domain, configlib._value(base, field))] + REPORTED
  for field, value in cases:
    config = tiny_config.get_config()
    _set(config, field, value)
    with pytest.raises(ValueError) as error:
      configlib.validate_config(config, num_devices=1)
    message = str(error.value)
    assert '\n' not in message and message.startswith(f'{field} '), (field, value, message)
    assert repr(value) in message, (field, value, message)
    walked.add(field)
  assert walked == set(configlib.FIELDS)


def test_each_bad_field_is_named_in_the_one_line():
  config = configlib.base_config()
  config.optim.base_lr, config.eval.ks = -0.1, ()
  with pytest.raises(ValueError) as error:
    configlib.check_fields(config)
  assert str(error.value) == ("dataset.name must be non-empty (a TFDS name, e.g. "
                              "fashion_synth/demo), got ''; optim.base_lr must be positive, got "
                              '-0.1; eval.ks must be a non-empty tuple of integers, each positive, '
                              'got ()')


def test_shipped_configs_have_every_field_in_its_domain():
  import importlib.util
  import tiny_config
  configs = [tiny_config.get_config()]
  for name in sorted(n for n in os.listdir(os.path.join(REPO, 'configs')) if n.endswith('.py')):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs.append(module.get_config())
  assert len(configs) >= 5
  for config in configs:
    assert set(configlib.FIELDS) <= set(configlib.field_paths(config))
    configlib.check_fields(config)


def test_fields_without_a_domain_are_their_readers_and_missing_ones_take_defaults():
  """An extension's option (a registered loss's, an evaluator's) is not refused for being absent
  from base_config(); a config written before a field existed is not refused for lacking it."""
  config = _tiny(None)
  config.loss.proxy_lr = 'read by the toy_proxy loss'
  config.eval.mean_cosine_key = 3
  del config.input['resize_mode']
  configlib.validate_config(config, num_devices=1)


def test_a_registered_name_is_a_valid_choice():
  from fashion_jax import objective
  config = _tiny(None)
  config.loss.metric = 'toy'
  with pytest.raises(ValueError, match="loss.metric 'toy' is not one of"):
    configlib.check_fields(config)
  objective.register_metric('toy', lambda c: [])
  try:
    configlib.check_fields(config)
  finally:
    objective.unregister_metric('toy')


@pytest.mark.parametrize('name, message', [
    ('train.bach_size', 'the config has no field train.bach_size; did you mean train.batch_size?'),
    ('trian.batch_size', 'the config has no field trian.batch_size; did you mean '
                         'train.batch_size?'),
    ('input.image_size[2]', 'the config has no field input.image_size[2]; did you mean '
                            'input.image_size?'),
    ('zzz', 'the config has no field zzz'),
])
def test_a_misspelt_field_name_is_one_line_naming_the_closest(name, message):
  config = configlib.base_config()
  for field in ('train.batch_size', 'input.image_size[1]', 'dataset.data_dir'):
    configlib.check_field_name(config, field)
  with pytest.raises(ValueError) as error:
    configlib.check_field_name(config, name)
  assert str(error.value) == message


def test_a_data_dir_under_a_file_is_one_line(tmp_path):
  from data_pipelines import datasets
  (tmp_path / 'file').write_text('')
  for data_dir in (tmp_path / 'file' / 'tfds', tmp_path / 'file'):
    with pytest.raises(datasets.DatasetMissingError) as error:
      datasets.get_builder('fashion_synth/tiny', str(data_dir))
    assert str(error.value) == (f'data_dir {str(data_dir)!r} is not a directory: '
                                f'{tmp_path / "file"} is a file')
  assert not (tmp_path / 'file' / 'tfds').exists()


def test_eval_settings_the_dataset_cannot_take_are_refused_before_training(tiny_data_dir,
                                                                          tmp_path):
  # They failed at the first evaluation, after the steps since the last checkpoint.
  config = _tiny(tiny_data_dir)
  config.eval.query_domain = 'catwalk'
  with pytest.raises(ValueError, match="eval.query_domain 'catwalk' is not a domain of this "
                                       r"dataset \(\['street', 'shop'\]\)"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_fields_nothing_reads_are_named_with_the_closest_field():
  # A config file's misspelling used to pass without a word (overrides were already checked).
  config = configlib.base_config()
  assert configlib.unknown_fields(config) == []
  config.train.num_epoch = 1
  config.eval.my_evaluators_option = 3
  assert sorted(configlib.unknown_fields(config)) == [
      "config field eval.my_evaluators_option is none of the project's (did you mean "
      'eval.evaluators?); only an evaluator of your own would read it',
      "config field train.num_epoch is none of the project's (did you mean train.num_epochs?); "
      'only an evaluator of your own would read it']
