"""Sweeps: values parsed as --config overrides, one workdir per point, finished points skipped,
the table of final metrics; mistakes on the command line are one line (exit 2)."""

import csv
import json
import os
import re
import subprocess
import sys

import jax
import pytest

import tiny_config
from fashion_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir=None):
  c = tiny_config.get_config()
  c.dataset.data_dir = data_dir
  c.train.num_epochs = 1  # 2 steps a point
  c.lock()
  return c


def test_values_parse_as_overrides_of_the_fields_type():
  c = _config()
  assert sweep.parse_axis(c, 'optim.base_lr=1e-3, 2e-3').values == (1e-3, 2e-3)
  assert sweep.parse_axis(c, 'train.k=2,4').values == (2, 4)
  assert sweep.parse_axis(c, 'input.image_size=(32, 32),(64,64)').values == ((32, 32), (64, 64))
  assert sweep.parse_axis(c, 'loss.metric=triplet,quadruplet').values == ('triplet', 'quadruplet')
  assert sweep.parse_axis(c, 'eval.rerank=true,False').values == (True, False)
  assert sweep.parse_axis(c, 'train.steps_per_epoch=3').values == (3,)  # None by default


@pytest.mark.parametrize('spec, message', [
    ('optim.base_lrr=1e-3', 'the config has no field optim.base_lrr; did you mean optim.base_lr?'),
    ('optim.base_lr=1e-3,fast', "--sweep optim.base_lr: 'fast' is not a number"),
    ('train.k=2.5', "--sweep train.k: '2.5' is not an integer"),
    ('optim.base_lr', "--sweep 'optim.base_lr': write a field and its values, e.g. "
                      "--sweep 'optim.base_lr=1e-3,2e-3'"),
    ('optim=1', '--sweep optim: a group of fields cannot be swept; name one of its fields'),
    ('seed=1,1', '--sweep seed: a value is listed twice (1, 1)'),
    ('optim.base_lr=1e-3,0.001', '--sweep optim.base_lr: a value is listed twice (1e-3, 0.001)'),
])
def test_bad_sweeps_are_one_line(spec, message):
  with pytest.raises(ValueError) as error:
    sweep.parse_axis(_config(), spec)
  assert str(error.value) == message


def test_grid_names_each_point_by_its_values():
  c = _config()
  points = sweep.grid(c, [sweep.parse_axis(c, 'optim.base_lr=1e-3,2e-3'),
                          sweep.parse_axis(c, 'dataset.name=fashion_synth/tiny')])
  assert [p.name for p in points] == ['optim.base_lr=1e-3,dataset.name=fashion_synth_tiny',
                                      'optim.base_lr=2e-3,dataset.name=fashion_synth_tiny']
  assert [p.config.optim.base_lr for p in points] == [1e-3, 2e-3]
  assert c.optim.base_lr == 3.5e-4  # the base config is left as it was
  with pytest.raises(ValueError, match="fashion_synth_tiny: loss.metric 'x' is not one of"):
    sweep.check_points(sweep.grid(c, [sweep.parse_axis(c, 'loss.metric=x'), sweep.parse_axis(
        c, 'dataset.name=fashion_synth/tiny')]), num_devices=4)


def test_points_that_would_share_a_workdir_are_refused():
  # '/' and spaces leave the folder names, so these two values would name one folder.
  c = _config()
  with pytest.raises(ValueError) as error:
    sweep.grid(c, [sweep.parse_axis(c, 'dataset.data_dir=/data/tfds,_data/tfds')])
  assert str(error.value) == ("--sweep: dataset.data_dir=/data/tfds and dataset.data_dir="
                              "_data/tfds would share the workdir 'dataset.data_dir=_data_tfds'")
  with pytest.raises(ValueError, match=r'is 3\d\d bytes, over the 255 a folder name may have'):
    sweep.grid(c, [sweep.parse_axis(c, f'dataset.data_dir=/tmp/{"x" * 300}')])


def _history_lines(workdir):
  with open(os.path.join(workdir, 'eval', 'history.jsonl')) as f:
    return f.read()


def test_two_by_two_sweep_writes_its_table_and_skips_finished_points(tiny_data_dir, tmp_path):
  c = _config(tiny_data_dir)
  # Seeds change no program: two compilations of the step, not four.
  points = sweep.grid(c, [sweep.parse_axis(c, 'loss.metric=triplet,quadruplet'),
                          sweep.parse_axis(c, 'seed=0,1')])
  workdir = str(tmp_path)
  first = sweep.run(points, workdir)
  assert [r.skipped for r in first] == [False] * 4
  markdown = sweep.write_tables(first, workdir)
  with open(os.path.join(workdir, 'sweep.csv')) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['loss.metric', 'seed', 'mAP', 'mINP', 'Acc@1', 'Acc@10',
                           'TPR@FPR=0.0001', 'TPR@FPR=0.001', 'TPR@FPR=0.01', 'step', 'workdir']
  assert sorted(r['workdir'] for r in rows) == sorted(p.name for p in points)
  maps = [float(r['mAP']) for r in rows]
  assert maps == sorted(maps, reverse=True)
  for row in rows:
    with open(os.path.join(workdir, row['workdir'], 'eval', 'metrics.json')) as f:
      metrics = json.load(f)
    assert metrics['step'] == int(row['step']) == 2
    assert float(row['mAP']) == metrics['mAP']
    assert f"| {row['loss.metric']} | {row['seed']} | {metrics['mAP']:.4f} |" in markdown
  assert markdown.splitlines()[0].startswith('| loss.metric | seed | mAP |')

  histories = [_history_lines(os.path.join(workdir, p.name)) for p in points]
  os.remove(os.path.join(workdir, points[1].name, 'eval', 'metrics.json'))  # unfinished again
  second = sweep.run(points, workdir)
  assert [r.skipped for r in second] == [True, False, True, True]
  assert [r.metrics for r in second] == [r.metrics for r in first]
  for i, point in enumerate(points):
    again = _history_lines(os.path.join(workdir, point.name))
    # Skipped points are not evaluated again; the unfinished one is, from its last checkpoint.
    assert again == histories[i] if i != 1 else again.startswith(histories[i])


def _sweep_cli(*args, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, '-m', 'fashion_jax.sweep', '--config', 'tests/tiny_config.py',
       '--workdir', str(tmp_path / 'sweep'), *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_print_commands_gives_one_training_command_per_point(tmp_path):
  result = _sweep_cli('--sweep', 'optim.base_lr=1e-3,2e-3', '--sweep',
                      'input.image_size=(32,32),(64,64)', '--config.train.num_epochs=1',
                      '--print_commands', tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = tmp_path / 'sweep'
  assert result.stdout.splitlines() == [
      f"python -m fashion_jax.main --config tests/tiny_config.py --workdir "
      f"'{workdir}/optim.base_lr={lr},input.image_size=({size},{size})' "
      f"--config.train.num_epochs=1 --config.optim.base_lr={lr} "
      f"'--config.input.image_size=({size},{size})'"
      for lr in ('1e-3', '2e-3') for size in (32, 64)]
  assert not workdir.exists()


def test_fields_that_may_be_none_are_swept_and_fixed_to_none(tmp_path):
  # ml_collections alone reads None as the string 'None', or refuses it for an integer field.
  result = _sweep_cli('--sweep', 'train.steps_per_epoch=None,3', '--config.model.pretrained',
                      'None', '--print_commands', tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert [line.split(' --config.', 1)[1] for line in result.stdout.splitlines()] == [
      'model.pretrained=None --config.train.steps_per_epoch=None',
      'model.pretrained=None --config.train.steps_per_epoch=3']
  result = _sweep_cli('--sweep', 'optim.base_lr=None,1e-3', tmp_path=tmp_path)
  assert result.stderr.strip().splitlines()[-1] == (
      'error: --sweep optim.base_lr must be a finite number, got None')


def test_cli_mistakes_are_one_line(tmp_path):
  result = _sweep_cli('--sweep', 'optim.base_lr=1e-3', '--sweep', 'loss.metric=triplet,tripplet',
                      tmp_path=tmp_path)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(  # the losses' registry grows
      "error: optim.base_lr=1e-3,loss.metric=tripplet: loss.metric 'tripplet' is not one of "
      'triplet, ')
  assert not (tmp_path / 'sweep').exists()
  # A field both fixed and swept: the sweep would replace the fixed value without a word.
  result = _sweep_cli('--sweep', 'optim.base_lr=1e-3,2e-3', '--config.optim.base_lr=5e-4',
                      tmp_path=tmp_path)
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
      'error: --config.optim.base_lr is also swept (--sweep optim.base_lr=...); drop one')


def test_weights_a_point_names_are_checked_before_any_point_trains(tiny_data_dir, tmp_path):
  # A missing file used to stop the sweep at that point, after the points before it trained.
  c = _config(tiny_data_dir)
  weights = tmp_path / 'weights.npz'
  weights.write_bytes(b'')  # checked for existence and kind here; read when the point trains
  points = sweep.grid(c, [sweep.parse_axis(c, f'model.pretrained={weights},{tmp_path}/none')])
  with pytest.raises(ValueError, match=r'^model.pretrained=.*none: no converted weights at '):
    sweep.check_points(points, num_devices=jax.device_count())
  sweep.check_points(points[:1], num_devices=jax.device_count())


def test_a_training_workdir_or_a_search_index_is_not_a_sweeps_folder(tmp_path):
  # The sweep used to fill a training workdir given by mistake with its points' workdirs.
  for marker, what in (('config.json', 'a training workdir'), ('index.json', 'a search index')):
    folder = tmp_path / marker
    folder.mkdir()
    (folder / marker).write_text('{}')
    with pytest.raises(ValueError, match=f"is {what}, not a sweep's folder"):
      sweep.check_sweep_folder(str(folder))
  sweep.check_sweep_folder(str(tmp_path / 'new'))
  with pytest.raises(ValueError, match='is a file, not a folder'):
    sweep.check_sweep_folder(str(tmp_path / 'config.json' / 'config.json'))
  (tmp_path / 'sweep' / 'seed=0').mkdir(parents=True)  # a sweep's own folder
  sweep.check_sweep_folder(str(tmp_path / 'sweep'))


def test_a_finished_point_is_evaluated_again_for_other_eval_settings_and_refused_past_its_end(
    tiny_data_dir, tmp_path):
  c = _config(tiny_data_dir)
  c.train.num_epochs = 2  # 4 steps
  points = sweep.grid(c, [sweep.parse_axis(c, 'seed=0')])
  workdir = str(tmp_path)
  first = sweep.run(points, workdir)
  assert 'acc@5' in first[0].metrics
  history = _history_lines(os.path.join(workdir, points[0].name))
  # Other eval settings: the finished point is evaluated again, not reported as it was.
  c.eval.ks = (1, 2)
  points = sweep.grid(c, [sweep.parse_axis(c, 'seed=0')])
  second = sweep.run(points, workdir)
  assert not second[0].skipped and 'acc@2' in second[0].metrics
  assert 'acc@5' not in second[0].metrics
  again = _history_lines(os.path.join(workdir, points[0].name))
  assert again.startswith(history) and len(again.splitlines()) == len(history.splitlines()) + 1
  assert sweep.run(points, workdir)[0].skipped  # and then it is finished with them
  # Fewer epochs than it trained: its metrics would be of another training.
  c.train.num_epochs = 1
  points = sweep.grid(c, [sweep.parse_axis(c, 'seed=0')])
  with pytest.raises(ValueError, match=r'has trained to step 4, past the final step 2 of this '
                                       r'point \(train.num_epochs 1\)'):
    sweep.run(points, workdir)


def test_an_interrupted_sweep_tables_the_points_that_ended(tmp_path, monkeypatch):
  from fashion_jax import train
  c = _config()
  points = sweep.grid(c, [sweep.parse_axis(c, 'seed=0,1,2')])
  ran = []

  def train_and_evaluate(config, workdir):  # the second point is preempted
    ran.append(config.seed)
    if config.seed == 1:
      raise train.Preempted('SIGTERM at step 1: checkpoint saved', signum=15)
    return {'step': 2, 'mAP': 0.5, 'acc@1': 0.25}

  monkeypatch.setattr(train, 'train_and_evaluate', train_and_evaluate)
  results = []
  with pytest.raises(train.Preempted):
    sweep.run(points, str(tmp_path), results)
  assert ran == [0, 1] and [r.point.name for r in results] == [points[0].name]
  said = sweep._partial_tables(results, str(tmp_path))
  assert 'list the 1 of its points that ended before the interruption' in said
  with open(tmp_path / 'sweep.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(row['seed'], row['mAP'], row['workdir']) for row in rows] == [
      ('0', '0.5', points[0].name)]
  assert sweep._partial_tables([], str(tmp_path)) == ''


@pytest.mark.parametrize('spec, words', [
    ('dataset.name=fashion_synth/tiny,nope', "unknown dataset 'nope'"),
    ('eval.query_domain=street,foo', "eval.query_domain 'foo' is not a domain of this dataset"),
    ('eval.rerank_k2=6,30', 'eval.rerank_k2 30 is more than eval.rerank_k1 + 1 = 21'),
])
def test_points_whose_dataset_or_eval_settings_cannot_run_are_refused_before_any_trains(
    tiny_data_dir, spec, words):
  config = _config(tiny_data_dir)
  points = sweep.grid(config, [sweep.parse_axis(config, spec)])
  with pytest.raises(ValueError, match=re.escape(words)) as error:
    sweep.check_points(points, num_devices=4)
  assert str(error.value).startswith(points[1].name + ': ')
