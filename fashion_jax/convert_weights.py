"""Converts a PyTorch backbone checkpoint into the backbone weights this project loads.

ResNet / IBN-Net, SE-ResNeXt (Cadene), EfficientNet (torchvision), OSNet-AIN (torchreid) naming;
ViTs from timm (.safetensors), DINOv2 (.pth), OpenAI / open_clip CLIP (the `visual.` tower) and
big_vision / vision_transformer (.npz) checkpoints (models/vit_checkpoints.py):

  python -m fashion_jax.convert_weights --arch resnet50_ibn_a --src r50_ibn_a.pth --out <dir>
"""

import argparse
import json
import math
import os
import pickle
import stat
import struct
import sys
import warnings
import zipfile
from collections.abc import Mapping

import numpy as np
from flax import nnx

from fashion_jax import console
from fashion_jax.models import build_backbone, get_backbone, vit_checkpoints
from fashion_jax.models.pretrained import (ARCH_KEY, MAX_WEIGHTS_BYTES, WEIGHTS_FILE,
                                           mismatch_problems,
                                           non_finite_problem,
                                           save_backbone_weights, variables)


class ConversionError(ValueError):
  """The checkpoint does not match the architecture; the message names every offending tensor."""


def _is_dropped(key: str) -> bool:
  # The ImageNet head (torchvision/IBN-Net `fc`, Cadene's `last_linear`, torchreid's `fc` and
  # `classifier`, torchvision EfficientNet's `classifier`) is replaced by the ReID head;
  # BatchNorm's step counter is unused.
  return (key.startswith(('fc.', 'last_linear.', 'classifier.'))
          or key.endswith('num_batches_tracked'))


_MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on its JSON header
_ZIP_MAGIC, _PICKLE_MAGIC = b'PK\x03\x04', b'\x80'


def _open_checkpoint(path: str):
  """The checkpoint opened for reading, once it is known to be a regular file (a FIFO or a
  device would block or never end) within MAX_WEIGHTS_BYTES."""
  # O_NONBLOCK: opening a FIFO would otherwise wait for a writer; nothing changes for a file.
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  info = os.fstat(fd)
  if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_WEIGHTS_BYTES:
    os.close(fd)
    raise ConversionError(f'{path}: not a regular file' if not stat.S_ISREG(info.st_mode) else
                          f'{path}: {info.st_size:,} bytes is over the limit of '
                          f'{MAX_WEIGHTS_BYTES:,} bytes')
  return os.fdopen(fd, 'rb')


def _one_line(e: Exception) -> str:
  return ' '.join(str(e).split()) or type(e).__name__


def read_torch(path: str) -> dict[str, np.ndarray]:
  """A .pth state_dict (optionally wrapped in {'state_dict': ...}, DataParallel 'module.' keys)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch: pip install "fashion_jax[torch]" '
                      '(or convert the file to .safetensors)') from e
  with _open_checkpoint(path) as f:
    magic = f.read(4)
    if magic.startswith(_ZIP_MAGIC):
      try:
        names = zipfile.ZipFile(f).namelist()
      except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ConversionError(f'{path}: damaged zip archive ({_one_line(e)})') from None
      if not any(name.endswith('/data.pkl') for name in names):
        raise ConversionError(f'{path}: a zip archive without data.pkl, not a PyTorch '
                              'checkpoint (convert_weights reads .pth and .safetensors)')
    elif not magic.startswith(_PICKLE_MAGIC):
      raise ConversionError(f'{path}: not a PyTorch checkpoint (neither a zip archive nor a '
                            'pickle)')
    f.seek(0)
    # weights_only: tensors and plain containers only, so a checkpoint cannot run code on load.
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # e.g. on the pickle protocol: the error says enough
        obj = torch.load(f, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
      # torch's message is paragraphs of advice; its line naming the refused object is the news.
      found = [line.strip() for line in str(e).splitlines() if line.strip().startswith(
          'Unsupported')]
      raise ConversionError(f'{path} holds more than tensors and is not loaded' +
                            (f' ({found[0][:200]})' if found else '')) from None
    except Exception as e:  # pylint: disable=broad-except
      # torch.load parses untrusted bytes and fails in many ways on damaged ones (RuntimeError
      # from its zip reader, EOFError, KeyError from the unpickler): all mean the same here.
      raise ConversionError(f'{path}: damaged PyTorch checkpoint ({_one_line(e)[:300]})') \
          from None
  if isinstance(obj, Mapping) and 'state_dict' in obj:
    obj = obj['state_dict']
  if not isinstance(obj, Mapping):
    raise ConversionError(f'{path} holds a {type(obj).__name__}, not a state_dict')
  tensors = {}
  for key, value in obj.items():
    if not isinstance(key, str) or not torch.is_tensor(value):
      raise ConversionError(f'{path}: entry {str(key)[:100]!r} is a {type(value).__name__}, not '
                            'a named tensor')
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16; parameters are float32 anyway
    tensors[key.removeprefix('module.')] = value.detach().cpu().numpy()
  return tensors


_SAFETENSORS_DTYPES = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'I64': '<i8', 'I32': '<i4',
                       'BF16': '<u2'}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file, read directly (8-byte header length, JSON header, raw little-endian).
  Every length and offset is checked against the file before it is used."""
  with _open_checkpoint(path) as f:
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ConversionError(f'{path}: {size} bytes, too short for a safetensors file')
    (header_len,) = struct.unpack('<Q', prefix)
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
      raise ConversionError(f'{path}: header length {header_len:,} does not fit the file '
                            f'({size:,} bytes): truncated or not a safetensors file')
    try:
      header = json.loads(f.read(header_len).decode('utf-8'))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
      raise ConversionError(f'{path}: header is not JSON ({_one_line(e)[:200]})') from None
    data = f.read()
  if not isinstance(header, dict):
    raise ConversionError(f'{path}: header is a JSON {type(header).__name__}, not an object')
  header.pop('__metadata__', None)
  tensors = {}
  for key, info in header.items():
    start, end = _tensor_span(path, key, info, len(data))
    array = np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[info['dtype']])
    if info['dtype'] == 'BF16':  # bfloat16 is the top half of a float32
      array = (array.astype(np.uint32) << 16).view(np.float32)
    tensors[key.removeprefix('module.')] = array.reshape(info['shape'])
  return tensors


def _tensor_span(path: str, key: str, info, data_bytes: int) -> tuple[int, int]:
  """A header entry's data offsets, once its dtype, shape and offsets are known to agree with
  each other and to lie within the file's `data_bytes` of data."""
  if not isinstance(info, dict):
    raise ConversionError(f'{path}: tensor {key[:100]!r} has no dtype, shape and offsets')
  dtype, shape, offsets = info.get('dtype'), info.get('shape'), info.get('data_offsets')

  def whole(values, length=None):
    return (isinstance(values, list) and (length is None or len(values) == length) and
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values))

  if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
    raise ConversionError(f'{path}: tensor {key[:100]!r} has unsupported dtype '
                          f'{str(dtype)[:20]!r}')
  if not whole(shape) or not whole(offsets, 2) or offsets[0] > offsets[1]:
    raise ConversionError(f'{path}: tensor {key[:100]!r} has a malformed shape or data offsets')
  start, end = offsets
  expected = math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
  if end - start != expected or end > data_bytes:
    raise ConversionError(f'{path}: tensor {key[:100]!r} has {end - start:,} bytes at '
                          f'{start:,}-{end:,} for shape {shape} {dtype} ({expected:,} bytes) in '
                          f'{data_bytes:,} bytes of data: truncated or damaged file')
  return start, end


def read_npz(path: str) -> dict[str, np.ndarray]:
  """A NumPy .npz archive of named float arrays (big_vision, vision_transformer); never
  unpickles."""
  with _open_checkpoint(path) as f:
    try:
      with np.load(f, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    # Like the .npz reader of models/pretrained.py: damage surfaces as many exception types.
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'{path}: damaged or not an .npz archive ({_one_line(e)[:300]})') \
          from None
  if ARCH_KEY in arrays:
    raise ConversionError(f'{path} is already converted ({arrays[ARCH_KEY]} weights): give it to '
                          'training as --config.model.pretrained, not to convert_weights')
  for key, value in arrays.items():
    if value.dtype.kind != 'f':
      raise ConversionError(f'{path}: {key[:100]!r} holds {value.dtype}, not floating point '
                            'numbers')
  return {k: v.astype(np.float32) for k, v in arrays.items()}


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  if os.path.isdir(path):
    raise ConversionError(f'{path} is a folder: give the checkpoint file in it (.pth, '
                          '.safetensors or .npz)')
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  return read_npz(path) if path.endswith('.npz') else read_torch(path)


def _torch_layout(shape: tuple) -> tuple:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if len(shape) == 2 else shape


def convert_state_dict(arch: str, tensors: Mapping[str, np.ndarray], *,
                       source: str = 'checkpoint') -> tuple[dict[str, np.ndarray], list[str]]:
  """PyTorch state_dict arrays -> (dotted Flax path -> array, dropped torch keys).

  Raises ConversionError naming every unknown, missing and mis-shaped tensor.
  """
  entry = get_backbone(arch)
  dropped = []
  if entry.family == 'vit':
    tensors, dropped = vit_checkpoints.to_timm(tensors, entry.arch['spec'])
  abstract = nnx.eval_shape(lambda: build_backbone(arch, rngs=nnx.Rngs(0)))
  expected = {entry.torch_name(k): (k, tuple(v.shape)) for k, v in variables(abstract).items()}
  dropped = sorted(dropped + [k for k in tensors if _is_dropped(k)])
  unknown = sorted(k for k in tensors if k not in expected and not _is_dropped(k))
  missing = sorted(k for k in expected if k not in tensors)
  converted, misshaped = {}, []
  for key, (flax_key, shape) in expected.items():
    if key not in tensors:
      continue
    value = np.asarray(tensors[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T  # Linear [out, in] -> kernel [in, out]
    if value.shape != shape:
      misshaped.append(f'{key} {tuple(tensors[key].shape)} (expected {_torch_layout(shape)})')
    converted[flax_key] = value
  problems = mismatch_problems(unknown, missing, misshaped)
  if problems:
    raise ConversionError(f'{source} does not match {arch}: ' + '; '.join(problems))
  non_finite = non_finite_problem(converted)
  if non_finite:
    raise ConversionError(f'{source}: {non_finite}')
  return converted, dropped


def convert(arch: str, src: str, out: str) -> str:
  """Converts `src` for backbone `arch` into `out`/backbone.npz; returns that path."""
  if os.path.exists(os.path.join(out, WEIGHTS_FILE)):
    raise ConversionError(f'{out} already holds {WEIGHTS_FILE}: give a new --out folder, or '
                          'delete that file first')
  converted, dropped = convert_state_dict(arch, read_checkpoint(src), source=src)
  os.makedirs(out, exist_ok=True)
  path = save_backbone_weights(out, arch, converted)
  head = [k for k in dropped if not k.endswith('num_batches_tracked')]
  # A CLIP checkpoint's text tower is hundreds of tensors: its first few name it.
  named = ', '.join(head[:8]) + (f' and {len(head) - 8} more' if len(head) > 8 else '')
  print(f'wrote {len(converted)} tensors of {arch} to {path}; dropped the heads and other '
        f'towers ({named or "none"}) and {len(dropped) - len(head)} BatchNorm step counters')
  return path


def main(argv: list[str] | None = None) -> int:
  from fashion_jax.models.backbones import backbone_names
  parser = argparse.ArgumentParser(prog='python -m fashion_jax.convert_weights',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--arch', required=True, metavar='ARCH',
                      help=f'backbone name: {", ".join(backbone_names())}')
  parser.add_argument('--src', required=True,
                      help='checkpoint: .pth (needs the torch extra: pip install -e ".[torch]"), '
                           '.safetensors or (big_vision ViTs) .npz')
  parser.add_argument('--out', required=True, help='output directory (gets backbone.npz)')
  args = parser.parse_args(argv)
  try:
    convert(args.arch, args.src, args.out)
  except (ValueError, ImportError, OSError) as e:
    # The operating system's own errors name their file in the project's words.
    raw = isinstance(e, OSError) and e.filename is not None and e.strerror
    print(f'error: {console.path_error(e) if raw else _one_line(e)}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
