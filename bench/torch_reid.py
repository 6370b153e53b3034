"""The strong baseline's training step in PyTorch, as a speed reference for train_throughput.py.

The same model (the ResNet / IBN-Net reference of the equivalence tests with GAP, or timm's
VisionTransformer built from the registry's ViTSpec with its token or mean pooling; then BNNeck
and a bias-free classifier) and the same losses as `fashion_jax.train_step`: label-smoothed
cross-entropy, batch-hard triplet, center loss with its own SGD, Adam with coupled weight
decay. Mixed precision is autocast to bfloat16; the caller chooses channels_last and
torch.compile.
"""

import functools
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

  def __init__(self, backbone: str, width: int, last_stride: int, num_classes: int,
               image_size: tuple[int, int] = (224, 224)):
    super().__init__()
    entry = get_backbone(backbone)
    if width != 64 or entry.family not in ('resnet', 'vit'):
      raise ValueError(f'the PyTorch reference has ResNet / IBN-Net and ViT backbones of width '
                       f'64 only, not {backbone} width {width}')
    mean, std = MEAN, STD
    if entry.family == 'resnet':
      depth = entry.arch['depth']
      self.backbone = TorchResNet(depth, entry.arch['ibn'], last_stride)
      self.pool = lambda x: x.float().mean((2, 3))
      features = 512 * (4 if depth >= 50 else 1)
    else:
      spec = entry.arch['spec']
      self.backbone = timm_vit(spec, entry.arch['pool'], image_size)
      self.pool = lambda x: x.float()  # timm pools (num_classes=0)
      features = spec.dim
      # The same pixels as the JAX model, which re-normalises to the weights' statistics.
      mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in spec.stats)
    self.bottleneck = nn.BatchNorm1d(features)
    self.bottleneck.bias.requires_grad_(False)
    self.classifier = nn.Linear(features, num_classes, bias=False)
    nn.init.normal_(self.classifier.weight, std=0.001)
    self.register_buffer('mean', mean.clone())
    self.register_buffer('std', std.clone())

  def features(self, images):
    x = (images.float() - self.mean) / self.std
    global_feat = self.pool(self.backbone(x))
    return global_feat, self.bottleneck(global_feat)

  def forward(self, images):
    global_feat, neck_feat = self.features(images)
    return global_feat, self.classifier(neck_feat)

  def embed(self, images):
    return F.normalize(self.features(images)[1], dim=1)


def timm_vit(spec, pool: str, image_size: tuple[int, int]):
  """timm's VisionTransformer with the architecture of `spec` (fashion_jax.models.vit.ViTSpec)
  at `image_size`, returning the pooled [B, D] features: 'token' the class token, 'mean' the
  mean of the patch tokens after the final norm (as vit.mean_patch_pool)."""
  from timm.layers import get_act_layer
  from timm.models.vision_transformer import VisionTransformer

  if spec.patch_stride not in (None, spec.patch):
    raise ValueError(f'timm VisionTransformer has no overlapping patches (stride '
                     f'{spec.patch_stride}, patch {spec.patch})')
  if spec.norm_pre == spec.patch_bias:
    raise ValueError('timm VisionTransformer drops the patch bias exactly when it adds the '
                     'pre-norm (CLIP); this spec has one without the other')
  return VisionTransformer(
      img_size=image_size, patch_size=spec.patch, num_classes=0,
      global_pool={'token': 'token', 'mean': 'avg'}[pool], fc_norm=False,
      embed_dim=spec.dim, depth=spec.depth, num_heads=spec.heads, mlp_ratio=spec.mlp_ratio,
      init_values=1e-5 if spec.layer_scale else None, class_token=spec.class_token,
      no_embed_class=not spec.embed_class, reg_tokens=spec.reg_tokens, pre_norm=spec.norm_pre,
      norm_layer=functools.partial(nn.LayerNorm, eps=spec.eps),
      act_layer=get_act_layer(spec.act))


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
