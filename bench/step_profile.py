"""Where a training step's device time goes: a profile of the jitted step, summed by kind of op.

Builds the step as bench/train_throughput.py does (same model, batch, dtype and data-parallel
mesh), compiles it, runs --warmup steps, then records --steps steps with jax.profiler and sums
the duration of every operation the step's program ran on the devices, by kind. The kind comes
from the compiled program (its HLO text): an operation is the instruction the profiler names
(a fusion, a library call, a copy), and it is

  convolution   a convolution, a library call that runs one (cuDNN's custom calls), or a fusion
                holding one (with whatever was fused around it);
  normalisation an operation made from the normalisation layers' code, forward or backward (the
                named scopes batch_norm, instance_norm and ibn of fashion_jax/models/layers.py
                in its metadata), with whatever XLA fused into it (an activation, a residual
                sum); for programs without those names, a fusion holding a reduction of an
                [N, H, W, C] activation over its spatial axes (and the batch's) per channel;
  pooling       max pooling and its gradient (reduce-window, select-and-scatter, or the scatter
                that XLA's GPU compiler makes of the latter);
  reduction     any other reduction (the losses, the optimiser's norms, the non-finite guard);
  matmul        a dot product (the classifier, the losses' distance matrices);
  collective    all-reduce, all-gather and the like (gradients across devices);
  elementwise   every other fusion or operation: normalisation applied, activations, the
                optimiser's updates, layout copies.

On GPUs XLA replays runs of kernels as command buffers (CUDA graphs), which the trace shows as
one event each, not as the operations inside; the profile therefore turns them off
(--xla_gpu_enable_command_buffer=, added to XLA_FLAGS) unless --command_buffers is given. The
step it times is then the one without graphs; train_throughput.py times the default step.

Beside each kind's time, the bytes its operations move per step, estimated from the program
(each operation's result plus its operands, each read whole once; `traffic()`), and the rate
that gives. Outside the convolutions the step is mostly bound by memory, so those bytes at the
device's datasheet bandwidth are a floor for that part of the step. --program reads a program
saved by --hlo and prints its operations and bytes per kind without running anything.

Device time overlaps wall time only where nothing else runs: the table gives both, and the sum
over kinds is the busy time of the devices (operations on several streams may overlap). On CPU
the operations are the thunks XLA's CPU runtime runs, timed on the host's threads.

  python bench/step_profile.py                                  # ResNet50-IBN-A 320x320 bf16 64
  python bench/step_profile.py --backbone=resnet18_ibn_a --width=16 --size=64x64 --batch=16 \
      --dtype=float32 --steps=3                                 # a small CPU run
  python bench/step_profile.py --program=profile-hlo.txt.gz --device_kind=H200
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))

KINDS = ('convolution', 'normalisation', 'pooling', 'reduction', 'matmul', 'collective',
         'elementwise')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
                'all-reduce-start', 'all-gather-start', 'collective-permute-start')


# The named scopes of fashion_jax/models/layers.py's normalisation layers, as they appear in
# an operation's op_name ('jit(step)/transpose(jvp(batch_norm))/reduce_sum').
_NORMALISATION_SCOPE = re.compile(r'(?<![\w])(batch_norm|instance_norm|ibn)(?![\w])')


def _shape_end(text: str) -> int:
  """Index just past the shape that starts `text` (a tuple shape is parenthesised)."""
  if not text.startswith('('):
    return text.find(' ')
  depth = 0
  for i, char in enumerate(text):
    depth += {'(': 1, ')': -1}.get(char, 0)
    if depth == 0:
      return i + 1
  return len(text)


def _rank(shape: str) -> int | None:
  """Number of dimensions of an array shape's text (f32[4,16,16,8]{3,2,1,0}); None for tuples."""
  match = re.match(r'\w+\[([\d,]*)\]', shape)
  return len([d for d in match.group(1).split(',') if d]) if match else None


def _per_channel_statistics(call: str, ranks: dict) -> bool:
  """Whether a reduce (its text from the opcode on) sums a rank-4 operand over axes 1 and 2,
  and maybe 0, keeping the last: NHWC statistics per channel (BatchNorm, InstanceNorm)."""
  operand = re.match(r'reduce\(\s*(?:\w+\[[\d,]*\]\S*\s+)?%?([\w.\-]+)', call)
  dimensions = re.search(r'dimensions=\{([\d,]*)\}', call)
  if not operand or not dimensions:
    return False
  axes = {int(a) for a in dimensions.group(1).split(',') if a}
  return ranks.get(operand.group(1)) == 4 and {1, 2} <= axes <= {0, 1, 2}


def parse_hlo(text: str) -> tuple[dict, dict]:
  """The compiled module's instructions and computations.

  Returns ({instruction name: (opcode, [called computations], custom-call target)},
  {computation name: [its instruction names]}).
  """
  instructions, computations, ranks, current = {}, {}, {}, None
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith('//'):
      continue
    if not line[0].isspace():
      match = re.match(r'(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)', line)
      if match and line.rstrip().endswith('{'):
        current = match.group(1)
        computations[current] = []
      continue
    match = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$', line)
    if not match or current is None:
      continue
    name, rest = match.groups()
    ranks[name] = _rank(rest)
    after = rest[_shape_end(rest):].lstrip()
    opcode = re.match(r'([\w\-]+)\(', after)
    if not opcode:
      continue
    called = re.findall(r'(?:calls|to_apply|body|condition|branch_computations)='
                        r'\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?', after)
    called = [c.strip().lstrip('%') for group in called for c in group.split(',')]
    target = re.search(r'custom_call_target="([^"]+)"', after)
    target = target.group(1) if target else ''
    if opcode.group(1) == 'reduce' and _per_channel_statistics(after, ranks):
      target = 'per-channel statistics'
    op_name = re.search(r'op_name="([^"]*)"', after)
    op_name = op_name.group(1) if op_name else ''
    if not target and _NORMALISATION_SCOPE.search(op_name):
      target = 'normalisation layer'
    window = re.search(r'window=\{size=([\dx]+)', after)
    if opcode.group(1) == 'select-and-scatter' or 'select_and_scatter' in op_name or (
        opcode.group(1) == 'reduce-window' and window and window.group(1).count('x') == 3):
      target = 'spatial window'  # pooling over H and W (XLA also cuts other reductions in windows)
    instructions[name] = (opcode.group(1), called, target)
    computations[current].append(name)
  return instructions, computations


_ELEMENT_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                  's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                  'f8e4m3fn': 1, 'f8e5m2': 1}
# Opcodes that launch no work of their own: a view, a constant, a tuple's parts, or control
# flow whose work is in the computations it runs (counted there).
_NO_TRAFFIC = {'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast', 'after-all',
               'conditional', 'while', 'call', 'partition-id', 'replica-id', 'iota'}


def _array_bytes(shape: str, *, skip_scratch: bool = False) -> int:
  """Bytes of the arrays in a shape's text (a tuple's summed). `skip_scratch` leaves out u8
  arrays: the workspace a library call (cuDNN, cuBLAS) returns beside its result."""
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]', shape):
    if dtype not in _ELEMENT_BYTES or (skip_scratch and dtype == 'u8'):
      continue
    count = 1
    for dim in filter(None, dims.split(',')):
      count *= int(dim)
    total += count * _ELEMENT_BYTES[dtype]
  return total


def _kernels(text: str) -> tuple[dict, dict]:
  """The operations of a compiled program that run as kernels, and how its computations call
  each other: ({instruction: (its computation, opcode, the text after its opcode)},
  {computation: the computations its control flow runs, by instruction}).

  A kernel is an instruction at the top level of a computation that is not a fusion's body or
  a reduction's combiner, and not a view, a constant or control flow.
  """
  lines, fused, current = [], set(), None
  for line in text.splitlines():
    if line and not line[0].isspace():
      match = re.match(r'(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)', line)
      current = match.group(1) if match and line.rstrip().endswith('{') else None
      continue
    match = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$', line)
    if not match or current is None:
      continue
    name, rest = match.groups()
    end = _shape_end(rest)
    after = rest[end:].lstrip()
    opcode = re.match(r'([\w\-]+)\(', after)
    if opcode:
      lines.append((current, name, opcode.group(1), rest[:end], after))
      # A fusion's body and a reduction's or scatter's combiner run inside their caller's
      # kernel; a call's body (XLA's GPU command buffers) and control flow's run their own.
      if opcode.group(1) not in ('call', 'conditional', 'while', 'custom-call'):
        fused.update(re.findall(r'\b(?:calls|to_apply|select|scatter)=%?([\w.\-]+)', after))
  kernels, control = {}, collections.defaultdict(list)
  for computation, name, opcode, shape, after in lines:
    if opcode in ('conditional', 'while', 'call'):
      branches = re.findall(r'(?:true_computation|false_computation|body|condition|to_apply)='
                            r'%?([\w.\-]+)', after)
      group = re.search(r'branch_computations=\{([^}]*)\}', after)
      branches += [b.strip().lstrip('%') for b in group.group(1).split(',')] if group else []
      control[computation].append((opcode, branches))
    elif (computation not in fused and opcode not in _NO_TRAFFIC
          and not opcode.endswith('-done')):  # an async op's bytes are its start's
      kernels[name] = (computation, opcode, shape, after)
  return kernels, control


def traffic(text: str) -> dict:
  """{instruction name: bytes it reads and writes} for every operation of a compiled program
  that runs as a kernel: its result, plus each operand read whole once.

  An estimate: an operation that reads part of an operand (a slice) is charged all of it, and
  one that reads an operand twice is charged once. A library call's u8 workspace is left out.
  """
  shapes = {}
  for line in text.splitlines():
    match = re.match(r'\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$', line)
    if match:
      shapes[match.group(1)] = match.group(2)[:_shape_end(match.group(2))]
  found = {}
  for name, (_, opcode, shape, after) in _kernels(text)[0].items():
    depth, close = 0, len(after)
    for i, char in enumerate(after):
      depth += {'(': 1, ')': -1}.get(char, 0)
      if depth == 0 and char == ')':
        close = i
        break
    operands = set(re.findall(r'%([\w.\-]+)', after[len(opcode) + 1:close]))
    found[name] = (_array_bytes(shape, skip_scratch=opcode == 'custom-call')
                   + sum(_array_bytes(shapes.get(operand, '')) for operand in operands))
  return found


def one_step_traffic(text: str) -> dict:
  """traffic() of the operations one run of the program executes, read from its text alone:
  a loop's body counted once, and of a conditional's branches the one that moves most bytes
  (the training step's guard: its update, not its rarely taken alternative)."""
  kernels, control = _kernels(text)
  moved = traffic(text)
  members = collections.defaultdict(list)
  for name, (computation, *_) in kernels.items():
    members[computation].append(name)
  entry = re.search(r'^ENTRY\s+%?([\w.\-]+)', text, re.M).group(1)

  def run(computation, seen=()):
    if computation in seen:
      return {}
    found = {name: moved[name] for name in members[computation]}
    for opcode, called in control.get(computation, ()):
      parts = [run(c, (*seen, computation)) for c in called]
      if opcode == 'conditional':
        parts = [max(parts, key=lambda p: sum(p.values()), default={})]
      for part in parts:
        found.update(part)
    return found

  return run(entry)


def describe(text: str, names) -> dict:
  """{name: (its result shape, layouts dropped; its op_name, outer jit dropped)} for the named
  instructions of a compiled module's text; a profiler's 'fusion_3' finds 'fusion.3'."""
  wanted = {}
  for name in names:
    for candidate in (name, re.sub(r'_(\d+)$', r'.\1', name)):
      wanted.setdefault(candidate, name)
  found = {}
  for line in text.splitlines():
    match = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$', line)
    if not match or match.group(1) not in wanted or wanted[match.group(1)] in found:
      continue
    rest = match.group(2)
    shape = re.sub(r'/\*index=\d+\*/', '', re.sub(r'\{[\d,]*\}', '', rest[:_shape_end(rest)]))
    if len(shape) > 80:  # a long tuple: its start is enough to recognise it
      shape = shape[:76] + ' ...'
    op_name = re.search(r'op_name="([^"]*)"', rest)
    source = re.sub(r'^jit\([^)]*\)/', '', op_name.group(1)) if op_name else ''
    found[wanted[match.group(1)]] = (shape, source)
  return found


def _opcodes(name: str, instructions: dict, computations: dict, seen=None) -> set:
  """Opcodes of an instruction and of every computation it calls (a fusion's body)."""
  seen = set() if seen is None else seen
  if name in seen or name not in instructions:
    return set()
  seen.add(name)
  opcode, called, target = instructions[name]
  found = {opcode, f'custom-call:{target.lower()}'} if target else {opcode}
  for computation in called:
    for inner in computations.get(computation, ()):
      found |= _opcodes(inner, instructions, computations, seen)
  return found


def kind_of(name: str, instructions: dict, computations: dict) -> str:
  """The kind (KINDS) of the instruction `name` of the compiled program."""
  ops = _opcodes(name, instructions, computations)
  if 'convolution' in ops or any(op.startswith('custom-call:') and 'conv' in op for op in ops):
    return 'convolution'
  if any(op in ops for op in _COLLECTIVES):
    return 'collective'
  if 'custom-call:per-channel statistics' in ops or 'custom-call:normalisation layer' in ops:
    return 'normalisation'
  if 'custom-call:spatial window' in ops:
    return 'pooling'
  if 'reduce' in ops or 'reduce-window' in ops:
    return 'reduction'
  if 'dot' in ops or any(op.startswith('custom-call:') and ('gemm' in op or 'matmul' in op)
                         for op in ops):
    return 'matmul'
  return 'elementwise'


def _kernel_kind(kernel: str) -> str | None:
  """A kind from a library kernel's own name, for events the program's names do not match."""
  kernel = kernel.lower()
  if any(word in kernel for word in ('conv', 'fprop', 'dgrad', 'wgrad', 'implicit_gemm')):
    return 'convolution'
  if any(word in kernel for word in ('gemm', 'matmul')):
    return 'matmul'
  if 'nccl' in kernel or 'all_reduce' in kernel:
    return 'collective'
  return None


def device_events(trace_dir: str, module_names: set) -> list[tuple[str, float]]:
  """(instruction or kernel name, microseconds) of every operation of the named modules in the
  newest trace under `trace_dir`: device streams on accelerators, XLA's thunks on CPU."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise SystemExit(f'error: jax.profiler wrote no trace under {trace_dir}')
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes = {e['pid']: e['args'].get('name', '') for e in events
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e.get('tid')): e['args'].get('name', '') for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  accelerator = {pid for pid, name in processes.items() if '/device:' in name}
  # An accelerator's trace shows the same work on several lines: per module, per XLA op and
  # per stream (the kernels). Ops are counted from the 'XLA Ops' line, else from the streams.
  ops_lines = {key for key, name in threads.items() if key[0] in accelerator and name == 'XLA Ops'}
  if not ops_lines:
    ops_lines = {key for key, name in threads.items()
                 if key[0] in accelerator and name.startswith('Stream')}
  found = []
  for event in events:
    if event.get('ph') != 'X' or 'dur' not in event:
      continue
    args = event.get('args') or {}
    module = args.get('hlo_module', '')
    if accelerator:
      if (event.get('pid'), event.get('tid')) not in ops_lines or (
          module and module not in module_names):
        continue
      name = args.get('hlo_op') or event.get('name', '')
      found.append((name.lstrip('%'), float(event['dur'])))
    elif module in module_names and not event.get('name', '').startswith('end: '):
      found.append((event.get('name', ''), float(event['dur'])))
  return found


def summarise(events, instructions, computations, steps: int) -> tuple[dict, list]:
  """Per kind: [microseconds per step, operations per step]; and the 25 costliest instructions
  as (microseconds per step, name, kind)."""
  per_kind = {kind: [0.0, 0.0] for kind in (*KINDS, 'unmatched')}
  per_name = collections.Counter()
  kinds = {}
  for name, micros in events:
    if name not in kinds:
      candidates = (name, re.sub(r'_(\d+)$', r'.\1', name))
      match = next((c for c in candidates if c in instructions), None)
      kinds[name] = (kind_of(match, instructions, computations) if match
                     else _kernel_kind(name) or 'unmatched')
    per_kind[kinds[name]][0] += micros / steps
    per_kind[kinds[name]][1] += 1 / steps
    per_name[name] += micros / steps
  top = [(micros, name, kinds[name]) for name, micros in per_name.most_common(25)]
  return per_kind, top


def bytes_by_kind(names, moved: dict, instructions, computations) -> dict:
  """{kind: bytes per step} of the named operations (those the trace saw, each charged once per
  step: the step runs no loops), from traffic()'s estimate `moved`."""
  found = dict.fromkeys(KINDS, 0)
  for name in set(names):
    match = next((c for c in (name, re.sub(r'_(\d+)$', r'.\1', name)) if c in moved), None)
    if match:
      found[kind_of(match, instructions, computations)] += moved[match]
  return found


# Datasheet memory bandwidth in TB/s, by a part of jax's device_kind (the first match counts).
PEAK_TBPS = (('H200', 4.8), ('H100 PCIe', 2.0), ('H100', 3.35), ('A100-SXM4-80GB', 2.039),
             ('A100 80GB PCIe', 1.935), ('A100', 1.555), ('TPU v4', 1.228),
             ('TPU v5 lite', 0.819), ('TPU v5p', 2.765), ('TPU v6', 1.64))


def peak_tbps(device_kind: str) -> float | None:
  return next((tbps for part, tbps in PEAK_TBPS if part.lower() in device_kind.lower()), None)


def profile(args) -> dict:
  import jax

  import train_throughput
  height, width = (int(v) for v in args.size.split('x'))
  mesh, state, images, labels, step_fn, _ = train_throughput._jax_setup(
      args, height, width, args.batch, args.dtype)
  compiled = step_fn.lower(state, images, labels).compile()
  hlo = compiled.as_text()
  if args.hlo:
    with (gzip.open if args.hlo.endswith('.gz') else open)(args.hlo, 'wt') as f:
      f.write(hlo)
  instructions, computations = parse_hlo(hlo)
  module_names = set(re.findall(r'^HloModule\s+([\w.\-]+)', hlo, re.M))
  box = {'state': state}

  def train():
    box['state'], box['metrics'] = compiled(box['state'], images, labels)

  def sync():
    jax.block_until_ready(box['state'])

  _, step_s = train_throughput.timed_loop(train, sync, args.warmup, args.steps)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix='step-profile-')
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    train()
  sync()
  jax.profiler.stop_trace()
  events = device_events(trace_dir, module_names)
  per_kind, top = summarise(events, instructions, computations, args.steps)
  # Every device runs the whole program, and the times are summed over devices: so are bytes.
  moved = {kind: size * mesh.devices.size for kind, size in bytes_by_kind(
      [name for name, _ in events], traffic(hlo), instructions, computations).items()}
  what = describe(hlo, {name for name, _ in events})
  top = [(micros, name, kind, ' '.join(what.get(name, ())).strip())
         for micros, name, kind in top]
  return {'device': f'{mesh.devices.size} x {jax.devices()[0].device_kind}',
          'peak_tbps': peak_tbps(jax.devices()[0].device_kind), 'devices': mesh.devices.size,
          'step_ms': 1e3 * step_s, 'per_kind': per_kind, 'bytes_per_kind': moved, 'top': top,
          'sources': by_source(events, what, args.steps), 'trace_dir': trace_dir,
          'events': len(events), 'modules': sorted(module_names)}


def by_source(events, what: dict, steps: int, count: int = 15) -> list:
  """The `count` source operations (the op_name of describe(), e.g. 'transpose(jvp())/select_n')
  with the most device time: (microseconds per step, operations per step, source)."""
  micros, ops = collections.Counter(), collections.Counter()
  for name, duration in events:
    source = what.get(name, ('', ''))[1] or '(no op_name)'
    micros[source] += duration / steps
    ops[source] += 1 / steps
  return [(t, ops[source], source) for source, t in micros.most_common(count)]


def table(result: dict, args) -> str:
  busy = sum(micros for micros, _ in result['per_kind'].values()) or 1.0
  lines = [f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {result['device']}, "
           f'{args.backbone} (width {args.width}), {args.size}, batch {args.batch}, {args.dtype}; '
           f"step {result['step_ms']:.2f} ms wall (mean of {args.steps}), device busy "
           f'{busy / 1e3:.2f} ms; trace in {result["trace_dir"]}',
           '', '| kind | ms per step | share of busy time | operations per step | GB per step '
           '(estimate) | GB/s |', '|---|---|---|---|---|---|']
  moved = result.get('bytes_per_kind', {})
  for kind, (micros, count) in result['per_kind'].items():
    if count:
      gigabytes = moved.get(kind, 0) / 1e9
      rate = f'{gigabytes / micros * 1e6:.0f}' if gigabytes and micros else '-'
      lines.append(f'| {kind} | {micros / 1e3:.3f} | {100 * micros / busy:.1f}% | {count:.0f} | '
                   f'{gigabytes:.2f} | {rate} |')
  devices = result.get('devices', 1)
  other = sum(b for kind, b in moved.items() if kind != 'convolution') / devices
  if other and result.get('peak_tbps'):
    lines += ['', f'Outside the convolutions the step moves about {other / 1e9:.1f} GB per '
              f"device: at the device's {result['peak_tbps']} TB/s that takes at least "
              f"{other / result['peak_tbps'] / 1e9:.2f} ms (measured: "
              f"{(busy - result['per_kind']['convolution'][0]) / devices / 1e3:.2f} ms)."]
  lines += ['', '| costliest operations | ms per step | kind | shape and source (HLO) |',
            '|---|---|---|---|']
  lines += [f'| {name} | {micros / 1e3:.3f} | {kind} | {what} |'
            for micros, name, kind, what in result['top']]
  lines += ['', '| source operation (op_name) | ms per step | operations per step |',
            '|---|---|---|']
  lines += [f'| {source} | {micros / 1e3:.3f} | {ops:.0f} |'
            for micros, ops, source in result['sources']]
  return '\n'.join(lines)


def program_table(text: str, device_kind: str = '') -> str:
  """Operations and bytes per kind of a saved compiled program (--hlo), without running it."""
  instructions, computations = parse_hlo(text)
  moved = one_step_traffic(text)
  count, total = collections.Counter(), collections.Counter()
  for name, size in moved.items():
    kind = kind_of(name, instructions, computations)
    count[kind] += 1
    total[kind] += size
  lines = ['| kind | operations | GB per step (estimate) |', '|---|---|---|']
  lines += [f'| {kind} | {count[kind]} | {total[kind] / 1e9:.2f} |'
            for kind in KINDS if count[kind]]
  other = sum(size for kind, size in total.items() if kind != 'convolution')
  peak = peak_tbps(device_kind)
  lines += ['', f'Outside the convolutions: {other / 1e9:.1f} GB per step'
            + (f", at least {other / peak / 1e9:.2f} ms at {device_kind}'s {peak} TB/s." if peak
               else '.')]
  return '\n'.join(lines)


def main():
  import train_throughput
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  train_throughput.add_model_flags(parser)
  parser.add_argument('--size', default='320x320', help='HxW')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--trace_dir', help='where jax.profiler writes (default: a new temporary '
                      'folder); open it in TensorBoard or Perfetto for the timeline')
  parser.add_argument('--json', help='also write the result to this file')
  parser.add_argument('--hlo', help='also write the compiled program (HLO text) to this file, '
                      'gzipped if it ends in .gz')
  parser.add_argument('--program', help='only read this saved program (--hlo of an earlier run) '
                      'and print its operations and bytes per kind; runs nothing')
  parser.add_argument('--device_kind', default='',
                      help="with --program: the device it was compiled for ('H200'), for the "
                      'time its bytes take at that memory bandwidth')
  parser.add_argument('--command_buffers', action='store_true',
                      help="keep XLA's GPU command buffers (their kernels are then one event "
                      'each in the trace, not attributed to operations)')
  args = parser.parse_args()
  if args.program:
    with (gzip.open if args.program.endswith('.gz') else open)(args.program, 'rt') as f:
      print(program_table(f.read(), args.device_kind))
    return
  if not args.command_buffers:
    os.environ['XLA_FLAGS'] = ' '.join(
        filter(None, [os.environ.get('XLA_FLAGS'), '--xla_gpu_enable_command_buffer=']))
  result = profile(args)
  print(table(result, args))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
