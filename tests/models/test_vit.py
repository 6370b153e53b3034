"""ViT backbones: published sizes, conversion of each checkpoint layout checked against its
reference implementation (timm, DINOv2 through timm, open_clip, a NumPy big_vision forward), the
bicubic position-embedding resampling, and training through the data-parallel step."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fashion_jax import convert_weights
from fashion_jax.models import build_backbone, get_backbone, register, reid, vit
from fashion_jax.models.backbones import unregister
from fashion_jax.models.pretrained import read_backbone_weights, variables

# Tiny architectures of each kind, registered for the tests (conversion builds by name).
TINY = {
    'vit_tiny_timm': vit.ViTSpec(patch=16, dim=64, depth=2, heads=4, grid=(2, 2)),
    'vit_tiny_dinov2': vit.ViTSpec(patch=14, dim=64, depth=2, heads=4, grid=(2, 2),
                                   layer_scale=True, stats=vit.IMAGENET_STATS),
    'vit_tiny_dinov2_reg4': vit.ViTSpec(patch=14, dim=64, depth=2, heads=4, grid=(2, 2),
                                        layer_scale=True, reg_tokens=4, embed_class=False,
                                        stats=vit.IMAGENET_STATS),
    'vit_tiny_clip_quickgelu': vit.ViTSpec(patch=16, dim=64, depth=2, heads=4, grid=(2, 2),
                                           norm_pre=True, patch_bias=False, eps=1e-5,
                                           act='quick_gelu', stats=vit.CLIP_STATS),
    'vit_tiny_siglip': vit.ViTSpec(patch=16, dim=64, depth=2, heads=4, grid=(2, 2),
                                   class_token=False, act='gelu_tanh'),
}


@pytest.fixture(scope='module', autouse=True)
def tiny_backbones():
  for name, spec in TINY.items():
    register(vit.entry(name, spec, pool='mean' if not spec.class_token else 'token'))
  yield
  for name in TINY:
    unregister(name)


def _pixels(seed, height, width, batch=2):
  """Random RGB in [0, 1], [B, H, W, 3] float64."""
  return np.random.default_rng(seed).uniform(size=(batch, height, width, 3))


def _ours(name, converted, pixels):
  """Our backbone with `converted` weights on `pixels` normalised as the ReID head does."""
  backbone = nnx.eval_shape(lambda: build_backbone(name, rngs=nnx.Rngs(0)))
  for key, var in variables(backbone).items():
    var.set_value(jnp.asarray(converted[key]))
  mean, std = vit.IMAGENET_STATS
  x = ((pixels - mean) / std).astype(np.float32)
  return np.asarray(backbone(jnp.asarray(x), train=False))


def _relative_error(ours, reference):
  assert ours.shape == reference.shape
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize('name,count', [('vit_t16', 5_717_416), ('vit_s16', 22_050_664),
                                        ('vit_b16', 86_567_656), ('vit_l16', 304_326_632)])
def test_published_parameter_counts(name, count):
  """timm's ViT-Ti/S/B/L/16 at 224 px with their 1000-class head on the class token."""
  backbone = nnx.eval_shape(lambda: build_backbone(name, rngs=nnx.Rngs(0)))
  dim = backbone.out_features
  assert sum(v.size for v in variables(backbone).values()) + dim * 1000 + 1000 == count


def test_registered_names_and_token_layout():
  names = ['vit_t16', 'vit_s16', 'vit_b16', 'vit_l16', 'vit_b16_s12', 'vit_s14_dinov2',
           'vit_b14_dinov2', 'vit_l14_dinov2', 'vit_s14_dinov2_reg4', 'vit_b14_dinov2_reg4',
           'vit_l14_dinov2_reg4', 'vit_b16_clip', 'vit_b16_clip_quickgelu', 'vit_l14_clip',
           'vit_l14_clip_quickgelu', 'vit_b16_siglip']
  assert all(get_backbone(n).family == 'vit' for n in names)
  assert vit.IMAGENET_STATS == (reid.IMAGENET_MEAN, reid.IMAGENET_STD)
  backbone = nnx.eval_shape(lambda: build_backbone('vit_b14_dinov2_reg4', rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(backbone)
  for size, grid in (((224, 224), 16 * 16), ((252, 126), 18 * 9)):
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=False), state,
                         jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
    assert out.shape == (2, 1 + 4 + grid, 768)
  # Overlapping patches (TransReID): 16 px every 12 px, (256 - 16) / 12 + 1 = 21 per side.
  backbone = nnx.eval_shape(lambda: build_backbone('vit_b16_s12', rngs=nnx.Rngs(0)))
  assert backbone.grid_for(256, 256) == (21, 21)
  with pytest.raises(ValueError, match='each side must be 16 \\+ a multiple of the patch '
                                       'stride 12'):
    backbone.grid_for(256, 128)
  with pytest.raises(ValueError, match='image size 100x96 does not fit the ViT patches: each '
                                       'side must be a multiple of the patch size 16'):
    nnx.eval_shape(lambda: build_backbone('vit_b16', rngs=nnx.Rngs(0))).grid_for(100, 96)


def test_config_check_refuses_image_sizes_the_patches_do_not_tile():
  from fashion_jax import configlib
  config = configlib.base_config()
  config.dataset.name, config.model.backbone = 'fashion_synth/demo', 'vit_b14_dinov2'
  with pytest.raises(ValueError, match='input.image_size: image size 320x320 does not fit the '
                                       'ViT patches: each side must be a multiple of the patch '
                                       'size 14 for vit_b14_dinov2'):
    configlib.validate_config(config, num_devices=1)
  config.input.image_size = (224, 336)
  configlib.validate_config(config, num_devices=1)


def test_width_scales_the_channels():
  assert build_backbone('vit_t16', width=32, rngs=nnx.Rngs(0)).out_features == 96
  with pytest.raises(ValueError, match='model.width 2 gives 2 channels, not a multiple of the '
                                       '4 heads'):
    build_backbone('vit_tiny_timm', width=2, rngs=nnx.Rngs(0))


def test_pools_read_the_class_token_or_the_patches():
  tokens = jnp.arange(2 * 7 * 3, dtype=jnp.float32).reshape(2, 7, 3)
  np.testing.assert_array_equal(get_backbone('vit_b16').pool(tokens), tokens[:, 0])
  np.testing.assert_array_equal(get_backbone('vit_b16_siglip').pool(tokens), tokens.mean(1))
  np.testing.assert_allclose(vit.mean_patch_pool(tokens, num_prefix=5), tokens[:, 5:].mean(1))


def test_stochastic_depth_and_bfloat16():
  """Block i of N drops its branches with rate * i / (N - 1), driven by the training key only;
  bfloat16 computes in bfloat16 from float32 parameters, close to float32."""
  backbone = build_backbone('vit_tiny_timm', drop_path_rate=0.5, rngs=nnx.Rngs(0))
  assert [b.drop_rate for b in backbone.blocks] == [0.0, 0.5]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
  with pytest.raises(ValueError, match='stochastic depth \\(rate 0.5\\) needs a random key'):
    backbone(x, train=True)
  run = lambda key: np.asarray(backbone(x, train=True, key=jax.random.key(key)))
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))
  np.testing.assert_array_equal(backbone(x, train=False, key=jax.random.key(1)),
                                backbone(x, train=False))
  half = build_backbone('vit_tiny_timm', dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert all(v.dtype == jnp.float32 for v in variables(half).values())
  out, reference = half(x, train=False), build_backbone('vit_tiny_timm', rngs=nnx.Rngs(0))(
      x, train=False)
  assert out.dtype == jnp.bfloat16
  assert _relative_error(np.asarray(out, np.float32), np.asarray(reference)) < 0.05


# ---- References in PyTorch ------------------------------------------------------------------

try:
  import timm
  import torch
except ImportError:
  timm = torch = None
needs_reference = pytest.mark.skipif(
    timm is None, reason='the reference models need torch and timm: pip install '
                         '"fashion_jax[reference]"')


def _randomise(model, seed):
  """Every parameter random, so no layer is an identity: norms' scales near 1, LayerScale O(1)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('.gamma') or ('norm' in name or 'ln_' in name) and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model.eval()


def _numpy(state_dict):
  return {k: v.detach().numpy() for k, v in state_dict.items()}


def _nchw(pixels, stats):
  mean, std = stats
  return torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))


@needs_reference
@pytest.mark.parametrize('old,new', [(2, 3), (14, 16), (37, 16), (7, 3), (5, 5)])
def test_resampling_is_torchs_antialiased_bicubic(old, new):
  grid = np.random.default_rng(old).normal(size=(1, 3, old, old + 1)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(new, new + 2),
                                             mode='bicubic', antialias=True,
                                             align_corners=False).numpy()
  pos = np.concatenate([np.ones((1, 1, 3), np.float32),
                        grid[0].transpose(1, 2, 0).reshape(1, -1, 3)], axis=1)
  resampled = vit.resample_pos_embed(pos, (old, old + 1), (new, new + 2), prefix=1)
  np.testing.assert_array_equal(resampled[:, 0], 1.0)
  np.testing.assert_allclose(resampled[0, 1:].reshape(new, new + 2, 3),
                             expected[0].transpose(1, 2, 0), atol=1e-5)
  np.testing.assert_allclose(jax.jit(vit.resample_pos_embed, static_argnums=(1, 2, 3))(
      jnp.asarray(pos), (old, old + 1), (new, new + 2), 1), resampled, atol=1e-5)


def _timm_vit(img_size, patch=16, **kwargs):
  from timm.models.vision_transformer import VisionTransformer
  return VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=64, depth=2,
                           num_heads=4, num_classes=10, dynamic_img_size=True, **kwargs)


def _timm_tokens(model, pixels, stats):
  with torch.no_grad():
    return model.forward_features(_nchw(pixels, stats)).numpy()


ERRORS = {}  # name -> max relative error, printed at the end of the module (pytest -s)


@pytest.fixture(scope='module', autouse=True)
def _report_errors():
  yield
  for name, error in sorted(ERRORS.items()):
    print(f'{name}: max relative error {error:.2e}')


def _check(case, ours, reference):
  error = _relative_error(ours, reference)
  ERRORS[case] = error
  assert np.abs(reference).mean() > 0.1  # a meaningful comparison
  assert error < 1e-4, (case, error)


@needs_reference
@pytest.mark.parametrize('size', [(32, 32), (48, 32)])
def test_timm_vit_matches(size, tmp_path):
  """timm's VisionTransformer state_dict, through a .safetensors file and the command line; at
  48x32 both resample the 2x2 position grid to 3x2 in the forward pass."""
  reference = _randomise(_timm_vit(32), seed=0)
  path = str(tmp_path / 'model.safetensors')
  _save_safetensors(_numpy(reference.state_dict()), path)
  assert convert_weights.main(['--arch', 'vit_tiny_timm', '--src', path,
                               '--out', str(tmp_path / 'out')]) == 0
  arch, converted = read_backbone_weights(str(tmp_path / 'out'))
  assert arch == 'vit_tiny_timm'
  pixels = _pixels(1, *size)
  _check(f'timm {size[0]}x{size[1]}', _ours('vit_tiny_timm', converted, pixels),
         _timm_tokens(reference, pixels, vit.INCEPTION_STATS))


@needs_reference
def test_timm_vit_resampled_at_conversion():
  """A checkpoint on another grid (64 px: 4x4) is resampled to the entry's 2x2 grid as timm's
  checkpoint filter resamples it for a 32 px model."""
  from timm.models.vision_transformer import checkpoint_filter_fn
  source = _randomise(_timm_vit(64), seed=1)
  reference = _timm_vit(32).eval()
  reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference))
  converted, dropped = convert_weights.convert_state_dict('vit_tiny_timm',
                                                          _numpy(source.state_dict()))
  assert dropped == ['head.bias', 'head.weight']
  pixels = _pixels(2, 32, 32)
  _check('timm resampled at conversion', _ours('vit_tiny_timm', converted, pixels),
         _timm_tokens(reference, pixels, vit.INCEPTION_STATS))


@needs_reference
@pytest.mark.parametrize('registers', [0, 4])
@pytest.mark.parametrize('layout', ['timm', 'dinov2'])
def test_dinov2_matches(registers, layout, tmp_path):
  """timm's DINOv2 architecture (LayerScale; registers without positions) from its own
  state_dict and from the facebookresearch layout (`mask_token`, `register_tokens`, the class
  token's position in `pos_embed`), the latter through a .pth file."""
  kwargs = dict(reg_tokens=4, no_embed_class=True) if registers else {}
  reference = _randomise(_timm_vit(28, patch=14, init_values=1e-5, **kwargs), seed=registers)
  tensors = _numpy(reference.state_dict())
  name = 'vit_tiny_dinov2_reg4' if registers else 'vit_tiny_dinov2'
  if layout == 'dinov2':
    tensors = _to_dinov2_layout(tensors)
    path = str(tmp_path / 'dinov2.pth')
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
    tensors = convert_weights.read_checkpoint(path)
  converted, dropped = convert_weights.convert_state_dict(name, tensors)
  assert dropped == (['mask_token'] if layout == 'dinov2' else ['head.bias', 'head.weight'])
  for size in ((28, 28), (42, 28)):
    pixels = _pixels(3, *size)
    _check(f'dinov2 {layout} layout, {registers} registers, {size[0]}x{size[1]}',
           _ours(name, converted, pixels),
           _timm_tokens(reference, pixels, vit.IMAGENET_STATS))


def _to_dinov2_layout(tensors):
  """timm's DINOv2 state_dict -> facebookresearch's (timm's `_convert_dinov2` inverted)."""
  out = {k: v for k, v in tensors.items() if not k.startswith('head.')}
  out['mask_token'] = np.zeros((1, 64), np.float32)
  if 'reg_token' in out:
    class_pos = np.random.default_rng(5).normal(size=(1, 1, 64)).astype(np.float32)
    out['register_tokens'] = out.pop('reg_token')
    out['cls_token'] = out['cls_token'] - class_pos
    out['pos_embed'] = np.concatenate([class_pos, out['pos_embed']], axis=1)
  return out


@needs_reference
def test_open_clip_tower_matches(tmp_path):
  """A whole open_clip CLIP model (QuickGELU, as OpenAI's): the `visual.` tower converts, the
  text tower and the image projection are dropped; images re-normalised to CLIP's statistics."""
  open_clip = pytest.importorskip('open_clip')
  model = open_clip.model.CLIP(
      embed_dim=32, quick_gelu=True,
      vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=2, head_width=16),
      text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1))
  _randomise(model, seed=3)
  path = str(tmp_path / 'open_clip.safetensors')
  _save_safetensors(_numpy(model.state_dict()), path)
  converted, dropped = convert_weights.convert_state_dict(
      'vit_tiny_clip_quickgelu', convert_weights.read_checkpoint(path))
  assert 'visual.proj' in dropped and 'token_embedding.weight' in dropped
  assert not [k for k in dropped if k.startswith('visual.') and k != 'visual.proj']
  pixels = _pixels(4, 32, 32)
  visual = model.visual
  with torch.no_grad():
    expected = visual.ln_post(visual.transformer(visual._embeds(
        _nchw(pixels, vit.CLIP_STATS)))).numpy()
  _check('open_clip', _ours('vit_tiny_clip_quickgelu', converted, pixels), expected)


def _save_safetensors(tensors, path):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


# ---- big_vision, against a NumPy forward written from its definition ----------------------


def _big_vision_checkpoint(seed, *, scanned, class_token, heads=4, dim=64, depth=2, patch=16):
  """Random arrays named as big_vision (scanned: one stacked `encoderblock`, patches-only
  positions, SigLIP's image tower under `params/img/`) or as vision_transformer (augreg:
  `encoderblock_N`, layers numbered 1, 3, 2, a class-token row in the positions)."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: (0.2 * rng.normal(size=shape)).astype(np.float32)
  hd, stack = dim // heads, (depth,) if scanned else ()
  block = {'LayerNorm_0/scale': 1 + r(*stack, dim), 'LayerNorm_0/bias': r(*stack, dim)}
  mha, mlp, ln2 = ('MultiHeadDotProductAttention_0', 'MlpBlock_0', 'LayerNorm_1') if scanned \
      else ('MultiHeadDotProductAttention_1', 'MlpBlock_3', 'LayerNorm_2')
  for n in ('query', 'key', 'value'):
    block[f'{mha}/{n}/kernel'] = r(*stack, dim, heads, hd)
    block[f'{mha}/{n}/bias'] = r(*stack, heads, hd)
  block[f'{mha}/out/kernel'] = r(*stack, heads, hd, dim)
  block[f'{mha}/out/bias'] = r(*stack, dim)
  block[f'{ln2}/scale'], block[f'{ln2}/bias'] = 1 + r(*stack, dim), r(*stack, dim)
  block[f'{mlp}/Dense_0/kernel'], block[f'{mlp}/Dense_0/bias'] = r(*stack, dim, 4 * dim), r(
      *stack, 4 * dim)
  block[f'{mlp}/Dense_1/kernel'], block[f'{mlp}/Dense_1/bias'] = r(*stack, 4 * dim, dim), r(
      *stack, dim)
  prefix = 'params/img/' if scanned else ''
  w = {'embedding/kernel': r(patch, patch, 3, dim), 'embedding/bias': r(dim),
       'Transformer/encoder_norm/scale': 1 + r(dim), 'Transformer/encoder_norm/bias': r(dim),
       'head/kernel': r(dim, 10), 'head/bias': r(10)}
  if scanned:
    w.update({f'Transformer/encoderblock/{k}': v for k, v in block.items()})
    w['pos_embedding'] = r(1, 4, dim)
    w['MAPHead_0/probe'] = r(1, 1, dim)
  else:
    for i in range(depth):
      w.update({f'Transformer/encoderblock_{i}/{k}': v + 0.1 * i for k, v in block.items()})
    w['Transformer/posembed_input/pos_embedding'] = r(1, 1 + 4, dim)
  if class_token:
    w['cls'] = r(1, 1, dim)
  w = {prefix + k: v for k, v in w.items()}
  if scanned:
    w['params/txt/Embed_0/embedding'] = r(50, dim)  # the text tower: dropped
  return w, prefix


def _layer_norm(x, w, name, eps=1e-6):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w[f'{name}/scale'] + w[f'{name}/bias']


def _big_vision_forward(w, prefix, x, *, scanned, act, patch=16, depth=2):
  """x [B, H, W, 3] -> tokens, float64, as big_vision's / vision_transformer's ViT computes."""
  w = {k.removeprefix(prefix): np.asarray(v, np.float64) for k, v in w.items()}
  b, h, wd, _ = x.shape
  patches = x.reshape(b, h // patch, patch, wd // patch, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  tokens = patches.reshape(b, -1, patch * patch * 3) @ w['embedding/kernel'].reshape(
      -1, w['embedding/bias'].shape[0]) + w['embedding/bias']
  if scanned:  # big_vision: positions, then the class token
    tokens = tokens + w['pos_embedding']
    if 'cls' in w:
      tokens = np.concatenate([np.broadcast_to(w['cls'], (b, 1, tokens.shape[-1])), tokens], 1)
  else:
    tokens = np.concatenate([np.broadcast_to(w['cls'], (b, 1, tokens.shape[-1])), tokens], 1)
    tokens = tokens + w['Transformer/posembed_input/pos_embedding']
  mha, mlp, ln2 = ('MultiHeadDotProductAttention_0', 'MlpBlock_0', 'LayerNorm_1') if scanned \
      else ('MultiHeadDotProductAttention_1', 'MlpBlock_3', 'LayerNorm_2')
  for i in range(depth):
    if scanned:
      p = {k.removeprefix('Transformer/encoderblock/'): v[i] for k, v in w.items()
           if k.startswith('Transformer/encoderblock/')}
    else:
      p = {k.removeprefix(f'Transformer/encoderblock_{i}/'): v for k, v in w.items()
           if k.startswith(f'Transformer/encoderblock_{i}/')}
    y = _layer_norm(tokens, p, 'LayerNorm_0')
    q, k, v = (np.einsum('btd,dhk->bhtk', y, p[f'{mha}/{n}/kernel']) +
               p[f'{mha}/{n}/bias'][None, :, None] for n in ('query', 'key', 'value'))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    tokens = tokens + np.einsum('bhtk,hkd->btd', probs @ v, p[f'{mha}/out/kernel']) + p[
        f'{mha}/out/bias']
    y = _layer_norm(tokens, p, ln2)
    y = act(y @ p[f'{mlp}/Dense_0/kernel'] + p[f'{mlp}/Dense_0/bias'])
    tokens = tokens + y @ p[f'{mlp}/Dense_1/kernel'] + p[f'{mlp}/Dense_1/bias']
  return _layer_norm(tokens, w, 'Transformer/encoder_norm')


def _gelu(x, tanh):
  if tanh:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


@pytest.mark.parametrize('scanned', [True, False])
def test_big_vision_npz_matches_numpy_reference(scanned, tmp_path):
  """SigLIP's image tower (scanned, no class token, tanh GELU) and an augreg ViT
  (vision_transformer naming, class token, exact GELU as timm computes it), from .npz files."""
  name = 'vit_tiny_siglip' if scanned else 'vit_tiny_timm'
  w, prefix = _big_vision_checkpoint(6, scanned=scanned, class_token=not scanned)
  path = str(tmp_path / 'big_vision.npz')
  np.savez(path, **w)
  converted, dropped = convert_weights.convert_state_dict(name,
                                                          convert_weights.read_checkpoint(path))
  heads = ['head/bias', 'head/kernel'] + (['MAPHead_0/probe'] if scanned else [])
  assert dropped == sorted([prefix + k for k in heads] +
                           (['params/txt/Embed_0/embedding'] if scanned else []))
  pixels = _pixels(7, 32, 32)
  mean, std = vit.INCEPTION_STATS
  expected = _big_vision_forward(w, prefix, (pixels - mean) / std, scanned=scanned,
                                 act=functools.partial(_gelu, tanh=scanned))
  _check(f'big_vision {"scanned (SigLIP)" if scanned else "encoderblock_N (augreg)"}',
         _ours(name, converted, pixels), expected)


@needs_reference
def test_mismatched_or_damaged_checkpoints_are_one_line_errors(tmp_path):
  """A checkpoint of another layout names the tensors that do not fit (a CLIP tower for a
  timm ViT: its ln_pre, its conv without a bias); .npz files must hold float arrays."""
  model = _randomise(_timm_vit(32, pre_norm=True, norm_layer=functools.partial(
      torch.nn.LayerNorm, eps=1e-5)), seed=8)
  with pytest.raises(convert_weights.ConversionError,
                     match='does not match vit_tiny_timm: unknown tensors: norm_pre.bias, '
                           'norm_pre.weight'):
    convert_weights.convert_state_dict('vit_tiny_timm', _numpy(model.state_dict()))
  w, _ = _big_vision_checkpoint(9, scanned=False, class_token=True)
  del w['Transformer/encoderblock_1/LayerNorm_2/scale']
  with pytest.raises(convert_weights.ConversionError,
                     match='missing tensors: blocks.1.norm2.weight'):
    convert_weights.convert_state_dict('vit_tiny_timm', w)
  path = str(tmp_path / 'ints.npz')
  np.savez(path, step=np.arange(3))
  assert convert_weights.main(['--arch', 'vit_tiny_timm', '--src', path,
                               '--out', str(tmp_path)]) == 2
  with pytest.raises(convert_weights.ConversionError, match="'step' holds int64"):
    convert_weights.read_checkpoint(path)
  (tmp_path / 'bad.npz').write_bytes(b'not an archive')
  with pytest.raises(convert_weights.ConversionError, match='damaged or not an .npz archive'):
    convert_weights.read_checkpoint(str(tmp_path / 'bad.npz'))


# ---- Full-size checkpoints: every name and shape maps (meta tensors, no memory) -------------


def _open_clip_model(name):
  open_clip = pytest.importorskip('open_clip')
  return open_clip.model.CLIP(**open_clip.get_model_config(name))


def _meta_state_dict(build):
  with torch.device('meta'):
    model = build()
  return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}


@needs_reference
@pytest.mark.parametrize('name,build,head', [
    ('vit_b16', lambda: timm.create_model('vit_base_patch16_224', pretrained=False),
     ['head.bias', 'head.weight']),
    ('vit_s14_dinov2_reg4', lambda: timm.create_model('vit_small_patch14_reg4_dinov2',
                                                      pretrained=False), []),
    ('vit_l14_clip_quickgelu', lambda: _open_clip_model('ViT-L-14-quickgelu'), ['visual.proj']),
])
def test_full_size_checkpoints_convert(name, build, head):
  """The published architectures' state_dicts (timm's names; open_clip's whole model) map
  name for name and shape for shape onto the registered backbones."""
  converted, dropped = convert_weights.convert_state_dict(name, _meta_state_dict(build))
  backbone = nnx.eval_shape(lambda: build_backbone(name, rngs=nnx.Rngs(0)))
  assert set(converted) == set(variables(backbone))
  assert [k for k in dropped if k.startswith(('head.', 'visual.'))] == head


# ---- Training ------------------------------------------------------------------------------


def test_tiny_vit_trains_through_the_data_parallel_step(tiny_builder):
  """Two steps of the project's training step (4 simulated devices, fashion_synth/tiny at 32x32)
  with stochastic depth, AdamW, layer-wise decay and the cosine schedule: finite losses, and
  every backbone parameter moved."""
  import tiny_config
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from data_pipelines import input_pipeline
  from fashion_jax import optim
  from fashion_jax import train_step as ts
  from fashion_jax.models import build_model

  config = tiny_config.get_config()
  config.model.backbone, config.model.width = 'vit_tiny_timm', 64
  config.model.drop_path_rate = 0.1
  config.optim.optimizer, config.optim.schedule, config.optim.layer_decay = 'adamw', 'cosine', 0.75
  item_ids = input_pipeline.train_item_ids(tiny_builder)
  ds = input_pipeline.create_train_dataset(tiny_builder, config, item_ids=item_ids)
  batches = list(ds.take(2).as_numpy_iterator())
  model = build_model(config.model, len(item_ids), seed=0)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=2)
  graphdef, state = ts.create_train_state(model, tx, len(item_ids), loss_config=config.loss)
  before = jax.device_get(state['params'])
  mesh = ts.make_mesh()
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  state = ts.replicate(state, mesh)
  step = ts.make_train_step(graphdef, tx, mesh, config.loss, schedule)
  for batch in batches:
    state, metrics = step(state, *jax.device_put((batch['images'], batch['labels']), sharding))
    assert np.isfinite(float(metrics['loss']))
  assert int(state['nonfinite_step']) == -1
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       state['params']['backbone'], before['backbone'])
  assert min(jax.tree.leaves(moved)) > 0.0


EPOCHS = 200  # of 2 steps: 400 steps, ~50 s on 2 cores


def test_demo_recipe_doubles_the_untrained_map_on_tiny(tiny_data_dir, tmp_path):
  """configs/demo_vit.py's model and recipe, sized for fashion_synth/tiny (its 32-px crops at
  64x64, a quarter of ViT-Ti's width, a larger step for 400 steps): training at least doubles
  the untrained model's mAP (0.30 -> 0.70 when written)."""
  import importlib.util
  import json
  import os

  from fashion_jax import train
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'demo_vit.py')
  spec = importlib.util.spec_from_file_location('demo_vit', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.dataset.name, config.dataset.data_dir = 'fashion_synth/tiny', tiny_data_dir
  config.input.pad, config.input.shuffle_buffer = 2, 32
  config.model.width = 16
  config.train.batch_size, config.train.k = 16, 2
  config.train.num_epochs = config.optim.cosine_epochs = config.train.eval_every_epochs = EPOCHS
  config.train.checkpoint_every_steps = 2 * EPOCHS
  config.optim.warmup_epochs, config.optim.base_lr = 1, 3e-3
  config.eval.batch_size = 16
  train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / 'eval' / 'history.jsonl') as f:
    maps = [json.loads(line)['mAP'] for line in f]
  assert maps[-1] >= 2 * maps[0], maps


def test_model_pool_chooses_the_token_or_the_mean_and_refuses_what_a_backbone_lacks():
  from fashion_jax import configlib
  from fashion_jax.models import reid as reid_module
  assert reid_module.pooling('vit_t16') is reid_module.pooling('vit_t16', 'token')
  tokens = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  np.testing.assert_allclose(reid_module.pooling('vit_t16', 'mean')(tokens),
                             tokens[:, 1:].mean(axis=1))
  config = configlib.base_config()
  config.dataset.name = 'fashion_synth/tiny'
  config.model.backbone, config.model.pool = 'resnet50', 'mean'
  with pytest.raises(ValueError, match="model.pool 'mean' is not offered by resnet50"):
    configlib.validate_config(config, num_devices=1)
  config.model.backbone, config.model.pool = 'vit_b16_siglip', 'token'
  with pytest.raises(ValueError, match=r"not offered by vit_b16_siglip \(it offers: mean\)"):
    configlib.validate_config(config, num_devices=1)


def test_attention_option_chooses_the_kernel_and_keeps_the_function():
  """model.attention 'cudnn' asks for cuDNN's flash attention only on GPUs in bfloat16/float16;
  here (CPU) both settings run XLA's and give the same features."""
  assert vit.attention_implementation('xla', jnp.bfloat16) == 'xla'
  expected = 'cudnn' if jax.default_backend() == 'gpu' else 'xla'
  assert vit.attention_implementation('cudnn', jnp.bfloat16) == expected
  assert vit.attention_implementation('cudnn', jnp.float32) == 'xla'
  pixels = jnp.asarray(_pixels(3, 32, 32), jnp.float32)
  features = {}
  for attention in vit.ATTENTION:
    backbone = build_backbone('vit_t16', width=16, attention=attention, rngs=nnx.Rngs(0))
    features[attention] = np.asarray(backbone(pixels, train=False))
  if jax.default_backend() != 'gpu':
    np.testing.assert_array_equal(features['cudnn'], features['xla'])


def test_attention_over_padded_tokens_is_attention_over_the_tokens():
  """The tokens padded for cuDNN (197 -> 208 at ViT-B/16 224x224) are masked as keys and dropped
  as queries: the same outputs and gradients as unpadded attention (XLA's kernel on both sides,
  which is what runs here)."""
  q, k, v = (jax.random.normal(key, (2, 197, 3, 8)) for key in jax.random.split(
      jax.random.key(0), 3))
  loss = lambda q, k, v, multiple: jnp.sum(jnp.sin(vit.attend(q, k, v, 'xla', multiple)))
  assert vit.attend(q, k, v, 'xla', vit.CUDNN_TOKEN_MULTIPLE).shape == q.shape
  np.testing.assert_allclose(vit.attend(q, k, v, 'xla', vit.CUDNN_TOKEN_MULTIPLE),
                             vit.attend(q, k, v, 'xla'), rtol=1e-5, atol=1e-6)
  padded = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, vit.CUDNN_TOKEN_MULTIPLE)
  plain = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 1)
  for got, expected in zip(padded, plain):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_attention_option_is_checked():
  from fashion_jax import configlib
  from fashion_jax.models.backbones import check_options
  c = configlib.base_config()
  c.model.attention = 'flash'
  with pytest.raises(ValueError, match="model.attention"):
    configlib.check_fields(c)
  with pytest.raises(ValueError, match='model.attention applies only to the backbones'):
    check_options('resnet50_ibn_a', attention='cudnn')
  check_options('vit_b16', attention='cudnn')
  with pytest.raises(ValueError, match="model.attention 'flash' is not one of xla, cudnn"):
    build_backbone('vit_t16', width=16, attention='flash', rngs=nnx.Rngs(0))
