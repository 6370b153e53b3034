"""Tests for the learning-rate schedule and the coupled-L2 Adam of the strong baseline."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fashion_jax import optim


def _optim_config(**overrides):
  c = ml_collections.ConfigDict(dict(base_lr=3.5e-4, weight_decay=5e-4, warmup_epochs=10,
                                     warmup_factor=0.01, milestones=(40, 70), gamma=0.1))
  c.update(overrides)
  return c


@pytest.mark.parametrize('epoch,expected_factor', [
    (0, 0.01),                       # warmup starts at 0.01 x base
    (5, 0.01 * 0.5 + 0.5),           # linear in the epoch
    (9, 0.01 * 0.1 + 0.9),
    (10, 1.0), (39, 1.0),
    (40, 0.1), (69, 0.1),            # x0.1 at epoch 40
    (70, 0.01), (119, 0.01),         # and again at 70
])
def test_warmup_multistep_schedule(epoch, expected_factor):
  steps_per_epoch = 7
  _, schedule = optim.make_optimizer(_optim_config(), steps_per_epoch)
  for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):
    np.testing.assert_allclose(schedule(step), 3.5e-4 * expected_factor, rtol=1e-6)


def _torch_adam_reference(param, grads, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
  """PyTorch Adam(weight_decay=wd): L2 added to the gradient before the moments."""
  m = np.zeros_like(param)
  v = np.zeros_like(param)
  for t, g in enumerate(grads, start=1):
    g = g + weight_decay * param
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    param = param - lr * m_hat / (np.sqrt(v_hat) + eps)
  return param


def test_adam_with_coupled_weight_decay_matches_reference():
  rng = np.random.default_rng(0)
  param = rng.normal(size=(5,)).astype(np.float64)
  grads = [rng.normal(size=(5,)) for _ in range(4)]
  # A large decay makes coupled and decoupled (AdamW) clearly different.
  config = _optim_config(weight_decay=0.5, warmup_epochs=0, milestones=(100,), base_lr=0.1)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  p = jnp.asarray(param, jnp.float32)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
    p = optax.apply_updates(p, updates)
  expected = _torch_adam_reference(param, grads, lr=0.1, weight_decay=0.5)
  np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)
  adamw = optax.adamw(0.1, weight_decay=0.5)
  q, s = jnp.asarray(param, jnp.float32), None
  s = adamw.init(q)
  for g in grads:
    u, s = adamw.update(jnp.asarray(g, jnp.float32), s, q)
    q = optax.apply_updates(q, u)
  assert not np.allclose(q, expected, atol=1e-3)


def test_schedule_is_jittable():
  _, schedule = optim.make_optimizer(_optim_config(), steps_per_epoch=3)
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(45 * 3)), 3.5e-5, rtol=1e-6)


def _vit_optim_config(**overrides):
  return _optim_config(**{**dict(optimizer='adamw', schedule='cosine', cosine_epochs=10,
                                 final_lr_factor=0.1, layer_decay=1.0), **overrides})


def test_warmup_cosine_schedule():
  """Per step: linear warmup from warmup_factor x base, half a cosine to final_lr_factor x base
  at the end of epoch cosine_epochs, constant after."""
  config = _vit_optim_config(base_lr=1e-3, warmup_epochs=2, warmup_factor=0.1)
  _, schedule = optim.make_optimizer(config, steps_per_epoch=5)
  expected = {0: 1e-4, 5: 1e-4 + 0.9e-3 * 0.5, 10: 1e-3, 30: 1e-3 * (0.1 + 0.9 * 0.5),
              50: 1e-4, 70: 1e-4}
  for step, lr in expected.items():
    np.testing.assert_allclose(schedule(step), lr, rtol=1e-5)
  assert all(schedule(s) >= schedule(s + 1) for s in range(10, 50))


def _tiny_tree():
  """A parameter tree shaped as a ReID model on a 2-block ViT (and its head)."""
  rng = np.random.default_rng(0)
  r = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  block = lambda: {'attn': {'qkv': {'kernel': r(4, 12), 'bias': r(12)}},
                   'norm1': {'scale': r(4), 'bias': r(4)}, 'ls1': {'gamma': r(4)}}
  return {'backbone': {'patch_embed': {'proj': {'kernel': r(2, 2, 3, 4), 'bias': r(4)}},
                       'cls_token': r(1, 1, 4), 'pos_embed': r(1, 5, 4),
                       'blocks': {0: block(), 1: block()}, 'norm': {'scale': r(4), 'bias': r(4)}},
          'bottleneck': {'scale': r(4)}, 'classifier': {'kernel': r(4, 3)}}


def test_decay_mask_and_layer_scales():
  tree = _tiny_tree()
  mask = optim.decay_mask(tree)
  decayed = sorted(jax.tree_util.keystr(p, simple=True, separator='.') for p, m in
                   jax.tree_util.tree_flatten_with_path(mask)[0] if m)
  assert decayed == ['backbone.blocks.0.attn.qkv.kernel', 'backbone.blocks.1.attn.qkv.kernel',
                     'backbone.patch_embed.proj.kernel', 'classifier.kernel']
  scales = optim.layer_scales(tree, 0.5)  # 2 blocks: layers 0 (embeddings), 1, 2, 3 (head)
  assert scales['backbone']['pos_embed'] == scales['backbone']['patch_embed']['proj']['bias'] \
      == 0.125
  assert scales['backbone']['blocks'][0]['ls1']['gamma'] == 0.25
  assert scales['backbone']['blocks'][1]['attn']['qkv']['kernel'] == 0.5
  assert scales['backbone']['norm']['scale'] == scales['classifier']['kernel'] == 1.0
  with pytest.raises(ValueError, match='optim.layer_decay needs a backbone built of blocks.N'):
    optim.make_optimizer(_vit_optim_config(layer_decay=0.5), 1)[0].init(
        {'backbone': {'conv1': {'kernel': jnp.zeros((3, 3))}}})


def test_adamw_with_layer_decay_matches_torch_param_groups():
  """PyTorch AdamW with one parameter group per (layer, decay or not): lr = schedule x
  layer_decay ** (L + 1 - layer), weight_decay 0 on norms, biases, tokens, positions."""
  torch = pytest.importorskip('torch')
  config = _vit_optim_config(base_lr=0.05, weight_decay=0.3, warmup_epochs=1,
                             warmup_factor=0.2, layer_decay=0.6)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=2)
  params = _tiny_tree()
  flat, treedef = jax.tree_util.tree_flatten(params)
  scales = jax.tree_util.tree_leaves(optim.layer_scales(params, 0.6))
  mask = jax.tree_util.tree_leaves(optim.decay_mask(params))
  tensors = [torch.tensor(np.asarray(p), requires_grad=True) for p in flat]
  groups = [{'params': [t], 'scale': s, 'weight_decay': 0.3 if m else 0.0}
            for t, s, m in zip(tensors, scales, mask)]
  reference = torch.optim.AdamW(groups, lr=0.05, betas=(0.9, 0.999), eps=1e-8)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  for step in range(5):
    grads = [rng.normal(size=p.shape).astype(np.float32) for p in flat]
    for group in reference.param_groups:
      group['lr'] = float(schedule(step)) * group['scale']
    for t, g in zip(tensors, grads):
      t.grad = torch.from_numpy(g)
    reference.step()
    updates, state = tx.update(jax.tree_util.tree_unflatten(treedef, list(map(jnp.asarray, grads))),
                               state, params)
    params = optax.apply_updates(params, updates)
  for ours, theirs in zip(jax.tree_util.tree_leaves(params), tensors):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_layer_decay_is_refused_for_backbones_without_blocks():
  from fashion_jax import configlib
  config = configlib.base_config()
  config.dataset.name = 'fashion_synth/demo'
  config.optim.layer_decay = 0.75
  with pytest.raises(ValueError, match='optim.layer_decay applies to the ViT backbones .* not '
                                       'resnet50_ibn_a; leave it at 1'):
    configlib.validate_config(config, num_devices=1)
  config.model.backbone = 'vit_b16'
  configlib.validate_config(config, num_devices=1)
