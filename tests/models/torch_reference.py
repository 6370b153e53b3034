"""PyTorch reference backbones, written from the published definitions.

IBN-Net's resnet_ibn.py (ResNet, IBN-a, IBN-b), Cadene's senet.py (SE-ResNeXt), torchreid's
osnet_ain.py (OSNet-AIN) and torchvision's efficientnet.py (EfficientNet-B2/B4), each returning
its last feature map. The equivalence tests compare the Flax backbones with these;
bench/torch_reid.py trains them as the speed reference.
"""

import collections
import math

import torch

nn = torch.nn

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


class TorchSEResNeXt(nn.Module):
  """Cadene's se_resnext{50,101}_32x4d (`layers` blocks per stage); forward stops before its
  pooling and `last_linear` head."""

  def __init__(self, layers, last_stride):
    super().__init__()
    self.layer0 = nn.Sequential(collections.OrderedDict([
        ('conv1', nn.Conv2d(3, 64, 7, 2, 3, bias=False)), ('bn1', nn.BatchNorm2d(64)),
        ('relu1', nn.ReLU()), ('pool', nn.MaxPool2d(3, 2, ceil_mode=True))]))
    inplanes = 64
    for stage, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, last_stride))):
      planes = 64 * 2 ** stage
      downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
      mods = [TorchSEResNeXtBlock(inplanes, planes, stride, downsample)]
      mods += [TorchSEResNeXtBlock(planes * 4, planes, 1, None) for _ in range(1, blocks)]
      inplanes = planes * 4
      setattr(self, f'layer{stage + 1}', nn.Sequential(*mods))
    self.last_linear = nn.Linear(2048, 1000)

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


def _divisible8(value):
  rounded = max(8, int(value + 4) // 8 * 8)
  return rounded + 8 if rounded < 0.9 * value else rounded


def _conv_bn_act(cin, cout, k, stride=1, groups=1, act=True):
  """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, optional SiLU."""
  layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]
  return nn.Sequential(*layers, *([nn.SiLU()] if act else []))


class TorchSqueezeExcitation(nn.Module):
  def __init__(self, channels, squeeze):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, squeeze, 1)
    self.fc2 = nn.Conv2d(squeeze, channels, 1)

  def forward(self, x):
    gate = self.fc2(nn.functional.silu(self.fc1(x.mean((2, 3), keepdim=True))))
    return x * torch.sigmoid(gate)


class TorchMBConv(nn.Module):
  """torchvision's MBConv in inference (stochastic depth is the identity there)."""

  def __init__(self, expand, k, stride, cin, cout):
    super().__init__()
    hidden = _divisible8(cin * expand)
    layers = [_conv_bn_act(cin, hidden, 1)] if hidden != cin else []
    layers += [_conv_bn_act(hidden, hidden, k, stride, groups=hidden),
               TorchSqueezeExcitation(hidden, max(1, cin // 4)),
               _conv_bn_act(hidden, cout, 1, act=False)]
    self.block = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    return self.block(x) + x if self.residual else self.block(x)


class TorchEfficientNet(nn.Module):
  """torchvision's efficientnet_b{2,4}: `features` and, for the parameter count, `classifier`."""

  B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
  SCALES = {'b2': (1.1, 1.2), 'b4': (1.4, 1.8)}

  def __init__(self, variant, last_stride):
    super().__init__()
    width, depth = self.SCALES[variant]
    stages = [(e, k, last_stride if i == 5 else s, _divisible8(cin * width),
               _divisible8(cout * width), math.ceil(n * depth))
              for i, (e, k, s, cin, cout, n) in enumerate(self.B0)]
    features = [_conv_bn_act(3, stages[0][3], 3, 2)]
    for e, k, s, cin, cout, n in stages:
      features.append(nn.Sequential(*[TorchMBConv(e, k, s if i == 0 else 1,
                                                  cin if i == 0 else cout, cout)
                                       for i in range(n)]))
    features.append(_conv_bn_act(stages[-1][4], 4 * stages[-1][4], 1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(4 * stages[-1][4], 1000))

  def forward(self, x):
    return self.features(x)  # the feature map: the test pools it
