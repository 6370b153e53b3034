"""PyTorch reference backbones, written from the published definitions.

IBN-Net's resnet_ibn.py (ResNet, IBN-a, IBN-b), Cadene's senet.py (SE-ResNeXt) and torchreid's
osnet_ain.py (OSNet-AIN), each returning its last feature map. The equivalence tests compare
the Flax backbones with these; bench/torch_reid.py trains them as the speed reference.
"""

import collections

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
