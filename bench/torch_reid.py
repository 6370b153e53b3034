"""The strong baseline's training step in PyTorch, as a speed reference for train_throughput.py.

The same model (the ResNet / IBN-Net reference of the equivalence tests, GAP, BNNeck, bias-free
classifier) and the same losses as `fashion_jax.train_step`: label-smoothed cross-entropy,
batch-hard triplet, center loss with its own SGD, Adam with coupled weight decay. Mixed
precision is autocast to bfloat16; the caller chooses channels_last and torch.compile.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests' / 'models'))
from torch_reference import TorchResNet  # noqa: E402

from fashion_jax.models import get_backbone  # noqa: E402

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255


class ReIDModel(nn.Module):
  """uint8 images [B, 3, H, W] -> (f_t before the BNNeck, logits); `embed` gives unit f_i."""

  def __init__(self, backbone: str, width: int, last_stride: int, num_classes: int):
    super().__init__()
    entry = get_backbone(backbone)
    if entry.family != 'resnet' or width != 64:
      raise ValueError(f'the PyTorch reference has ResNet / IBN-Net backbones of width 64 only, '
                       f'not {backbone} width {width}')
    depth = entry.arch['depth']
    self.backbone = TorchResNet(depth, entry.arch['ibn'], last_stride)
    features = 512 * (4 if depth >= 50 else 1)
    self.bottleneck = nn.BatchNorm1d(features)
    self.bottleneck.bias.requires_grad_(False)
    self.classifier = nn.Linear(features, num_classes, bias=False)
    nn.init.normal_(self.classifier.weight, std=0.001)
    self.register_buffer('mean', MEAN.clone())
    self.register_buffer('std', STD.clone())

  def features(self, images):
    x = (images.float() - self.mean) / self.std
    global_feat = self.backbone(x).float().mean((2, 3))
    return global_feat, self.bottleneck(global_feat)

  def forward(self, images):
    global_feat, neck_feat = self.features(images)
    return global_feat, self.classifier(neck_feat)

  def embed(self, images):
    return F.normalize(self.features(images)[1], dim=1)


def batch_hard_triplet(features, labels, margin: float = 0.3):
  distances = torch.cdist(features, features).clamp_min(1e-6)
  same = labels[:, None] == labels[None, :]
  hardest_positive = distances.masked_fill(~same, 0).amax(1)
  hardest_negative = distances.masked_fill(same, float('inf')).amin(1)
  return F.relu(hardest_positive - hardest_negative + margin).mean()


def center_loss(features, labels, centers):
  return (features - centers[labels]).pow(2).sum(1).mean()


class TrainStep:
  """step(images, labels) -> loss: forward, the three losses, backward and both updates."""

  def __init__(self, model: ReIDModel, num_classes: int, *, amp_dtype, device,
               center_weight: float = 5e-4, center_lr: float = 0.5):
    self.model = model
    self.amp_dtype = amp_dtype
    self.device = device
    self.center_weight = center_weight
    self.centers = torch.randn(num_classes, model.bottleneck.num_features, device=device,
                               requires_grad=True)
    # The fused CUDA kernel: PyTorch's fastest Adam, so the comparison is with its best.
    self.optimizer = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4,
                                      fused=device.type == 'cuda')
    # The centers' own SGD, its learning rate divided by the loss weight (docs/method.md section 3).
    self.center_optimizer = torch.optim.SGD([self.centers], lr=center_lr / center_weight)
    self._forward = self._loss

  def _loss(self, images, labels):
    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                        enabled=self.amp_dtype is not None):
      global_feat, logits = self.model(images)
    global_feat, logits = global_feat.float(), logits.float()
    center = center_loss(global_feat, labels, self.centers)
    return (F.cross_entropy(logits, labels, label_smoothing=0.1)
            + batch_hard_triplet(global_feat, labels) + self.center_weight * center)

  def compile(self):
    self._forward = torch.compile(self._loss)

  def uncompile(self):
    self._forward = self._loss

  def __call__(self, images, labels):
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    self.center_optimizer.zero_grad(set_to_none=True)
    loss = self._forward(images, labels)
    loss.backward()
    self.optimizer.step()
    self.center_optimizer.step()
    return loss.detach()

  def embedder(self):
    self.model.eval()

    @torch.inference_mode()
    def embed(images):
      with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                          enabled=self.amp_dtype is not None):
        return self.model.embed(images)

    return embed
