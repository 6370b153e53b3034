"""The accelerator suite: its time budget, its summary and its jobs' scripts (the jobs run at CPU
size by hand: `python bench/accelerator_suite.py --out DIR --smoke`)."""

import os
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'bench'))
import accelerator_suite as suite  # noqa: E402


def _script(folder, name, body):
  path = folder / f'{name}.py'
  path.write_text(textwrap.dedent(body))
  return str(path)


def _running(pid: int) -> bool:
  """Whether `pid` is a live process (a zombie, killed but not yet reaped, is not)."""
  for _ in range(50):
    try:
      with open(f'/proc/{pid}/stat') as f:
        state = f.read().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:
      return False
    if state == 'Z':
      return False
    time.sleep(0.1)
  return True


def test_jobs_keep_to_the_budget_and_stopped_jobs_take_their_children(tmp_path):
  scripts = tmp_path / 'scripts'
  scripts.mkdir()
  ok = _script(scripts, 'ok', "import sys; print('measured', sys.argv[1:])")
  fail = _script(scripts, 'fail', "import sys; print('half'); sys.exit(3)")
  child_pid = tmp_path / 'child.pid'
  hang = _script(scripts, 'hang', f"""
      import subprocess, sys, time
      child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
      open({str(child_pid)!r}, 'w').write(str(child.pid))
      print('waiting', flush=True)
      time.sleep(60)
      """)
  jobs = {
      'ok': suite.Job('prints', 0.1, (ok, '--out={out}'), (ok,)),
      'fail': suite.Job('fails', 0.1, (fail,), (fail,)),
      'hang': suite.Job('never ends', 0.1, (hang,), (hang,)),
      'late': suite.Job('too long for what is left', 100, (ok,), (ok,)),
  }
  out = tmp_path / 'out'
  start = time.monotonic()
  outcomes = suite.run_jobs(list(jobs), out, budget_s=4, jobs=jobs)
  assert time.monotonic() - start < 20
  ended = {o.name: o.ended for o in outcomes}
  assert ended['ok'] == 'ok' and ended['fail'] == 'exit 3'
  assert ended['hang'].startswith('stopped after') and ended['late'].startswith('skipped')
  assert f"measured ['--out={out}']" in (out / 'ok.txt').read_text()
  assert 'waiting' in (out / 'hang.txt').read_text()
  assert not _running(int(child_pid.read_text()))
  summary = (out / 'summary.md').read_text()
  for name in jobs:
    assert f'| {name} | {ended[name]} |' in summary
  assert 'half' in summary  # the failed job's output is in the summary


def test_unknown_jobs_are_refused(tmp_path):
  with pytest.raises(SystemExit):
    suite.main(['--out', str(tmp_path), '--jobs=rerank,mfu'])



def test_every_job_names_a_script_of_the_bench():
  for name, job in suite.JOBS.items():
    for command in (job.full, job.smoke):
      assert (suite.BENCH / command[0]).is_file(), (name, command[0])
      assert all(a.startswith('--') for a in command[1:]), (name, command)
