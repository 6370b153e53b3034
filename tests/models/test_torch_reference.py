"""Numerical equivalence with the PyTorch reference backbones of torch_reference.py."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fashion_jax import convert_weights
from fashion_jax.models import build_backbone, build_model
from fashion_jax.models.pretrained import load_pretrained_from_config, variables

torch = pytest.importorskip(
    'torch', reason='PyTorch reference tests need torch: pip install "fashion_jax[torch]"')
nn = torch.nn

from torch_reference import (TorchEfficientNet, TorchOSNetAIN, TorchResNet,  # noqa: E402
                             TorchSEResNeXt)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torch_model(name, last_stride):
  if name.startswith('efficientnet_'):
    return TorchEfficientNet(name.removeprefix('efficientnet_'), last_stride)
  if name == 'osnet_ain_x1_0':
    return TorchOSNetAIN()  # no strided last stage
  if name.startswith('se_resnext'):
    return TorchSEResNeXt({'se_resnext50_32x4d': (3, 4, 6, 3),
                           'se_resnext101_32x4d': (3, 4, 23, 3)}[name], last_stride)
  depth = int(name.split('_')[0].removeprefix('resnet'))
  ibn = name.split('_')[2] if '_ibn_' in name else None
  return TorchResNet(depth, ibn, last_stride)


@functools.cache
def _reference(name):
  """`name` with random weights and random (but activation-scaled) BatchNorm statistics."""
  torch.manual_seed(len(name))
  model = _torch_model(name, last_stride=2)
  norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d))]
  with torch.no_grad():
    for m in norms:
      # Scales below 1 keep the residual stream, and so the pooled features, near a trained
      # ResNet's magnitude (mean ~1, max ~10: float32 rounding then differs by ~5e-5 at most).
      m.weight.uniform_(0.1, 0.5)
      m.bias.normal_(0.0, 0.05)
    # Running statistics measured on a random batch keep activations O(1) through 16 blocks;
    # perturbing them makes them differ from any batch's statistics.
    for m in norms:
      if isinstance(m, nn.BatchNorm2d):
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    # EfficientNet's residual stream has no normalisation after its sums: statistics measured
    # where the last stages are 2x2 let activations grow to ~1e4 at 320x320, so ill-conditioned
    # that float32 and float64 PyTorch differ by 1e2. At 128x128 they stay O(1).
    size = 128 if name.startswith('efficientnet_') else 64
    model(torch.randn(2, 3, size, size))
    for m in norms:
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean += 0.2 * torch.randn_like(m.running_mean) * m.running_var.sqrt()
        m.running_var *= torch.empty_like(m.running_var).uniform_(0.5, 2.0)
  return model.eval()


def _with_last_stride(model, name, last_stride):
  if last_stride == 2:
    return model
  copy = _torch_model(name, last_stride)
  copy.load_state_dict(model.state_dict())
  return copy.eval()


def _compile_fast(fn, *args):
  # Each case compiles a whole backbone once; XLA's backend optimisations would cost more time
  # than they save on one batch, and do not change float32 results beyond rounding.
  return jax.jit(fn).lower(*args).compile(
      compiler_options={'xla_backend_optimization_level': 0})


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _torch_pooled(model, images_nchw):
  with torch.no_grad():
    return model(images_nchw).mean((2, 3)).numpy()


@pytest.mark.parametrize('name,last_stride', [
    (name, last_stride) for name in ('resnet50', 'resnet50_ibn_a', 'resnet50_ibn_b',
                                     'se_resnext50_32x4d') for last_stride in (1, 2)
] + [('osnet_ain_x1_0', 1), ('efficientnet_b2', 1)])
def test_backbone_matches_pytorch_reference(name, last_stride):
  reference = _with_last_stride(_reference(name), name, last_stride)
  converted, dropped = convert_weights.convert_state_dict(name, _state_dict(reference))
  assert [k for k in dropped if not k.endswith('num_batches_tracked')] == _head_keys(name)
  # Every variable is overwritten, so the backbone is built from shapes alone (no random init).
  backbone = nnx.eval_shape(lambda: build_backbone(name, last_stride=last_stride,
                                                   rngs=nnx.Rngs(0)))
  for key, var in variables(backbone).items():
    var.set_value(jnp.asarray(converted[key]))
  x = np.random.default_rng(last_stride).normal(size=(1, 320, 320, 3)).astype(np.float32)
  graphdef, state = nnx.split(backbone)
  pooled = _compile_fast(lambda s, x: nnx.merge(graphdef, s)(x, train=False).mean((1, 2)),
                         state, x)(state, x)
  expected = _torch_pooled(reference, torch.from_numpy(x.transpose(0, 3, 1, 2)))
  assert np.abs(expected).mean() > 0.05  # a meaningful comparison, not of near-zero features
  np.testing.assert_allclose(np.asarray(pooled), expected, rtol=0, atol=1e-4)


def _head_keys(name):
  """The reference's ImageNet classifier, which the conversion drops."""
  if name.startswith('efficientnet_'):
    return ['classifier.1.bias', 'classifier.1.weight']
  return ['last_linear.bias', 'last_linear.weight'] if name.startswith('se_resnext') else []


# Published sizes with the 1000-class head: torchvision's num_params for EfficientNet; for
# SE-ResNeXt-101, Cadene's model (48.96M in timm's tables).
@pytest.mark.parametrize('name,count', [('efficientnet_b2', 9_109_994),
                                        ('efficientnet_b4', 19_341_616),
                                        ('se_resnext101_32x4d', 48_955_416)])
def test_reference_size_and_conversion(name, count):
  """The reference has the published size, and its whole state_dict converts: every name and
  shape maps onto the Flax backbone, which lacks only the ImageNet classifier."""
  with torch.device('meta'):  # shapes only: no memory, no random initialisation
    reference = _torch_model(name, last_stride=2)
  assert sum(p.numel() for p in reference.parameters()) == count
  shapes = {k: np.broadcast_to(np.float32(0), tuple(v.shape))
            for k, v in reference.state_dict().items()}
  converted, dropped = convert_weights.convert_state_dict(name, shapes)
  assert [k for k in dropped if not k.endswith('num_batches_tracked')] == _head_keys(name)
  head = sum(shapes[k].size for k in _head_keys(name))
  assert sum(v.size for v in converted.values()) == sum(
      v.size for k, v in shapes.items() if not k.endswith('num_batches_tracked')) - head


def test_pth_file_to_reid_model(tmp_path):
  """.pth -> convert_weights CLI -> config.model.pretrained -> ReIDModel, for an IBN-b ResNet-18."""
  name = 'resnet18_ibn_b'
  reference = _reference(name)
  state = reference.state_dict()
  state = {**{f'module.{k}': v for k, v in state.items()},  # DataParallel-saved, with a head
           'module.fc.weight': torch.zeros(1000, 512), 'module.fc.bias': torch.zeros(1000)}
  torch.save({'state_dict': state}, tmp_path / 'r18.pth')
  out = tmp_path / 'converted'
  assert convert_weights.main(['--arch', name, '--src', str(tmp_path / 'r18.pth'),
                               '--out', str(out)]) == 0
  config = ml_collections.ConfigDict(dict(backbone=name, last_stride=2, width=64,
                                          dtype='float32', pretrained=str(out)))
  model = build_model(config, num_classes=5)
  classifier_before = np.asarray(model.classifier.kernel[...])
  report = load_pretrained_from_config(model, config)
  assert report.not_loaded == ['bottleneck.mean', 'bottleneck.scale', 'bottleneck.var',
                               'classifier.kernel']
  assert len(report.loaded) == len(variables(model.backbone))
  np.testing.assert_array_equal(model.classifier.kernel[...], classifier_before)
  images = np.random.default_rng(0).integers(0, 256, (2, 128, 96, 3), dtype=np.uint8)
  graphdef, mstate = nnx.split(model)
  global_feat = jax.jit(
      lambda s, x: nnx.merge(graphdef, s).features(x, train=False)[0])(mstate, images)
  normalised = (images / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
  expected = _torch_pooled(reference, torch.from_numpy(
      normalised.astype(np.float32).transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(np.asarray(global_feat), expected, rtol=0, atol=1e-4)
  # Without the field nothing is loaded.
  del config['pretrained']
  assert load_pretrained_from_config(model, config) is None


class Payload:
  """Any class outside torch's allowlist: unpickling it could run arbitrary code."""


def test_pth_with_pickled_code_is_refused(tmp_path, capsys):
  torch.save({'conv1.weight': torch.zeros(1), 'hook': Payload()}, tmp_path / 'unsafe.pth')
  assert convert_weights.main(['--arch', 'resnet18', '--src', str(tmp_path / 'unsafe.pth'),
                               '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'holds more than tensors and is not loaded' in err
