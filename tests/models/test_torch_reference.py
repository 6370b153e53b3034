"""Numerical equivalence with PyTorch: reference ResNet, IBN-Net, SE-ResNeXt, OSNet-AIN here.

Written from the published definitions (IBN-Net resnet_ibn.py, Cadene senet.py, torchreid).
"""

import collections
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERS = {18: ('basic', (2, 2, 2, 2)), 50: ('bottleneck', (3, 4, 6, 3))}
IBN_CFG = {None: (None,) * 4, 'a': ('a', 'a', 'a', None), 'b': ('b', 'b', None, None)}


class TorchIBN(nn.Module):
  def __init__(self, planes):
    super().__init__()
    self.half = int(planes * 0.5)
    self.IN = nn.InstanceNorm2d(self.half, affine=True)
    self.BN = nn.BatchNorm2d(planes - self.half)

  def forward(self, x):
    first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
    return torch.cat([self.IN(first), self.BN(rest)], dim=1)


class TorchBlock(nn.Module):
  """IBN-Net's BasicBlock_IBN (kind 'basic') or Bottleneck_IBN (kind 'bottleneck')."""

  def __init__(self, kind, inplanes, planes, ibn, stride, downsample):
    super().__init__()
    self.kind = kind
    out = planes * (4 if kind == 'bottleneck' else 1)
    if kind == 'bottleneck':
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(out)
    else:
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn1 = TorchIBN(planes) if ibn == 'a' else nn.BatchNorm2d(planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.IN = nn.InstanceNorm2d(out, affine=True) if ibn == 'b' else None
    self.downsample = downsample

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.kind == 'bottleneck':
      y = self.bn3(self.conv3(torch.relu(y)))
    y = y + (x if self.downsample is None else self.downsample(x))
    if self.IN is not None:
      y = self.IN(y)
    return torch.relu(y)


class TorchResNet(nn.Module):
  """IBN-Net's ResNet_IBN without the avgpool / fc head: returns the stage-4 feature map."""

  def __init__(self, depth, ibn, last_stride):
    super().__init__()
    kind, layers = LAYERS[depth]
    cfg = IBN_CFG[ibn]
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.InstanceNorm2d(64, affine=True) if cfg[0] == 'b' else nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for stage, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, last_stride))):
      planes = 64 * 2 ** stage
      out = planes * (4 if kind == 'bottleneck' else 1)
      downsample = None
      if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                   nn.BatchNorm2d(out))
      # IBN-b: no IN in a stage's first block, IN only in its last block.
      ibns = [None if cfg[stage] == 'b' and (i == 0 or i < blocks - 1) else cfg[stage]
              for i in range(blocks)]
      mods = [TorchBlock(kind, inplanes, planes, ibns[0], stride, downsample)]
      mods += [TorchBlock(kind, out, planes, ibns[i], 1, None) for i in range(1, blocks)]
      inplanes = out
      setattr(self, f'layer{stage + 1}', nn.Sequential(*mods))

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TorchSEModule(nn.Module):
  def __init__(self, channels, reduction):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
    self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

  def forward(self, x):
    gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
    return x * gate


class TorchSEResNeXtBlock(nn.Module):
  """Cadene's SEResNeXtBottleneck, 32 groups x 4 channels, reduction 16."""

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    width = planes * 4 // 64 * 32
    self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=32, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.se_module = TorchSEModule(planes * 4, 16)
    self.downsample = downsample

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.se_module(self.bn3(self.conv3(y)))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchSEResNeXt50(nn.Module):
  """Cadene's se_resnext50_32x4d without its pooling / last_linear head."""

  def __init__(self, last_stride):
    super().__init__()
    self.layer0 = nn.Sequential(collections.OrderedDict([
        ('conv1', nn.Conv2d(3, 64, 7, 2, 3, bias=False)), ('bn1', nn.BatchNorm2d(64)),
        ('relu1', nn.ReLU()), ('pool', nn.MaxPool2d(3, 2, ceil_mode=True))]))
    inplanes = 64
    for stage, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, last_stride))):
      planes = 64 * 2 ** stage
      downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
      mods = [TorchSEResNeXtBlock(inplanes, planes, stride, downsample)]
      mods += [TorchSEResNeXtBlock(planes * 4, planes, 1, None) for _ in range(1, blocks)]
      inplanes = planes * 4
      setattr(self, f'layer{stage + 1}', nn.Sequential(*mods))

  def forward(self, x):
    return self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))


class TorchConvLayer(nn.Module):
  """torchreid's ConvLayer / Conv1x1 / Conv1x1Linear: conv, optional BN or IN, optional ReLU."""

  def __init__(self, cin, cout, k=1, stride=1, norm='bn', relu=True):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    self.bn = {'bn': nn.BatchNorm2d(cout), 'in': nn.InstanceNorm2d(cout, affine=True),
               None: None}[norm]
    self.relu = relu

  def forward(self, x):
    x = self.conv(x)
    x = x if self.bn is None else self.bn(x)
    return torch.relu(x) if self.relu else x


class TorchLightConv(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv1 = nn.Conv2d(c, c, 1, bias=False)
    self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
    self.bn = nn.BatchNorm2d(c)

  def forward(self, x):
    return torch.relu(self.bn(self.conv2(self.conv1(x))))


class TorchStream(nn.Module):
  def __init__(self, c, depth):
    super().__init__()
    self.layers = nn.Sequential(*[TorchLightConv(c) for _ in range(depth)])

  def forward(self, x):
    return self.layers(x)


class TorchOSBlock(nn.Module):
  """OSBlock, or OSBlockINin with `use_in` (IN replaces conv3's BN)."""

  def __init__(self, cin, cout, use_in):
    super().__init__()
    mid = cout // 4
    self.conv1 = TorchConvLayer(cin, mid)
    self.conv2 = nn.ModuleList([TorchStream(mid, t) for t in range(1, 5)])
    self.gate = TorchSEModule(mid, 16)  # the same function as torchreid's ChannelGate
    self.conv3 = TorchConvLayer(mid, cout, norm=None if use_in else 'bn', relu=False)
    self.IN = nn.InstanceNorm2d(cout, affine=True) if use_in else None
    self.downsample = TorchConvLayer(cin, cout, relu=False) if cin != cout else None

  def forward(self, x):
    x1 = self.conv1(x)
    x3 = self.conv3(sum(self.gate(stream(x1)) for stream in self.conv2))
    x3 = x3 if self.IN is None else self.IN(x3)
    return torch.relu(x3 + (x if self.downsample is None else self.downsample(x)))


class TorchOSNetAIN(nn.Module):
  """torchreid's osnet_ain_x1_0 up to conv5 (its featuremaps)."""

  def __init__(self):
    super().__init__()
    c = (64, 256, 384, 512)
    self.conv1 = TorchConvLayer(3, 64, 7, 2, norm='in')
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    for stage, uses in enumerate(((True, True), (False, True), (True, False))):
      setattr(self, f'conv{stage + 2}', nn.Sequential(
          TorchOSBlock(c[stage], c[stage + 1], uses[0]),
          TorchOSBlock(c[stage + 1], c[stage + 1], uses[1])))
    self.pool2 = nn.Sequential(TorchConvLayer(256, 256), nn.AvgPool2d(2, 2))
    self.pool3 = nn.Sequential(TorchConvLayer(384, 384), nn.AvgPool2d(2, 2))
    self.conv5 = TorchConvLayer(512, 512)

  def forward(self, x):
    x = self.pool2(self.conv2(self.maxpool(self.conv1(x))))
    return self.conv5(self.conv4(self.pool3(self.conv3(x))))


def _torch_model(name, last_stride):
  if name == 'osnet_ain_x1_0':
    return TorchOSNetAIN()  # no strided last stage
  if name == 'se_resnext50_32x4d':
    return TorchSEResNeXt50(last_stride)
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
    model(torch.randn(2, 3, 64, 64))
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
] + [('osnet_ain_x1_0', 1)])
def test_backbone_matches_pytorch_reference(name, last_stride):
  reference = _with_last_stride(_reference(name), name, last_stride)
  converted, dropped = convert_weights.convert_state_dict(name, _state_dict(reference))
  assert all(k.endswith('num_batches_tracked') for k in dropped)
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
                               '--out', str(tmp_path / 'out')]) == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'holds more than tensors and is not loaded' in err
