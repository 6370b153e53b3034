"""Training and embedding throughput of the ReID model on every local device, against PyTorch.

Each case (framework, image size, batch, dtype) runs in its own process, so peak device memory
is that case's own and JAX's preallocation never competes with PyTorch's allocator. Batches are
created on the device before timing: this measures the model, not the host input pipeline
(`bench/input_pipeline_bench.py` measures that). Prints one table; `--json` also writes it.

  # the accelerator grid (ResNet50-IBN-A, last stride 1)
  python bench/train_throughput.py
  # ViT-B/16 against timm's VisionTransformer, compiled
  python bench/train_throughput.py --backbone=vit_b16 --sizes=224x224,256x256 --batches=64,128 \
      --dtypes=bfloat16 --torch_compile
  # a small CPU run
  python bench/train_throughput.py --backbone=resnet18_ibn_a --width=16 --sizes=64x64 \
      --batches=16 --dtypes=float32 --steps=3
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The flags that say which model is built (_jax_setup reads them), passed on to each case.
MODEL_FLAGS = ('backbone', 'width', 'last_stride', 'num_classes', 'k', 'attention')

# Dense peak TFLOP/s per device from the vendors' datasheets. float32 convolutions and matmuls
# run as TF32 on these GPUs under both frameworks' defaults, so TF32 is the float32 peak.
PEAK_TFLOPS = {
    ('H100', 'bfloat16'): 989.4, ('H100', 'float32'): 494.7,
    ('H200', 'bfloat16'): 989.4, ('H200', 'float32'): 494.7,
    ('A100', 'bfloat16'): 312.0, ('A100', 'float32'): 156.0,
    ('TPU v4', 'bfloat16'): 275.0, ('TPU v5 lite', 'bfloat16'): 197.0,
    ('TPU v5p', 'bfloat16'): 459.0, ('TPU v6', 'bfloat16'): 918.0,
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  for (kind, peak_dtype), value in PEAK_TFLOPS.items():
    if kind.lower() in device_kind.lower() and peak_dtype == dtype:
      return value
  return None


def timed_loop(run_step, sync, warmup: int, steps: int) -> tuple[float, float]:
  """Returns (seconds of the first call, seconds per step in steady state)."""
  start = time.perf_counter()
  run_step()
  sync()
  first = time.perf_counter() - start
  for _ in range(warmup):
    run_step()
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    run_step()
  sync()
  return first, (time.perf_counter() - start) / steps


def _jax_setup(args, height: int, width: int, batch: int, dtype: str):
  """The model's train state, a device batch and the jitted step and embedding functions."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from fashion_jax import configlib, optim
  from fashion_jax import train_step as ts
  from fashion_jax.models import build_model

  config = configlib.base_config()
  config.model.backbone = args.backbone
  config.model.width = args.width
  config.model.last_stride = args.last_stride
  config.model.attention = args.attention
  config.model.dtype = dtype
  mesh = ts.make_mesh()
  devices = mesh.devices.size
  if batch % (devices * args.k):
    raise SystemExit(f'error: batch {batch} is not a multiple of {devices} devices x K={args.k}')
  model = build_model(config.model, args.num_classes)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=1000)
  graphdef, state = ts.create_train_state(model, tx, args.num_classes, loss_config=config.loss)
  state = ts.replicate(state, mesh)
  del model

  key = jax.random.key(0)
  images = jax.random.randint(key, (batch, height, width, 3), 0, 256, jnp.int32).astype(jnp.uint8)
  labels = jnp.repeat(jnp.arange(batch // args.k, dtype=jnp.int32), args.k)
  data = NamedSharding(mesh, P(ts.DATA_AXIS))
  images, labels = jax.device_put((images, labels), data)
  step_fn = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  return mesh, state, images, labels, step_fn, ts.make_embed_fn(graphdef, mesh)


def flops_case(args, height: int, width: int, batch: int, dtype: str) -> dict:
  """FLOPs of one training step and one embedding batch, from the lowered (uncompiled) modules.

  The shard_map body of the step is one device's program: its count times the devices; the
  embedding function is a global program.
  """
  mesh, state, images, labels, step_fn, embed_fn = _jax_setup(args, height, width, batch, dtype)
  return {'flops_per_step': _flops(step_fn.lower(state, images, labels)) * mesh.devices.size,
          'embed_flops': _flops(embed_fn.lower(state['params'], state['batch_stats'], images))}


def _cpu_flops(args, height: int, width: int, batch: int, dtype: str) -> dict:
  """flops_case run on the CPU backend (one device) in a subprocess: the count of the same
  program, for backends whose lowered modules give no cost analysis (GPUs, with jax 0.11)."""
  command = [sys.executable, __file__, '--_case', f'flops:{height}x{width}:{batch}:{dtype}']
  command += [f'--{name}={getattr(args, name)}' for name in MODEL_FLAGS]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  done = subprocess.run(command, capture_output=True, text=True, env=env)
  lines = [line for line in done.stdout.splitlines() if line.startswith('RESULT ')]
  return json.loads(lines[-1][len('RESULT '):]) if lines else {}


def jax_case(args, height: int, width: int, batch: int, dtype: str) -> dict:
  import jax

  mesh, state, images, labels, step_fn, embed_fn = _jax_setup(args, height, width, batch, dtype)
  devices = mesh.devices.size
  start = time.perf_counter()
  lowered = step_fn.lower(state, images, labels)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # The shard_map body is one device's program: its count times the devices.
  flops = _flops(lowered) * devices

  box = {'state': state}

  def train():
    box['state'], box['metrics'] = compiled(box['state'], images, labels)

  _, step_s = timed_loop(train, lambda: jax.block_until_ready(box['state']), args.warmup,
                         args.steps)
  loss = float(box['metrics']['loss'])

  params, batch_stats = box['state']['params'], box['state']['batch_stats']
  start = time.perf_counter()
  embed_lowered = embed_fn.lower(params, batch_stats, images)
  embed_compiled = embed_lowered.compile()
  embed_compile_s = time.perf_counter() - start
  embed_flops = _flops(embed_lowered)  # a global (not per-device) program
  out = {}

  def embed():
    out['emb'] = embed_compiled(params, batch_stats, images)

  _, embed_s = timed_loop(embed, lambda: jax.block_until_ready(out['emb']), args.warmup,
                          args.steps)
  if not flops or not embed_flops:
    counted = _cpu_flops(args, height, width, batch, dtype)
    flops = flops or counted.get('flops_per_step', 0.0)
    embed_flops = embed_flops or counted.get('embed_flops', 0.0)
  stats = [d.memory_stats() or {} for d in mesh.devices.flat]
  peak = max((s.get('peak_bytes_in_use', 0) for s in stats), default=0)
  return {
      'device': f'{devices} x {jax.devices()[0].device_kind}', 'device_kind': jax.devices()[0].device_kind,
      'devices': devices, 'compile_s': compile_s, 'step_s': step_s, 'flops_per_step': flops,
      'embed_compile_s': embed_compile_s, 'embed_s': embed_s, 'embed_flops': embed_flops,
      'peak_bytes': peak or None, 'loss': loss, 'version': f'jax {jax.__version__}',
  }


def _flops(lowered) -> float:
  """FLOPs of the lowered (not yet compiled) module.

  The compiled module's cost analysis is no count on GPUs: there convolutions become cuDNN
  custom calls that it counts as zero (0.75 GFLOP per 320x320 training image on an H200,
  against 74 before compilation), so the lowered module is counted. Where the backend gives
  no analysis of it (None: GPUs with jax 0.11), this returns 0 and jax_case counts the same
  program on the CPU backend instead (_cpu_flops).
  """
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per module
    analysis = analysis[0]
  return float((analysis or {}).get('flops', 0.0))  # None where a backend gives no analysis


def torch_case(args, height: int, width: int, batch: int, dtype: str) -> dict:
  import torch

  sys.path.insert(0, str(ROOT / 'bench'))
  import torch_reid

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default float32 precision on GPUs
  torch.backends.cudnn.allow_tf32 = True
  model = torch_reid.ReIDModel(args.backbone, args.width, args.last_stride, args.num_classes,
                               image_size=(height, width))
  model = model.to(device, memory_format=torch.channels_last)
  step = torch_reid.TrainStep(model, args.num_classes, amp_dtype=torch.bfloat16
                              if dtype == 'bfloat16' else None, device=device)
  generator = torch.Generator(device='cpu').manual_seed(0)
  images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
  images = images.to(device).contiguous(memory_format=torch.channels_last)
  labels = torch.arange(batch // args.k, device=device).repeat_interleave(args.k)
  compiled_note = 'eager'
  if args.torch_compile:
    try:
      step.compile()
      compiled_note = 'torch.compile'
    except Exception as error:  # noqa: BLE001 - reported, then eager mode is measured
      compiled_note = f'eager (torch.compile failed: {type(error).__name__})'

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  box = {}

  def train():
    box['loss'] = step(images, labels)

  try:
    first_s, step_s = timed_loop(train, sync, args.warmup, args.steps)
  except Exception as error:  # noqa: BLE001
    if compiled_note != 'torch.compile':
      raise
    compiled_note = f'eager (torch.compile failed: {type(error).__name__})'
    step.uncompile()
    first_s, step_s = timed_loop(train, sync, args.warmup, args.steps)
  embed = step.embedder()
  out = {}

  def run_embed():
    out['emb'] = embed(images)

  embed_first_s, embed_s = timed_loop(run_embed, sync, args.warmup, args.steps)
  return {
      'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
      'devices': 1, 'compile_s': first_s, 'step_s': step_s, 'flops_per_step': None,
      'embed_compile_s': embed_first_s, 'embed_s': embed_s, 'embed_flops': None,
      'peak_bytes': torch.cuda.max_memory_allocated() if device.type == 'cuda' else None,
      'loss': float(box['loss']), 'version': f'torch {torch.__version__}, {compiled_note}',
  }


def error_line(stderr: str) -> str:
  """The exception a failed case's stderr ends with ('NotImplementedError: ...'), not the notes
  JAX prints after it (traceback filtering); else its last line."""
  lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
  raised = [line for line in lines if re.match(r'[\w.]*(Error|Exception|Exit)\b', line)]
  return (raised or lines or ['no output'])[-1]


def run_case(args, framework: str, size: str, batch: int, dtype: str) -> dict:
  """Runs one case in a fresh process and returns its measurements (or its error)."""
  command = [sys.executable, __file__, '--_case', f'{framework}:{size}:{batch}:{dtype}']
  command += [f'--{name}={getattr(args, name)}' for name in
              (*MODEL_FLAGS, 'warmup', 'steps')]
  command += ['--torch_compile'] if args.torch_compile else []
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  try:
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=args.case_timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'no result within --case_timeout={args.case_timeout} s'}
  lines = [line for line in done.stdout.splitlines() if line.startswith('RESULT ')]
  if done.returncode or not lines:
    return {'error': error_line(done.stderr)[:200]}
  return json.loads(lines[-1][len('RESULT '):])


def table(rows: list[dict]) -> str:
  header = ('| framework | size | batch | dtype | train img/s | step ms | compile s | GFLOP/img '
            '| TFLOP/s | MFU | embed img/s | peak mem GB | vs torch | loss |')
  lines = [header, '|' + '---|' * 14]
  for row in rows:
    r = row['result']
    if 'error' in r:
      lines.append(f"| {row['framework']} | {row['size']} | {row['batch']} | {row['dtype']} | "
                   f"error: {r['error']} |" + ' |' * 9)
      continue
    images_s = row['batch'] / r['step_s']
    flops = r['flops_per_step'] or row.get('flops_per_step') or 0
    tflops = flops / r['step_s'] / 1e12
    peak = peak_tflops(r.get('device_kind', r['device']), row['dtype'])
    mfu = f'{100 * tflops / (peak * r["devices"]):.1f}%' if peak and tflops else '-'
    memory = f"{r['peak_bytes'] / 2**30:.1f}" if r['peak_bytes'] else '-'
    ratio = f"{row['ratio']:.2f}x" if row.get('ratio') else '-'
    lines.append(
        f"| {row['framework']} | {row['size']} | {row['batch']} | {row['dtype']} | {images_s:.0f} | "
        f"{1000 * r['step_s']:.1f} | {r['compile_s']:.1f} | {flops / row['batch'] / 1e9:.2f} | "
        f"{tflops:.3g} | {mfu} | "
        f"{row['batch'] / r['embed_s']:.0f} | {memory} | {ratio} | {r['loss']:.3f} |")
  return '\n'.join(lines)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  """MODEL_FLAGS, with the paper's ResNet50-IBN-A (last stride 1) as the default."""
  parser.add_argument('--backbone', default='resnet50_ibn_a')
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--last_stride', type=int, default=1)
  parser.add_argument('--num_classes', type=int, default=5000)
  parser.add_argument('--k', type=int, default=4, help='images per identity')
  parser.add_argument('--attention', default='xla',
                      help="ViTs' attention kernels, model.attention: 'xla' or 'cudnn'")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_model_flags(parser)
  parser.add_argument('--sizes', default='256x128,320x320', help='HxW,...')
  parser.add_argument('--batches', default='64,128')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--frameworks', default='jax,torch')
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--torch_compile', action='store_true', help='torch.compile the step')
  parser.add_argument('--case_timeout', type=float, default=None,
                      help='seconds after which one case is stopped and reported as an error')
  parser.add_argument('--json', help='also write the rows to this file')
  parser.add_argument('--_case', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._case:
    framework, size, batch, dtype = args._case.split(':')
    height, width = (int(v) for v in size.split('x'))
    fn = {'jax': jax_case, 'torch': torch_case, 'flops': flops_case}[framework]
    print('RESULT ' + json.dumps(fn(args, height, width, int(batch), dtype)), flush=True)
    return

  frameworks = args.frameworks.split(',')
  if 'torch' in frameworks:
    if importlib.util.find_spec('torch') is None:
      print('PyTorch is not installed: measuring JAX only (pip install "fashion_jax[torch]")')
      frameworks.remove('torch')
  rows = []
  for size in args.sizes.split(','):
    for batch in (int(b) for b in args.batches.split(',')):
      for dtype in args.dtypes.split(','):
        group = []
        for framework in frameworks:
          result = run_case(args, framework, size, batch, dtype)
          group.append({'framework': framework, 'size': size, 'batch': batch, 'dtype': dtype,
                        'result': result})
          print(f'{framework} {size} batch {batch} {dtype}: '
                + (result['error'] if 'error' in result else
                   f"{batch / result['step_s']:.0f} train img/s, "
                   f"{batch / result['embed_s']:.0f} embed img/s"), flush=True)
        by_name = {row['framework']: row['result'] for row in group}
        if 'jax' in by_name and 'torch' in by_name and not any('error' in r for r in
                                                                 by_name.values()):
          group[0]['ratio'] = by_name['torch']['step_s'] / by_name['jax']['step_s']
          # Same model, so the same FLOPs per step: count them once, from XLA's analysis.
          for row in group[1:]:
            row['flops_per_step'] = by_name['jax']['flops_per_step']
        rows += group
  print()
  first = next((row['result'] for row in rows if 'error' not in row['result']), {})
  print(f"{args.backbone}, width {args.width}, last stride {args.last_stride}, "
        f"{args.num_classes} classes, K={args.k}; {first.get('device', '?')}; "
        + '; '.join(sorted({row['result'].get('version', '') for row in rows} - {''})))
  print(table(rows))
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
  main()
