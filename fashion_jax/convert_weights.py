"""Converts a PyTorch backbone checkpoint into the backbone weights this project loads.

ResNet / IBN-Net, SE-ResNeXt (Cadene), EfficientNet (torchvision), OSNet-AIN (torchreid) naming:

  python -m fashion_jax.convert_weights --arch resnet50_ibn_a --src r50_ibn_a.pth --out <dir>
"""

import argparse
import json
import os
import pickle
import struct
import sys
from collections.abc import Mapping

import numpy as np
from flax import nnx

from fashion_jax.models import build_backbone, get_backbone
from fashion_jax.models.pretrained import mismatch_problems, save_backbone_weights, variables


class ConversionError(ValueError):
  """The checkpoint does not match the architecture; the message names every offending tensor."""


def _is_dropped(key: str) -> bool:
  # The ImageNet head (torchvision/IBN-Net `fc`, Cadene's `last_linear`, torchreid's `fc` and
  # `classifier`, torchvision EfficientNet's `classifier`) is replaced by the ReID head;
  # BatchNorm's step counter is unused.
  return (key.startswith(('fc.', 'last_linear.', 'classifier.'))
          or key.endswith('num_batches_tracked'))


def read_torch(path: str) -> dict[str, np.ndarray]:
  """A .pth state_dict (optionally wrapped in {'state_dict': ...}, DataParallel 'module.' keys)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch: pip install "fashion_jax[torch]" '
                      '(or convert the file to .safetensors)') from e
  # weights_only: tensors and plain containers only, so a checkpoint cannot run code on load.
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(f'{path} holds more than tensors and is not loaded: {reason}') from e
  if isinstance(obj, Mapping) and 'state_dict' in obj:
    obj = obj['state_dict']
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path} holds a {type(obj).__name__}, not a state_dict')
  tensors = {}
  for key, value in obj.items():
    if not torch.is_tensor(value):
      raise ConversionError(f'{path}: entry {key} is a {type(value).__name__}, not a tensor')
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16; parameters are float32 anyway
    tensors[key.removeprefix('module.')] = value.detach().cpu().numpy()
  return tensors


_SAFETENSORS_DTYPES = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'I64': '<i8', 'I32': '<i4',
                       'BF16': '<u2'}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file, read directly (8-byte header length, JSON header, raw little-endian)."""
  with open(path, 'rb') as f:
    (header_len,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(header_len))
    data = f.read()
  header.pop('__metadata__', None)
  tensors = {}
  for key, info in header.items():
    dtype = _SAFETENSORS_DTYPES.get(info['dtype'])
    if dtype is None:
      raise ConversionError(f'{path}: tensor {key} has unsupported dtype {info["dtype"]}')
    start, end = info['data_offsets']
    count = int(np.prod(info['shape'], dtype=np.int64))
    if end - start != count * np.dtype(dtype).itemsize or end > len(data):
      raise ConversionError(f'{path}: tensor {key} has {end - start} bytes for shape '
                            f'{info["shape"]} {info["dtype"]}')
    array = np.frombuffer(data[start:end], dtype)
    if info['dtype'] == 'BF16':  # bfloat16 is the top half of a float32
      array = (array.astype(np.uint32) << 16).view(np.float32)
    tensors[key.removeprefix('module.')] = array.reshape(info['shape'])
  return tensors


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  return read_safetensors(path) if path.endswith('.safetensors') else read_torch(path)


def _torch_layout(shape: tuple) -> tuple:
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def convert_state_dict(arch: str, tensors: Mapping[str, np.ndarray], *,
                       source: str = 'checkpoint') -> tuple[dict[str, np.ndarray], list[str]]:
  """PyTorch state_dict arrays -> (dotted Flax path -> array, dropped torch keys).

  Raises ConversionError naming every unknown, missing and mis-shaped tensor.
  """
  torch_name = get_backbone(arch).torch_name
  abstract = nnx.eval_shape(lambda: build_backbone(arch, rngs=nnx.Rngs(0)))
  expected = {torch_name(k): (k, tuple(v.shape)) for k, v in variables(abstract).items()}
  dropped = sorted(k for k in tensors if _is_dropped(k))
  unknown = sorted(k for k in tensors if k not in expected and not _is_dropped(k))
  missing = sorted(k for k in expected if k not in tensors)
  converted, misshaped = {}, []
  for key, (flax_key, shape) in expected.items():
    if key not in tensors:
      continue
    value = np.asarray(tensors[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
    if value.shape != shape:
      misshaped.append(f'{key} {tuple(tensors[key].shape)} (expected {_torch_layout(shape)})')
    converted[flax_key] = value
  problems = mismatch_problems(unknown, missing, misshaped)
  if problems:
    raise ConversionError(f'{source} does not match {arch}: ' + '; '.join(problems))
  return converted, dropped


def convert(arch: str, src: str, out: str) -> str:
  """Converts `src` for backbone `arch` into `out`/backbone.npz; returns that path."""
  converted, dropped = convert_state_dict(arch, read_checkpoint(src), source=src)
  os.makedirs(out, exist_ok=True)
  path = save_backbone_weights(out, arch, converted)
  head = [k for k in dropped if not k.endswith('num_batches_tracked')]
  print(f'wrote {len(converted)} tensors of {arch} to {path}; dropped the ImageNet head '
        f'({", ".join(head) or "none"}) and {len(dropped) - len(head)} BatchNorm step counters')
  return path


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', required=True, help='backbone name, e.g. resnet50_ibn_a')
  parser.add_argument('--src', required=True, help='PyTorch checkpoint: .pth or .safetensors')
  parser.add_argument('--out', required=True, help='output directory (gets backbone.npz)')
  args = parser.parse_args(argv)
  try:
    convert(args.arch, args.src, args.out)
  except (ValueError, ImportError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
