"""The accelerator figures of every benchmark, in one run that keeps to a time budget.

Runs the jobs below in order, each in its own process under its own time limit, and writes each
job's output to OUT/<job>.txt as it runs, and OUT/summary.md: for each job its command, how
long it took and how it ended. A job is started only while the time left in --budget covers
its estimate, and is stopped when the budget runs out, so what finished is always kept.

  rerank   Street2Shop-sized k-reciprocal re-ranking and metrics (Q 10,000, G 400,000,
           D 2,048), after the N = 10,000 case, whose host memory is the runtime's and the
           compiler's floor, and after the host memory that sending 1.6 GB to the device leaves:
           bench/retrieval_bench.py --cases=transfer,rerank,gpu_rerank
  resnet   ResNet50-IBN-A training and embedding at 320x320, bfloat16, batch 64, against the
           same model in PyTorch (torch.compile): bench/train_throughput.py
  profile  where that training step's device time goes: bench/step_profile.py
  pool     max pooling's forward and gradient, XLA's and pooling.max_pool's: bench/pool_bench.py
  service  the search service's requests/s with batching on and off (1 and 8 clients):
           bench/search_bench.py --skip-backends
  vit      ViT-B/16 training at 224x224, bfloat16, batch 64, against timm's model
           (torch.compile): bench/train_throughput.py --backbone=vit_b16
  vit_cudnn  the same JAX step with cuDNN's flash attention (--attention=cudnn)

  python bench/accelerator_suite.py --out /tmp/accel                       # all, ~8 min on an H200
  python bench/accelerator_suite.py --out /tmp/accel --jobs=rerank,resnet --budget=450
  python bench/accelerator_suite.py --out /tmp/accel --smoke               # CPU-sized

--smoke runs every job at CPU size (tiny models and images, the N = 10,000 re-ranking, a short
service run, PyTorch eager): it checks the commands, not the accelerator.
Nothing here needs TensorFlow: the service job builds its index from generated rows.
"""

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@dataclasses.dataclass(frozen=True)
class Job:
  what: str
  estimate_s: float            # on one H200: measured there (2026-11-30), or guessed
  full: tuple[str, ...]        # the script and its arguments
  smoke: tuple[str, ...]       # the same at CPU size


JOBS = {
    'rerank': Job(
        'Street2Shop-sized re-ranking (Q 10,000, G 400,000, D 2,048), after the N = 10,000 one '
        'and the host memory that sending 1.6 GB leaves', 95,
        ('retrieval_bench.py', '--cases=transfer,rerank,gpu_rerank'),
        ('retrieval_bench.py', '--cases=transfer,rerank')),
    'resnet': Job(
        'ResNet50-IBN-A 320x320 bf16 batch 64, JAX and PyTorch (torch.compile)', 150,
        ('train_throughput.py', '--sizes=320x320', '--batches=64', '--dtypes=bfloat16',
         '--torch_compile', '--json={out}/resnet.json'),
        ('train_throughput.py', '--backbone=resnet18_ibn_a', '--sizes=32x32', '--batches=16',
         '--dtypes=float32', '--warmup=1', '--steps=2', '--json={out}/resnet.json')),
    'profile': Job(
        'profile of that training step by kind of operation', 60,
        ('step_profile.py', '--trace_dir={out}/profile-trace', '--json={out}/profile.json',
         '--hlo={out}/profile-hlo.txt.gz'),
        ('step_profile.py', '--backbone=resnet18_ibn_a', '--width=16', '--size=32x32',
         '--batch=16', '--dtype=float32', '--warmup=1', '--steps=2',
         '--trace_dir={out}/profile-trace', '--json={out}/profile.json')),
    'pool': Job(
        "max pooling's forward and gradient, XLA's and pooling.max_pool's (64 x 160x160x64 bf16)",
        30, ('pool_bench.py',), ('pool_bench.py', '--batch=2', '--size=32', '--repeat=2')),
    'service': Job(
        'search service, batching on and off, 1 and 8 clients', 110,
        ('search_bench.py', '--skip-backends', '--tmp={out}/search',
         '--clients=1,8', '--seconds=10', '--warm-up=5'),
        ('search_bench.py', '--skip-backends', '--tmp={out}/search',
         '--service-rows=2000', '--clients=2', '--seconds=2', '--warm-up=1')),
    'vit': Job(
        'ViT-B/16 224x224 bf16 batch 64, JAX and timm (torch.compile)', 150,
        ('train_throughput.py', '--backbone=vit_b16', '--sizes=224x224', '--batches=64',
         '--dtypes=bfloat16', '--torch_compile', '--json={out}/vit.json'),
        ('train_throughput.py', '--backbone=vit_t16', '--sizes=32x32', '--batches=16',
         '--dtypes=float32', '--warmup=1', '--steps=2', '--json={out}/vit.json')),
    'vit_cudnn': Job(
        "the same JAX ViT-B/16 step with cuDNN's flash attention (model.attention=cudnn)", 90,
        ('train_throughput.py', '--backbone=vit_b16', '--attention=cudnn', '--sizes=224x224',
         '--batches=64', '--dtypes=bfloat16', '--frameworks=jax', '--json={out}/vit_cudnn.json'),
        ('train_throughput.py', '--backbone=vit_t16', '--attention=cudnn', '--sizes=32x32',
         '--batches=16', '--dtypes=float32', '--frameworks=jax', '--warmup=1', '--steps=2',
         '--json={out}/vit_cudnn.json')),
}


@dataclasses.dataclass
class Outcome:
  name: str
  command: list[str]
  ended: str          # 'ok', 'exit N', 'stopped after S s (budget)', 'skipped: ...'
  seconds: float = 0.0


def command_for(job: Job, out: Path, smoke: bool) -> list[str]:
  script, *arguments = job.smoke if smoke else job.full
  return [sys.executable, str(BENCH / script), *(a.format(out=out) for a in arguments)]


def run_jobs(names: list[str], out: Path, budget_s: float, smoke: bool = False,
             jobs: dict[str, Job] = JOBS) -> list[Outcome]:
  """Runs `names` in order within `budget_s` seconds; each job's output goes to out/<name>.txt
  and the summary to out/summary.md, rewritten after every job."""
  out.mkdir(parents=True, exist_ok=True)
  deadline = time.monotonic() + budget_s
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])), PYTHONUNBUFFERED='1')
  outcomes = []
  for name in names:
    job = jobs[name]
    command = command_for(job, out, smoke)
    left = deadline - time.monotonic()
    if not smoke and left < job.estimate_s:
      outcomes.append(Outcome(name, command, f'skipped: {left:.0f} s left, the job takes '
                                             f'about {job.estimate_s:.0f} s'))
      write_summary(outcomes, out, smoke)
      continue
    print(f'== {name}: {job.what}', flush=True)
    start = time.monotonic()
    with open(out / f'{name}.txt', 'w') as log:
      log.write('$ ' + ' '.join(command) + '\n')
      log.flush()
      process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=ROOT, start_new_session=True)
      try:
        code = process.wait(timeout=max(left, 1.0))
        ended = 'ok' if code == 0 else f'exit {code}'
      except subprocess.TimeoutExpired:
        ended = f'stopped after {time.monotonic() - start:.0f} s (budget)'
      finally:
        # The job's whole process group: its cases' processes, a server it left behind, and
        # everything when the suite itself is interrupted.
        _kill_group(process)
    outcomes.append(Outcome(name, command, ended, time.monotonic() - start))
    print(f'   {ended}, {outcomes[-1].seconds:.0f} s', flush=True)
    write_summary(outcomes, out, smoke)
  return outcomes


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:  # the group is gone already
    pass
  process.wait()


def write_summary(outcomes: list[Outcome], out: Path, smoke: bool) -> None:
  lines = [f'# accelerator suite{" (smoke)" if smoke else ""}, '
           f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}', '',
           '| job | ended | seconds | command |', '|---|---|---|---|']
  for o in outcomes:
    shown = ' '.join(Path(a).name if a.endswith('.py') else a for a in o.command[1:])
    lines.append(f'| {o.name} | {o.ended} | {o.seconds:.0f} | `{shown}` |')
  lines.append('')
  for o in outcomes:
    log = out / f'{o.name}.txt'
    if log.exists():
      tail = log.read_text(errors='replace').splitlines()[-40:]
      lines += [f'## {o.name}', '', '```', *tail, '```', '']
  (out / 'summary.md').write_text('\n'.join(lines))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder for the outputs and summary.md')
  parser.add_argument('--jobs', default=','.join(JOBS), help=f'from {", ".join(JOBS)}')
  parser.add_argument('--budget', type=float, default=900.0,
                      help='seconds for all the jobs together')
  parser.add_argument('--smoke', action='store_true', help='CPU-sized versions of the jobs')
  args = parser.parse_args(argv)
  names = [n for n in args.jobs.split(',') if n]
  unknown = [n for n in names if n not in JOBS]
  if unknown:
    parser.error(f'unknown jobs {", ".join(unknown)}; choose from {", ".join(JOBS)}')
  outcomes = run_jobs(names, Path(args.out).resolve(), args.budget, args.smoke)
  print((Path(args.out) / 'summary.md').read_text().split('\n## ')[0])
  return 0 if all(o.ended == 'ok' for o in outcomes) else 1


if __name__ == '__main__':
  sys.exit(main())
