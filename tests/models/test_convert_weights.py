"""Weight conversion without PyTorch: name mapping, safetensors reading, and the errors.

Each error test breaks a valid checkpoint in one way and checks the message names the tensor.
"""

import io
import json
import os
import pickle
import re
import struct
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from fashion_jax import convert_weights
from fashion_jax.models import build_backbone, build_model
from fashion_jax.models.pretrained import (load_pretrained, read_backbone_weights,
                                           save_backbone_weights, variables)
from fashion_jax.models.resnet import torch_name

ARCH = 'resnet18_ibn_a'


def _torch_state_dict(arch):
  """A complete, valid torchvision/IBN-Net-named state_dict of random values for `arch`."""
  rng = np.random.default_rng(0)
  abstract = nnx.eval_shape(lambda: build_backbone(arch, rngs=nnx.Rngs(0)))
  tensors = {}
  for key, var in variables(abstract).items():
    shape = var.shape
    if len(shape) == 4:  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    tensors[torch_name(key)] = rng.normal(size=shape).astype(np.float32)
  tensors['fc.weight'] = np.zeros((1000, 512), np.float32)
  tensors['fc.bias'] = np.zeros((1000,), np.float32)
  tensors['bn1.num_batches_tracked'] = np.asarray(7, np.int64)
  return tensors


def _write_safetensors(path, tensors, dtypes):
  """Writes the format as specified: u64 header size, JSON header, concatenated raw data."""
  header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for key, value in tensors.items():
    dtype = dtypes.get(key, 'F32')
    if dtype == 'BF16':
      raw = (value.astype(np.float32).view(np.uint32) >> 16).astype('<u2').tobytes()
    else:
      raw = value.astype({'F32': '<f4', 'F16': '<f2', 'I64': '<i8'}[dtype]).tobytes()
    header[key] = {'dtype': dtype, 'shape': list(value.shape),
                   'data_offsets': [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text + b''.join(blobs))


def test_torch_names_follow_ibn_net():
  assert torch_name('layer1.0.downsample.conv.kernel') == 'layer1.0.downsample.0.weight'
  assert torch_name('layer1.0.downsample.bn.var') == 'layer1.0.downsample.1.running_var'
  assert torch_name('layer2.1.bn1.IN.scale') == 'layer2.1.bn1.IN.weight'
  assert torch_name('layer1.2.IN.bias') == 'layer1.2.IN.bias'
  assert torch_name('bn1.mean') == 'bn1.running_mean'


def test_safetensors_conversion_round_trip(tmp_path):
  tensors = _torch_state_dict(ARCH)
  # Values exactly representable in half and bfloat16 precision, so the round trip is exact.
  tensors['layer1.0.conv2.weight'] = np.round(tensors['layer1.0.conv2.weight'] * 8) / 8
  tensors['layer1.0.bn2.weight'] = np.round(tensors['layer1.0.bn2.weight'] * 8) / 8
  src = tmp_path / 'r18.safetensors'
  _write_safetensors(src, tensors, {'layer1.0.conv2.weight': 'F16', 'layer1.0.bn2.weight': 'BF16',
                                    'bn1.num_batches_tracked': 'I64'})
  out = tmp_path / 'out'
  assert convert_weights.main(['--arch', ARCH, '--src', str(src), '--out', str(out)]) == 0
  arch, converted = read_backbone_weights(str(out))
  assert arch == ARCH
  np.testing.assert_array_equal(converted['layer1.0.conv2.kernel'],
                                tensors['layer1.0.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(converted['layer1.0.bn2.scale'], tensors['layer1.0.bn2.weight'])
  np.testing.assert_array_equal(converted['layer3.1.bn1.IN.bias'], tensors['layer3.1.bn1.IN.bias'])
  np.testing.assert_array_equal(converted['bn1.var'], tensors['bn1.running_var'])
  assert 'fc.weight' not in converted and len(converted) == len(tensors) - 3


def test_conversion_names_every_bad_tensor():
  tensors = _torch_state_dict(ARCH)
  tensors['layer5.0.conv1.weight'] = np.zeros((3, 3, 1, 1), np.float32)
  del tensors['layer2.1.bn1.IN.weight']
  del tensors['layer4.0.downsample.1.running_mean']
  tensors['layer3.0.conv2.weight'] = np.zeros((256, 128, 3, 3), np.float32)
  with pytest.raises(convert_weights.ConversionError) as e:
    convert_weights.convert_state_dict(ARCH, tensors)
  message = str(e.value)
  assert '\n' not in message
  assert 'unknown tensors: layer5.0.conv1.weight' in message
  assert 'missing tensors: layer2.1.bn1.IN.weight, layer4.0.downsample.1.running_mean' in message
  assert 'mis-shaped tensors: layer3.0.conv2.weight (256, 128, 3, 3) (expected (256, 256, 3, 3))' \
      in message


def test_weights_holding_nan_or_inf_are_refused_naming_the_tensors(tmp_path):
  # A diverged or damaged checkpoint: converted, it gave all-NaN embeddings whose evaluation
  # still printed a plausible mAP, then a non-finite loss that did not blame the weights.
  tensors = _torch_state_dict(ARCH)
  tensors['conv1.weight'][0, 0, 0, :2] = np.nan
  tensors['layer2.0.bn1.BN.running_var'][3] = np.inf
  with pytest.raises(convert_weights.ConversionError) as e:
    convert_weights.convert_state_dict(ARCH, tensors, source='r18.pth')
  assert str(e.value) == ('r18.pth: NaN or inf in tensors: conv1.kernel (2 values), '
                          'layer2.0.bn1.BN.var (1 values) (a damaged or diverged checkpoint)')
  # A weights file written by hand, or before this check, is refused when loaded.
  converted, _ = convert_weights.convert_state_dict(ARCH, _torch_state_dict(ARCH))
  converted['conv1.kernel'][0, 0, 0, 0] = np.nan
  path = save_backbone_weights(str(tmp_path), ARCH, converted)
  config = ml_collections.ConfigDict({'backbone': ARCH, 'last_stride': 1, 'width': 64,
                                      'dtype': 'float32'})
  with pytest.raises(ValueError, match=r'NaN or inf in tensors: conv1.kernel \(1 values\)'):
    load_pretrained(build_model(config, num_classes=3), path, arch=ARCH)


def test_wrong_architecture_fails_naming_tensors():
  # Plain ResNet-18 weights lack IBN-a's split bn1: the conversion must not half-load them.
  with pytest.raises(convert_weights.ConversionError,
                     match=r'missing tensors: layer1\.0\.bn1\.BN') as raised:
    convert_weights.convert_state_dict(ARCH, _torch_state_dict('resnet18'))
  # Every one of the many names would make an unreadable line: eight, then a count.
  missing = str(raised.value).split('missing tensors: ')[1].split(';')[0]
  assert missing.count(', ') == 7 and re.search(r' and \d+ more$', missing), missing


def test_cli_reports_one_line_error(tmp_path, capsys):
  tensors = _torch_state_dict(ARCH)
  del tensors['conv1.weight']
  _write_safetensors(tmp_path / 'bad.safetensors', tensors, {'bn1.num_batches_tracked': 'I64'})
  assert convert_weights.main(['--arch', ARCH, '--src', str(tmp_path / 'bad.safetensors'),
                               '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'missing tensors: conv1.weight' in err
  assert not (tmp_path / 'out').exists()
  assert convert_weights.main(['--arch', 'resnet51', '--src', str(tmp_path / 'bad.safetensors'),
                               '--out', str(tmp_path / 'out')]) == 2
  assert "unknown backbone 'resnet51'" in capsys.readouterr().err
  # The operating system's errors in the same words as elsewhere, not "[Errno 2] ...".
  assert convert_weights.main(['--arch', ARCH, '--src', str(tmp_path / 'none.pth'),
                               '--out', str(tmp_path / 'out')]) == 2
  assert capsys.readouterr().err == (f'error: cannot use {tmp_path / "none.pth"}: No such file '
                                     'or directory\n')


def test_pth_without_torch_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` raise ImportError
  with pytest.raises(ImportError, match=r'needs PyTorch: pip install "fashion_jax\[torch\]"'):
    convert_weights.read_torch(str(tmp_path / 'r50.pth'))


def test_loading_checks_architecture_and_shapes(tmp_path):
  config = ml_collections.ConfigDict(dict(backbone=ARCH, last_stride=1, width=64,
                                          dtype='float32'))
  model = nnx.eval_shape(lambda: build_model(config, num_classes=3))
  converted, _ = convert_weights.convert_state_dict(ARCH, _torch_state_dict(ARCH))
  save_backbone_weights(str(tmp_path), ARCH, converted)
  with pytest.raises(ValueError, match=f'holds {ARCH} weights, but the model is resnet18'):
    load_pretrained(model, str(tmp_path), arch='resnet18')
  broken = dict(converted)
  broken['layer1.0.conv1.kernel'] = np.zeros((3, 3, 64, 32), np.float32)
  del broken['layer4.1.bn2.mean']
  save_backbone_weights(str(tmp_path / 'broken.npz'), ARCH, broken)
  with pytest.raises(ValueError, match=r'missing tensors: layer4\.1\.bn2\.mean; mis-shaped '
                     r'tensors: layer1\.0\.conv1\.kernel \(3, 3, 64, 32\) '
                     r'\(model \(3, 3, 64, 64\)\)'):
    load_pretrained(model, str(tmp_path / 'broken.npz'))
  report = load_pretrained(model, str(tmp_path), arch=ARCH)
  np.testing.assert_array_equal(model.backbone.layer2[1].bn1.IN.scale[...],
                                converted['layer2.1.bn1.IN.scale'])
  assert report.not_loaded == ['bottleneck.mean', 'bottleneck.scale', 'bottleneck.var',
                               'classifier.kernel']
  with pytest.raises(FileNotFoundError, match='no converted weights'):
    load_pretrained(model, str(tmp_path / 'nope.npz'))


def _safetensors_bytes(tensors):
  header = {key: {'dtype': 'F32', 'shape': list(value.shape), 'data_offsets': [0, value.nbytes]}
            for key, value in tensors.items()}
  text = json.dumps(header).encode()
  return struct.pack('<Q', len(text)) + text + b''.join(v.tobytes() for v in tensors.values())


def _damaged_checkpoints():
  """name -> (file name, bytes, words its one-line error must contain)."""
  good = _safetensors_bytes({'conv1.weight': np.ones((2, 2), np.float32)})
  header_len = struct.unpack('<Q', good[:8])[0]

  def with_header(header):
    text = json.dumps(header).encode()
    return struct.pack('<Q', len(text)) + text + bytes(16)

  entry = {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 16]}
  npz = io.BytesIO()
  np.savez(npz, __arch__=np.asarray(ARCH), w=np.asarray([{'run': 'code'}], dtype=object))
  return {
      'header_length_huge': ('a.safetensors', struct.pack('<Q', 1 << 60) + good[8:],
                             'does not fit the file'),
      'header_length_short': ('a.safetensors', good[:4], 'too short'),
      'header_not_json': ('a.safetensors', good[:8] + b'\xff' * header_len + good[8 + header_len:],
                          'header is not JSON'),
      'header_a_list': ('a.safetensors', with_header([1, 2]), 'not an object'),
      'offsets_out_of_range': ('a.safetensors',
                               with_header({'w': {**entry, 'data_offsets': [0, 1 << 40]}}),
                               'truncated or damaged'),
      'offsets_negative': ('a.safetensors',
                           with_header({'w': {**entry, 'data_offsets': [-16, 0]}}),
                           'malformed shape or data offsets'),
      'shape_not_numbers': ('a.safetensors', with_header({'w': {**entry, 'shape': 'x'}}),
                            'malformed shape or data offsets'),
      'entry_not_object': ('a.safetensors', with_header({'w': 5}), 'no dtype, shape'),
      'truncated': ('a.safetensors', good[:-5], 'truncated or damaged'),
      'npz_with_object_array': ('a.pth', npz.getvalue(), 'without data.pkl'),
      'not_zip_nor_pickle': ('a.pth', b'hello, not a checkpoint', 'neither a zip archive'),
      'truncated_zip': ('a.pth', npz.getvalue()[:100], 'damaged zip archive'),
  }


@pytest.mark.parametrize('case', sorted(_damaged_checkpoints()))
def test_damaged_checkpoint_is_one_line_exit_2(tmp_path, capsys, case):
  name, data, words = _damaged_checkpoints()[case]
  (tmp_path / name).write_bytes(data)
  assert convert_weights.main(['--arch', ARCH, '--src', str(tmp_path / name),
                               '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ') and words in err, err
  assert not (tmp_path / 'out').exists()


def test_a_pickled_object_is_never_unpickled(tmp_path, capsys):
  pytest.importorskip('torch')

  class Payload:
    def __reduce__(self):
      return (open, (str(tmp_path / 'ran'), 'w'))

  (tmp_path / 'evil.pth').write_bytes(pickle.dumps({'conv1.weight': Payload()}))
  assert convert_weights.main(['--arch', ARCH, '--src', str(tmp_path / 'evil.pth'),
                               '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'holds more than tensors and is not loaded' in err
  assert not (tmp_path / 'ran').exists()


def test_device_or_fifo_is_refused_by_type(tmp_path):
  os.mkfifo(tmp_path / 'fifo.safetensors')
  for path in ('/dev/zero', str(tmp_path / 'fifo.safetensors')):
    with pytest.raises(convert_weights.ConversionError, match='not a regular file'):
      convert_weights.read_safetensors(path)
    with pytest.raises(ValueError, match='not a regular file'):
      read_backbone_weights(path)
  (tmp_path / 'folder.safetensors').mkdir()  # a folder of weights is read_backbone_weights' own
  with pytest.raises(convert_weights.ConversionError, match='not a regular file'):
    convert_weights.read_safetensors(str(tmp_path / 'folder.safetensors'))


def test_damaged_backbone_weights_are_one_line_value_errors(tmp_path):
  converted, _ = convert_weights.convert_state_dict(ARCH, _torch_state_dict(ARCH))
  path = save_backbone_weights(str(tmp_path), ARCH, converted)
  with open(path, 'rb') as f:
    good = f.read()
  object_array = io.BytesIO()
  np.savez(object_array, __arch__=np.asarray(ARCH), w=np.asarray([{'a': 1}], dtype=object))
  strings = io.BytesIO()
  np.savez(strings, __arch__=np.asarray(ARCH), w=np.asarray(['a', 'b']))
  cases = {'truncated': (good[:len(good) // 2], 'damaged or not a converted backbone file'),
           'object_array': (object_array.getvalue(), 'Object arrays cannot be loaded'),
           'not_numbers': (strings.getvalue(), "'w' holds <U1, not floating point"),
           'not_a_zip': (b'\x80\x04 a pickle', 'damaged or not a converted backbone file')}
  for data, words in cases.values():
    with open(path, 'wb') as f:
      f.write(data)
    with pytest.raises(ValueError) as error:
      read_backbone_weights(path)
    assert words in str(error.value) and '\n' not in str(error.value)


def test_a_folder_a_converted_file_and_an_existing_output_are_one_line(tmp_path, capsys):
  tensors = _torch_state_dict(ARCH)
  src = tmp_path / 'r18.safetensors'
  _write_safetensors(src, tensors, {'bn1.num_batches_tracked': 'I64'})
  out = tmp_path / 'out'
  assert convert_weights.main(['--arch', ARCH, '--src', str(src), '--out', str(out)]) == 0
  capsys.readouterr()
  before = (out / 'backbone.npz').read_bytes()
  for source, destination, words in (
      (tmp_path, tmp_path / 'new', 'is a folder: give the checkpoint file in it'),
      (out / 'backbone.npz', tmp_path / 'new', f'is already converted ({ARCH} weights): give it '
                                               'to training as --config.model.pretrained'),
      (src, out, f'{out} already holds backbone.npz: give a new --out folder')):
    assert convert_weights.main(['--arch', ARCH, '--src', str(source), '--out',
                                 str(destination)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and words in err, err
  assert (out / 'backbone.npz').read_bytes() == before and not (tmp_path / 'new').exists()
