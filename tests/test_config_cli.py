"""Config mistakes on the command line: one line on stderr, exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest

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
  assert not (tmp_path / 'run').exists()  # a refused run leaves no empty workdir


def _one_line(result) -> str:
  """The error line of a command refused before it ran: last on stderr, no traceback."""
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
  return result.stderr.strip().splitlines()[-1]


def test_cli_misspelt_field_names_the_closest_field(tmp_path):
  result = _cli('--config', 'configs/demo.py', '--config.train.bach_size=8', tmp_path=tmp_path)
  assert _one_line(result) == ('error: the config has no field train.bach_size; did you mean '
                               'train.batch_size?')
  assert not (tmp_path / 'run').exists()


def test_cli_missing_config_file_is_named(tmp_path):
  result = _cli('--config=configs/no_such.py', '--config.train.k=2', tmp_path=tmp_path)
  assert _one_line(result) == "error: config file 'configs/no_such.py' does not exist"


def test_cli_missing_required_flag_is_one_line_saying_what_it_is(tmp_path):
  result = _cli(tmp_path=tmp_path)  # absl: "flag --config=None: Flag --config must have a ..."
  assert _one_line(result) == 'error: --config is required: experiment config file.'


def test_cli_stray_word_is_one_line(tmp_path):
  result = _cli('--config', 'configs/demo.py', 'extra', tmp_path=tmp_path)  # absl: the usage
  assert _one_line(result) == ('error: unexpected arguments: extra (options are --name=value; '
                               '--help lists them)')


def test_cli_values_outside_their_domains_are_one_line(tmp_path):
  result = _cli('--config', 'tests/tiny_config.py', '--config.model.dtype=float8',
                "--config.input.image_size=(320,)", tmp_path=tmp_path)
  assert _one_line(result) == (
      "error: input.image_size must be a tuple of 2 integers, each positive and a multiple of 16 "
      "(height, width), got (320,); model.dtype 'float8' is not one of float32, bfloat16, float16")


def test_cli_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / 'run').write_text('my notes')
  result = _cli('--config', 'configs/demo.py', tmp_path=tmp_path)
  assert _one_line(result) == (f'error: --workdir {tmp_path / "run"} is a file, not a folder: '
                               'give a new or empty folder, or a workdir')
  assert (tmp_path / 'run').read_text() == 'my notes'


def test_cli_workdir_empty_or_impossible_is_one_line(tmp_path):
  result = _cli('--config', 'configs/demo.py', '--workdir', '', tmp_path=tmp_path)
  assert _one_line(result) == ('error: --workdir is empty: give the folder for checkpoints, logs '
                               'and reports')
  (tmp_path / 'file').write_text('')  # no folder can be made under a file
  result = _cli('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'file' / 'run'),
                tmp_path=tmp_path)
  assert _one_line(result).startswith(f'error: cannot use {tmp_path / "file" / "run"}: ')


def test_only_new_empty_or_workdir_folders_are_workdirs(tmp_path):
  import tiny_config
  from fashion_jax import train
  # A workdir's checkpoints folder given for the workdir: refused before anything is written.
  steps = tmp_path / 'run' / 'checkpoints'
  for step in ('400', '500'):
    (steps / step).mkdir(parents=True)
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(tiny_config.get_config(), str(steps))
  assert str(error.value) == (f"--workdir {steps} holds checkpoints (400, 500): it is a "
                              f"workdir's checkpoints folder; give the workdir, {steps.parent}")
  assert sorted(os.listdir(steps)) == ['400', '500']
  index = tmp_path / 'index'
  index.mkdir()
  (index / 'index.json').write_text('{}')
  with pytest.raises(ValueError, match='is a search index, not a training workdir'):
    train.check_workdir_folder(str(index))
  shop = tmp_path / 'shop'
  shop.mkdir()
  for name in ('a.jpg', 'b.jpg', 'catalogue.csv'):
    (shop / name).write_text('x')
  with pytest.raises(ValueError, match=r"it holds 'a.jpg' and 2 more and no config.json"):
    train.check_workdir_folder(str(shop))
  # A new folder, an empty one (dot files aside), one a run was stopped in before it wrote
  # config.json, and a workdir with notes of its own beside config.json.
  started = tmp_path / 'started'
  (started / 'xla_cache').mkdir(parents=True)
  (started / 'events.out.tfevents.1.host.1.v2').write_text('')
  (started / '.DS_Store').write_text('')
  (shop / 'config.json').write_text('{}')
  for folder in (tmp_path / 'new', started, shop):
    train.check_workdir_folder(str(folder))


def test_cli_config_file_that_does_not_load_is_one_line(tmp_path):
  (tmp_path / 'noget.py').write_text('x = 1\n')
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  result = _cli('--config', str(tmp_path / 'noget.py'), tmp_path=tmp_path)
  assert _one_line(result).startswith(f"error: config file '{tmp_path / 'noget.py'}' does not "
                                      "load: AttributeError: ")
  assert "has no attribute 'get_config'" in result.stderr
  result = _cli('--config', str(tmp_path / 'broken.py'), tmp_path=tmp_path)
  assert _one_line(result) == (f"error: config file '{tmp_path / 'broken.py'}' is not valid "
                               'Python: invalid syntax at line 1')
  # Any error of the file's own (a name undefined, its own raise) used to be a traceback.
  (tmp_path / 'typo.py').write_text('def get_config():\n  return demo\n')
  result = _cli('--config', str(tmp_path / 'typo.py'), tmp_path=tmp_path)
  assert _one_line(result) == (f"error: config file '{tmp_path / 'typo.py'}' does not load: "
                               "NameError: name 'demo' is not defined")


def test_cli_values_of_the_wrong_type_are_one_line(tmp_path):
  result = _cli('--config', 'configs/demo.py', '--config.train.batch_size=abc', tmp_path=tmp_path)
  assert _one_line(result) == ("error: flag --config.train.batch_size=abc: invalid literal for "
                               "int() with base 10: 'abc'")
  result = _cli('--config', 'configs/demo.py:foo', tmp_path=tmp_path)
  assert _one_line(result) == ('error: flag --config=configs/demo.py:foo: TypeError: '
                               'get_config() takes 0 positional arguments but 1 was given')


def test_config_arguments_are_found_in_every_spelling_absl_takes():
  from fashion_jax import main
  assert main._config_arguments(['--config', 'a.py', '--config.train.k=2', '-noconfig.eval.rerank',
                                 '--workdir=w']) == ('a.py', ['train.k', 'eval.rerank'])
  assert main._config_arguments(['-config=b.py:x', '--config.input.image_size', '(32, 32)']) == (
      'b.py:x', ['input.image_size'])
  assert main._config_arguments(['--workdir', 'w', '--config']) == (None, [])


def test_none_overrides_are_taken_out_of_what_ml_collections_parses():
  from fashion_jax import main
  assert main._none_overrides(
      ['prog', '--config.model.pretrained=None', '--config.train.k', 'None', '--config.x=None2',
       '--workdir', 'None', '--config.eval.chunk_size']) == (
      ['prog', '--config.x=None2', '--workdir', 'None', '--config.eval.chunk_size'],
      ['model.pretrained', 'train.k'])


def test_cli_none_is_refused_for_fields_that_have_no_none(tmp_path):
  result = _cli('--config', 'configs/demo.py', '--config.train.k=None', tmp_path=tmp_path)
  assert _one_line(result) == 'error: train.k must be an integer, got None'
  result = _cli('--config', 'configs/demo.py', '--config.train.kk=None', tmp_path=tmp_path)
  assert _one_line(result) == 'error: the config has no field train.kk; did you mean train.k?'


def test_help_is_status_0(tmp_path):
  # absl ends --help with status 1, as for an error.
  result = _cli('--help', tmp_path=tmp_path)
  assert result.returncode == 0 and '--workdir' in result.stdout, result.stderr[-2000:]


def test_a_workdir_in_use_by_another_run_is_refused(tmp_path):
  import fcntl

  import tiny_config
  from fashion_jax import train
  workdir = tmp_path / 'run'
  workdir.mkdir()
  other = os.open(workdir, os.O_RDONLY)  # as a run training there holds it
  try:
    fcntl.flock(other, fcntl.LOCK_EX)
    with pytest.raises(ValueError, match=r'is in use by another run .*give another workdir'):
      train.train_and_evaluate(tiny_config.get_config(), str(workdir))
  finally:
    os.close(other)
  assert os.listdir(workdir) == []


def test_an_evaluation_with_nothing_to_score_is_an_error_not_nan(tiny_data_dir, tmp_path):
  # Queries taken from the gallery split: each query's only match is itself, left out, so
  # every query is skipped; the metrics were NaN with exit status 0.
  import tiny_config
  from fashion_jax import train
  config = tiny_config.get_config()
  config.dataset.data_dir = tiny_data_dir
  config.dataset.query_split = 'gallery'
  config.train.num_epochs = 0
  with pytest.raises(ValueError, match=r"none of the \d+ queries has its product in the gallery.*"
                                       r"dataset.query_split 'gallery'"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_non_finite_embeddings_are_an_error_not_a_score(tiny_builder, tmp_path):
  import jax.numpy as jnp

  import tiny_config
  from fashion_jax import evaluate
  from fashion_jax import train_step as ts
  config = tiny_config.get_config()

  def embed(images):  # as a model whose weights hold NaN
    return jnp.full((images.shape[0], 8), jnp.nan)

  with pytest.raises(ValueError, match=r'^\d+ of the \d+ query embeddings at step 3 are not '
                                       r"finite: the model's weights hold NaN or inf$"):
    evaluate.evaluate(config, embed=embed, builder=tiny_builder, mesh=ts.make_mesh(),
                      workdir=str(tmp_path), step=3)
  assert not os.listdir(tmp_path)  # no report written
