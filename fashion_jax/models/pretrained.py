"""Converted backbone weights (e.g. ImageNet, from PyTorch): the file format and its loading.

`fashion_jax.convert_weights` writes these files; training and notebooks load them into a model.
"""

import os
from collections.abc import Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

# The file is an uncompressed .npz: one float32 array per backbone variable, keyed by its dotted
# path in the Flax backbone ('layer1.0.bn1.IN.scale'; conv kernels HWIO), plus the architecture
# name under ARCH_KEY. Plain numpy keeps it readable anywhere, without Orbax or a model template.
WEIGHTS_FILE = 'backbone.npz'
ARCH_KEY = '__arch__'
# Far above any backbone's weights (a ResNet-152's are 240 MB): a bound on what is read, for
# these files and the PyTorch checkpoints they are converted from.
MAX_WEIGHTS_BYTES = 4 << 30


class LoadReport(NamedTuple):
  arch: str
  loaded: list[str]      # model variable paths set from the file, e.g. 'backbone.conv1.kernel'
  not_loaded: list[str]  # model variable paths left at their fresh initialisation


def variables(module: nnx.Module) -> dict[str, nnx.Variable]:
  """Dotted path -> every nnx.Param and nnx.BatchStat of `module`."""
  return {'.'.join(map(str, path)): node for path, node in nnx.iter_graph(module)
          if isinstance(node, (nnx.Param, nnx.BatchStat))}


SHOWN_TENSORS = 8  # names per kind of mismatch in an error; the rest are counted


def mismatch_problems(unknown: list[str], missing: list[str], misshaped: list[str]) -> list[str]:
  """One clause per non-empty kind of mismatch, each naming its first SHOWN_TENSORS tensors and
  counting the others (a wrong architecture misses hundreds: the line stays readable)."""
  def named(names):
    more = len(names) - SHOWN_TENSORS
    return ', '.join(names[:SHOWN_TENSORS]) + (f' and {more} more' if more > 0 else '')
  return [f'{label} tensors: {named(names)}' for label, names in
          (('unknown', unknown), ('missing', missing), ('mis-shaped', misshaped)) if names]


def non_finite_problem(tensors: Mapping[str, np.ndarray]) -> str | None:
  """A clause naming the tensors holding NaN or inf (a damaged or diverged checkpoint), or
  None when all values are finite."""
  bad = [f'{key} ({int(np.size(value) - np.isfinite(value).sum())} values)'
         for key, value in sorted(tensors.items())
         if np.issubdtype(np.asarray(value).dtype, np.floating)
         and not np.isfinite(value).all()]
  if not bad:
    return None
  more = len(bad) - SHOWN_TENSORS
  return ('NaN or inf in tensors: ' + ', '.join(bad[:SHOWN_TENSORS])
          + (f' and {more} more' if more > 0 else '') + ' (a damaged or diverged checkpoint)')


def weights_path(path: str) -> str:
  """A directory written by convert_weights, or the .npz file itself."""
  return os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path


def save_backbone_weights(path: str, arch: str, tensors: Mapping[str, np.ndarray]) -> str:
  """Writes `tensors` (dotted Flax path -> array) for backbone `arch`; returns the file written."""
  path = weights_path(path)
  if ARCH_KEY in tensors:
    raise ValueError(f'{ARCH_KEY} is reserved for the architecture name')
  with open(path, 'wb') as f:
    np.savez(f, **{ARCH_KEY: np.asarray(arch)},
             **{k: np.asarray(v, np.float32) for k, v in tensors.items()})
  return path


def check_weights_file(path: str) -> str:
  """The weights file `path` names (weights_path), if it can be read as one, without reading
  it: FileNotFoundError or ValueError, one line, otherwise."""
  path = weights_path(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no converted weights at {path} (see docs/models.md to create them)')
  if not os.path.isfile(path):  # a FIFO or device would block or never end
    raise ValueError(f'{path} is not a regular file')
  if os.path.getsize(path) > MAX_WEIGHTS_BYTES:
    raise ValueError(f'{path}: {os.path.getsize(path):,} bytes is over the limit of '
                     f'{MAX_WEIGHTS_BYTES:,} bytes for backbone weights')
  return path


def read_backbone_weights(path: str) -> tuple[str, dict[str, np.ndarray]]:
  """-> (architecture name, dotted Flax path -> array). Never unpickles."""
  path = check_weights_file(path)
  try:
    data = np.load(path, allow_pickle=False)
    if isinstance(data, np.lib.npyio.NpzFile):
      with data:
        arrays = {k: data[k] for k in data.files}
  # The zip and .npy readers fail on damage in their own ways (BadZipFile, NotImplementedError,
  # tokenize.TokenError from a .npy header, ...); MemoryError is an array header declaring more
  # than memory holds, which a file within a backbone's size never needs.
  except Exception as e:  # pylint: disable=broad-except
    message = ' '.join(str(e).split())[:300] or type(e).__name__
    raise ValueError(f'{path}: damaged or not a converted backbone file ({message})') from None
  if not isinstance(data, np.lib.npyio.NpzFile) or ARCH_KEY not in arrays:
    raise ValueError(f'{path} is not a converted backbone file (no {ARCH_KEY} entry)')
  arch = arrays.pop(ARCH_KEY)
  if arch.shape or arch.dtype.kind != 'U':
    raise ValueError(f'{path}: {ARCH_KEY} is not an architecture name')
  for key, value in arrays.items():
    if value.dtype.kind != 'f':
      raise ValueError(f'{path}: {key[:100]!r} holds {value.dtype}, not floating point numbers')
  return str(arch), arrays


def load_pretrained(model: nnx.Module, path: str, *, arch: str | None = None) -> LoadReport:
  """Sets every backbone variable of `model` (a ReIDModel) from a converted weights file.

  The head (BNNeck, classifier) keeps its fresh initialisation. Fails, naming the tensors, if the
  file's architecture differs from `arch` or any backbone variable would stay uninitialised.
  """
  file_arch, tensors = read_backbone_weights(path)
  if arch is not None and arch != file_arch:
    raise ValueError(f'{weights_path(path)} holds {file_arch} weights, but the model is {arch}')
  targets = variables(model.backbone)
  misshaped = [f'{k} {tuple(tensors[k].shape)} (model {tuple(targets[k].shape)})'
               for k in sorted(set(tensors) & set(targets))
               if tuple(tensors[k].shape) != tuple(targets[k].shape)]
  problems = mismatch_problems(sorted(set(tensors) - set(targets)),
                               sorted(set(targets) - set(tensors)), misshaped)
  problems += [problem for problem in [non_finite_problem(tensors)] if problem]
  if problems:
    raise ValueError(f'cannot load {weights_path(path)} ({file_arch}) into the model: '
                     + '; '.join(problems))
  for key, var in targets.items():
    var.set_value(jnp.asarray(tensors[key], var.dtype))
  loaded = sorted(f'backbone.{k}' for k in targets)
  not_loaded = sorted(k for k in variables(model) if not k.startswith('backbone.'))
  return LoadReport(file_arch, loaded, not_loaded)


def load_pretrained_from_config(model: nnx.Module, model_config) -> LoadReport | None:
  """Loads `model_config.pretrained` (None or absent: nothing to load) and logs what was loaded."""
  path = model_config.get('pretrained')
  if not path:
    return None
  report = load_pretrained(model, path, arch=model_config.backbone)
  logging.info('pretrained %s backbone from %s: loaded all %d backbone tensors; freshly '
               'initialised: %s', report.arch, weights_path(path), len(report.loaded),
               ', '.join(report.not_loaded))
  return report
