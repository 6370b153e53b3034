"""Preemption, multi-process training and the guards against bad state (tiny runs).

Runs are started as real processes (`python -m fashion_jax.main`) and killed with SIGKILL or
SIGTERM at random moments; their results are compared with uninterrupted in-process runs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config
from simulated_devices import TEST_XLA_FLAGS
from fashion_jax import checkpointing, configlib, losses, optim, train
from fashion_jax import train_step as ts
from fashion_jax.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, overrides: dict):
  """The tiny config with `{'section.field': value}` overrides, as the CLI would apply them."""
  c = tiny_config.get_config()
  c.dataset.data_dir = data_dir
  for field, value in overrides.items():
    section, _, key = field.rpartition('.')
    (c[section] if section else c)[key] = value
  return c


def _cli_args(config_overrides: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in config_overrides.items()]


def _env(devices: int, cache_dir: str) -> dict:
  # The same compiler flags as this process (tests/simulated_devices.py), so results compare bitwise.
  return dict(os.environ, PYTHONPATH=REPO,
              XLA_FLAGS=TEST_XLA_FLAGS.format(devices),
              JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')


def _start(workdir, overrides: dict, env: dict, *extra, prefix=()) -> subprocess.Popen:
  return subprocess.Popen(
      [*prefix, sys.executable, '-m', 'fashion_jax.main', '--config', 'tests/tiny_config.py',
       '--workdir', str(workdir), *_cli_args(overrides), *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _saved_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _final(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state = ckpt.restore()
  ckpt.close()
  return state


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return jax.config.jax_compilation_cache_dir or str(tmp_path_factory.mktemp('jax_cache'))


def test_killed_runs_resume_to_the_uninterrupted_result(tiny_data_dir, tmp_path, cache_dir):
  overrides = {'mode': 'train', 'train.num_epochs': 15, 'train.checkpoint_every_steps': 1}
  reference = tmp_path / 'reference'
  train.train_and_evaluate(_config(tiny_data_dir, overrides), str(reference))
  overrides['dataset.data_dir'] = tiny_data_dir
  workdir = tmp_path / 'killed'
  env = _env(4, cache_dir)
  rng = np.random.default_rng(0)
  # Two SIGKILLs at random moments, a SIGTERM (preemption notice), and two Ctrl-Cs (SIGINT):
  # the first checkpoints and stops like SIGTERM, the second, unless the first had stopped the
  # run already, stops it at once without a checkpoint. A second Ctrl-C used to raise
  # KeyboardInterrupt wherever the main thread was: swallowed in a garbage collection callback,
  # or hanging or crashing the teardown of TensorFlow's input threads.
  for sig, twice in ((signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGINT, True),
                     (signal.SIGKILL, False)):
    proc = _start(workdir, overrides, env)
    # Wait for a newer checkpoint (the count stays at keep_checkpoints once full).
    already = max(_saved_steps(workdir), default=0)
    deadline = time.time() + 480
    while max(_saved_steps(workdir), default=0) <= already and proc.poll() is None:
      assert time.time() < deadline, 'the run saved no checkpoint in time'
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))  # mid-step or mid-checkpoint-write
    for _ in range(2 if twice else 1):
      if proc.poll() is None:
        proc.send_signal(sig)
        time.sleep(0.2)
    _, stderr = proc.communicate(timeout=240)
    if sig != signal.SIGKILL and proc.returncode == 128 + sig:  # else it had finished
      last = stderr.strip().splitlines()[-1]
      assert 'Traceback' not in stderr, stderr
      if twice and 'interrupted again' in last:  # else the first had stopped it already
        assert 'stopped without a checkpoint' in last, stderr
      else:
        assert last.startswith(f'{sig.name} at step ') and 'checkpoint saved' in last, stderr
  proc = _start(workdir, overrides, env)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-2000:]
  resumed, straight = _final(workdir), _final(reference)
  assert int(resumed['step']) == int(straight['step']) == 30
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_starting_ends_the_run_at_once_in_one_line(tiny_data_dir, tmp_path,
                                                                cache_dir, sig):
  # Before the training loop (setting up, compiling, evaluating step 0) a Ctrl-C is a
  # KeyboardInterrupt; the program then exits at once, as unwinding through TensorFlow's input
  # threads could hang or crash it, and says that nothing was saved yet. A SIGTERM there ended
  # the process without a word.
  workdir = tmp_path / 'run'
  # config.json is written just before the step-0 evaluation, which compiles the embedding
  # for seconds: the signal lands there, outside the loop.
  proc = _start(workdir, {'mode': 'train_and_evaluate', 'dataset.data_dir': tiny_data_dir},
                _env(4, cache_dir))
  deadline = time.time() + 300
  while not os.path.exists(workdir / 'config.json'):
    assert time.time() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  for _ in range(2 if sig == signal.SIGINT else 1):
    proc.send_signal(sig)
    time.sleep(0.3)
  _, stderr = proc.communicate(timeout=60)
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert proc.returncode == 128 + sig and 'Traceback' not in stderr, stderr[-3000:]
  said = 'interrupted' if sig == signal.SIGINT else 'SIGTERM'
  assert lines[-1] == (f'{said}; no checkpoint was saved yet, so the same command starts '
                       'the run again'), stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tiny_data_dir, tmp_path, cache_dir):
  overrides = {'input.num_shards': 2}
  reference = tmp_path / 'one_process'
  expected = train.train_and_evaluate(_config(tiny_data_dir, overrides), str(reference))
  overrides['dataset.data_dir'] = tiny_data_dir
  workdir = tmp_path / 'two_processes'
  port = _free_port()
  procs = [_start(workdir, overrides, _env(2, cache_dir), '--distributed',
                  f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                  f'--process_id={i}') for i in range(2)]
  for proc in procs:
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
  with open(workdir / 'eval' / 'metrics.json') as f:
    got = json.load(f)
  for key in ('mAP', 'acc@1', 'acc@5', 'acc@10'):
    assert abs(got[key] - expected[key]) <= 1e-5, key
  for a, b in zip(jax.tree.leaves(_final(workdir)['params']),
                  jax.tree.leaves(_final(reference)['params'])):
    np.testing.assert_allclose(a, b, atol=1e-5)

  # Evaluation from the checkpoint on a different number of devices (1 instead of 2 x 2).
  proc = _start(workdir, {**overrides, 'mode': 'evaluate'}, _env(1, cache_dir))
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  with open(workdir / 'eval' / 'metrics.json') as f:
    again = json.load(f)
  assert abs(again['mAP'] - expected['mAP']) <= 1e-5


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data_dir, tmp_path,
                                                                monkeypatch):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tiny_data_dir, {'mode': 'train', 'train.num_epochs': 1}),
                           workdir)
  bad = _config(tiny_data_dir, {'mode': 'train', 'train.num_epochs': 2})
  # The resumed run's loss is NaN from its first step on (a NaN in the config itself is refused
  # before training starts).
  monkeypatch.setattr(losses, 'cross_entropy_label_smoothing',
                      lambda logits, labels, epsilon: jnp.full((), jnp.nan))
  with pytest.raises(train.NonFiniteLossError,
                     match=r'non-finite loss, gradient or update at step 3; training stopped, '
                           r'the last good checkpoint is step 2 in .*checkpoints'):
    train.train_and_evaluate(bad, workdir)
  assert _saved_steps(workdir) == [2]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_final(workdir)['params']))


def test_a_nonfinite_update_is_neither_evaluated_nor_saved(tiny_data_dir, tmp_path, monkeypatch):
  # Finite loss and gradients, but every update makes the parameters non-finite: the step
  # cannot be undone, so the host must not evaluate it (step 2 evaluates; it neither logs nor
  # checkpoints) and must stop there with the step that went wrong.
  workdir = str(tmp_path / 'run')
  config = _config(tiny_data_dir, {'train.num_epochs': 3, 'train.eval_every_epochs': 1,
                                   'train.log_every_steps': 100,
                                   'train.checkpoint_every_steps': 100})
  monkeypatch.setattr(ts.optax, 'apply_updates',
                      lambda params, updates: jax.tree.map(lambda p, u: p + u * jnp.inf,
                                                           params, updates))
  with pytest.raises(train.NonFiniteLossError,
                     match=r'non-finite loss, gradient or update at step 1; training stopped, '
                           r'no checkpoint was saved before it'):
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'eval', 'history.jsonl')) as f:
    evaluated = [json.loads(line)['step'] for line in f]
  assert evaluated == [0]  # the untrained model's baseline only
  assert _saved_steps(workdir) == []


def _files_up_to(kilobytes: int) -> tuple[str, ...]:
  """A command prefix: the files the command writes stop growing at that size (a write past it
  fails with EFBIG, as one on a full disk fails with ENOSPC). SIGXFSZ, which would kill it, is
  ignored, and an ignored signal stays ignored across exec."""
  return ('bash', '-c', f'trap "" XFSZ; ulimit -f {kilobytes}; exec "$@"', 'bash')


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_next_run_resumes(
    tiny_data_dir, tmp_path, cache_dir):
  # A full disk used to end the run with Orbax's tracebacks, four times over, and a last line of
  # TensorStore's message; the failed save's temporary folder stayed, taking the space.
  workdir = tmp_path / 'run'
  overrides = {'mode': 'train', 'dataset.data_dir': tiny_data_dir}
  train.train_and_evaluate(_config(tiny_data_dir, {**overrides, 'train.num_epochs': 1}),
                           str(workdir))
  # The tiny model's checkpoint has a file of about 390 kB.
  proc = _start(workdir, {**overrides, 'train.num_epochs': 2}, _env(4, cache_dir),
                prefix=_files_up_to(200))
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 2, stderr
  assert stderr.splitlines()[-1] == (
      f'error: cannot write the checkpoint of step 4 in {workdir}/checkpoints: File too large; '
      'the newest whole checkpoint is step 2, which the same command resumes'), stderr
  assert 'Traceback' not in stderr and 'orbax' not in stderr, stderr
  assert _saved_steps(workdir) == [2]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4.orbax-checkpoint-tmp']
  # The next run's manager deletes the failed save's folder (in a thread of its own).
  checkpointing.Checkpointer(workdir / 'checkpoints')
  deadline = time.time() + 30
  while len(os.listdir(workdir / 'checkpoints')) > 1 and time.time() < deadline:
    time.sleep(0.05)
  assert os.listdir(workdir / 'checkpoints') == ['2']


def test_workdir_of_another_config_is_refused(tiny_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(tiny_data_dir, {'mode': 'train', 'train.num_epochs': 1}),
                           workdir)
  other = _config(tiny_data_dir, {'mode': 'train', 'train.num_epochs': 2})
  other.loss.metric = 'quadruplet'
  with pytest.raises(ValueError, match=r"holds checkpoints of a different config: loss.metric "
                                       r"\('triplet' -> 'quadruplet'\)"):
    train.train_and_evaluate(other, workdir)
  # Longer training of the same experiment is a resume, not a different config.
  longer = _config(tiny_data_dir, {'mode': 'train', 'train.num_epochs': 2})
  train.train_and_evaluate(longer, workdir)
  assert _saved_steps(workdir)[-1] == 4


def test_restoring_another_architecture_names_the_mismatching_arrays(tmp_path):
  def state_for(width, classes):
    c = configlib.base_config()
    c.model.backbone, c.model.width = 'resnet10_ibn_a', width
    tx, _ = optim.make_optimizer(c.optim, 1)
    return ts.create_train_state(build_model(c.model, classes), tx, classes,
                                 loss_config=c.loss)[1]

  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'))
  ckpt.save(1, state_for(8, 5))
  ckpt.wait()
  with pytest.raises(ValueError, match=r'does not fit this model .*params/classifier/kernel: '
                                       r'saved \(64, 5\), model \(64, 7\)'):
    ckpt.restore(state_for(8, 7))
  with pytest.raises(ValueError, match=r'params/backbone/conv1/kernel: saved \(7, 7, 3, 8\), '
                                       r'model \(7, 7, 3, 16\)'):
    ckpt.restore(state_for(16, 5))
