"""The PyTorch speed reference computes the same losses as the JAX training step."""

import os
import sys

import numpy as np
import pytest

from fashion_jax import losses

torch = pytest.importorskip('torch', reason='the PyTorch reference needs torch')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'bench'))
import torch_reid  # noqa: E402


def _batch(seed):
  rng = np.random.default_rng(seed)
  labels = np.repeat(rng.permutation(12)[:6], 4).astype(np.int32)
  features = rng.normal(size=(24, 32)).astype(np.float32)
  features[::5] = features[1::5][: len(features[::5])]  # duplicated rows: zero distances
  return features, labels


@pytest.mark.parametrize('seed', [0, 1])
def test_triplet_matches_jax(seed):
  features, labels = _batch(seed)
  expected = losses.batch_hard_triplet_loss(features, labels, margin=0.3)
  got = torch_reid.batch_hard_triplet(torch.from_numpy(features), torch.from_numpy(labels).long())
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def test_label_smoothed_cross_entropy_matches_jax():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(16, 40)).astype(np.float32) * 3
  labels = rng.integers(0, 40, 16).astype(np.int32)
  expected = losses.cross_entropy_label_smoothing(logits, labels, 0.1)
  got = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels).long(),
                                          label_smoothing=0.1)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def _trains_and_embeds(model):
  """Five steps on one fixed batch lower the loss; the embeddings are unit vectors."""
  torch.manual_seed(0)
  step = torch_reid.TrainStep(model, 4, amp_dtype=None, device=torch.device('cpu'))
  images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
  labels = torch.arange(4).repeat_interleave(2)
  first = float(step(images, labels))
  for _ in range(4):
    last = float(step(images, labels))
  assert np.isfinite(first) and last < first
  embeddings = step.embedder()(images)
  np.testing.assert_allclose(embeddings.norm(dim=1).numpy(), 1.0, rtol=1e-5)


def test_train_step_lowers_the_loss_on_a_fixed_batch():
  torch.manual_seed(0)
  _trains_and_embeds(torch_reid.ReIDModel('resnet18', 64, 1, num_classes=4))


def test_center_loss_matches_jax():
  features, labels = _batch(3)
  centers = np.random.default_rng(4).normal(size=(12, 32)).astype(np.float32)
  expected = losses.center_loss(features, labels, centers)
  got = torch_reid.center_loss(torch.from_numpy(features), torch.from_numpy(labels).long(),
                               torch.from_numpy(centers))
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


@pytest.mark.parametrize('name', ['vit_t16', 'vit_b16_siglip', 'vit_s14_dinov2_reg4',
                                  'vit_b16_clip_quickgelu'])
def test_vit_reference_has_the_registry_architecture(name):
  """timm's model built from the registry's spec holds the same tensors as ours under timm's
  names (what weight conversion maps one to one), so the speed comparison is of one model."""
  pytest.importorskip('timm', reason='the ViT reference is timm')
  from flax import nnx

  from fashion_jax.models import build_backbone, get_backbone
  from fashion_jax.models.pretrained import variables

  entry = get_backbone(name)
  spec = entry.arch['spec']
  size = (spec.grid[0] * spec.patch, spec.grid[1] * spec.patch)
  reference = torch_reid.timm_vit(spec, entry.arch['pool'], size)
  theirs = {key: value.numel() for key, value in reference.state_dict().items()}
  ours = nnx.eval_shape(lambda: build_backbone(name, rngs=nnx.Rngs(0)))
  ours = {entry.torch_name(key): int(np.prod(var.shape))
          for key, var in variables(ours).items()}
  assert ours == theirs


def test_vit_reference_trains_and_refuses_overlapping_patches():
  pytest.importorskip('timm', reason='the ViT reference is timm')
  torch.manual_seed(0)
  _trains_and_embeds(torch_reid.ReIDModel('vit_t16', 64, 1, num_classes=4, image_size=(32, 32)))
  with pytest.raises(ValueError, match='overlapping patches'):
    torch_reid.ReIDModel('vit_b16_s12', 64, 1, num_classes=4)
