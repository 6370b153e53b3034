"""Vision Transformers (Dosovitskiy et al. 2021) as ReID backbones, NHWC: one implementation for
the timm / augreg, DINOv2, CLIP and SigLIP image towers, told apart by a `ViTSpec`.

Module names mirror timm's `VisionTransformer` (`patch_embed.proj`, `blocks.N.attn.qkv`,
`blocks.N.ls1`, `norm_pre`, `norm`), so timm state_dicts map one to one (`torch_name`); the other
checkpoint layouts are renamed to timm's first (`vit_checkpoints.py`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fashion_jax.models.base import Backbone
from fashion_jax.models.efficientnet import drop_path
from fashion_jax.models.resnet import TORCH_LEAF

# What the ReID head normalises images with (reid.IMAGENET_MEAN / IMAGENET_STD; importing them
# from there would be circular). Weights trained on other statistics re-normalise (`ViTSpec`).
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's augreg ViTs, SigLIP
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

# model.attention: how attention is computed (attention_implementation). The weights and the
# function are the same; only the kernels and their rounding differ.
ATTENTION = ('xla', 'cudnn')

ACTIVATIONS = {
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),  # big_vision's nn.gelu
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),           # OpenAI CLIP
}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """One ViT architecture and the conventions of the weights it is built for.

  grid: the position embedding's (rows, columns) of patches, the pretrained one; other input
    sizes resample it (`resample_pos_embed`). patch_stride: below `patch`, overlapping patches
    (TransReID); None: `patch`.
  class_token, reg_tokens: prefix tokens before the patches ([cls, registers, patches]).
  embed_class: the position embedding has a row for the class token (timm's
    `not no_embed_class`); registers never get one.
  layer_scale: DINOv2's learned per-channel scale on each residual branch.
  norm_pre: CLIP's LayerNorm before the blocks (`ln_pre`). patch_bias: CLIP's has none.
  act: a key of ACTIVATIONS. eps: of every LayerNorm.
  stats: (mean, std) of RGB in [0, 1] that the weights expect.
  """
  patch: int
  dim: int
  depth: int
  heads: int
  grid: tuple[int, int]
  patch_stride: int | None = None
  mlp_ratio: float = 4.0
  class_token: bool = True
  reg_tokens: int = 0
  embed_class: bool = True
  layer_scale: bool = False
  norm_pre: bool = False
  patch_bias: bool = True
  act: str = 'gelu'
  eps: float = 1e-6
  stats: tuple[tuple[float, ...], tuple[float, ...]] = INCEPTION_STATS

  @property
  def stride(self) -> int:
    return self.patch_stride or self.patch

  @property
  def num_prefix(self) -> int:
    """Tokens before the patches: the class token and the registers."""
    return int(self.class_token) + self.reg_tokens

  @property
  def pos_prefix(self) -> int:
    """Rows of the position embedding before the patch grid (the class token's, if any)."""
    return int(self.class_token and self.embed_class)


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic)."""
  a, x = -0.5, np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


@functools.cache
def resample_matrix(old: int, new: int) -> np.ndarray:
  """[new, old] float32 weights of torch's `F.interpolate(mode='bicubic', antialias=True,
  align_corners=False)` along one axis: what timm's `resample_abs_pos_embed` resizes with. The
  kernel widens by the downsampling factor; each row, cut at the borders, sums to 1."""
  scale = old / new
  support, inv = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
  weights = np.zeros((new, old))
  for i in range(new):
    center = scale * (i + 0.5)
    # int() truncates towards zero, as the C++ index computation does.
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), old)
    weights[i, lo:hi] = _cubic((np.arange(lo, hi) - center + 0.5) * inv)
    weights[i] /= weights[i].sum()
  return weights.astype(np.float32)


def resample_pos_embed(pos, old_grid: tuple[int, int], new_grid: tuple[int, int], prefix: int):
  """pos [1, prefix + h*w, D] on `old_grid` -> [1, prefix + h'*w', D] on `new_grid` (bicubic as
  timm; the prefix rows are kept). NumPy arrays give NumPy (conversion), JAX arrays JAX."""
  if tuple(old_grid) == tuple(new_grid):
    return pos
  xp = np if isinstance(pos, np.ndarray) else jnp
  rows, cols = (resample_matrix(o, n) for o, n in zip(old_grid, new_grid))
  grid = pos[0, prefix:].reshape(*old_grid, -1).astype(xp.float32)
  grid = xp.einsum('hH,wW,HWd->hwd', rows, cols, grid).reshape(1, -1, pos.shape[-1])
  return xp.concatenate([pos[:, :prefix].astype(xp.float32), grid], axis=1)


def patch_grid(spec: ViTSpec, height: int, width: int) -> tuple[int, int]:
  """The patch grid (h, w) of an input; ValueError if the patches do not tile it."""
  patch, stride = spec.patch, spec.stride
  if min(height, width) < patch or (height - patch) % stride or (width - patch) % stride:
    what = (f'a multiple of the patch size {patch}' if stride == patch else
            f'{patch} + a multiple of the patch stride {stride}')
    raise ValueError(f'image size {height}x{width} does not fit the ViT patches: each side '
                     f'must be {what}')
  return (height - patch) // stride + 1, (width - patch) // stride + 1


def _linear(in_dim, out_dim, *, dtype, rngs):
  # timm's init for every Linear: truncated normal, std 0.02; zero bias.
  return nnx.Linear(in_dim, out_dim, kernel_init=nnx.initializers.truncated_normal(0.02),
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def attention_implementation(attention: str, dtype) -> str:
  """What jax.nn.dot_product_attention runs for `attention` (model.attention, ATTENTION) in
  `dtype`: 'cudnn' asks for cuDNN's fused flash attention, which exists on NVIDIA GPUs for
  bfloat16 and float16; anywhere else, and for 'xla', XLA's implementation."""
  if (attention == 'cudnn' and jax.default_backend() == 'gpu'
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
    return 'cudnn'
  return 'xla'


# cuDNN's fused attention (JAX 0.11, H200) refuses 197 tokens and takes 208: its sequences are
# padded to a multiple of this, the padding masked as keys and dropped from the output.
CUDNN_TOKEN_MULTIPLE = 16


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
           multiple: int = 1) -> jax.Array:
  """jax.nn.dot_product_attention over q, k, v [B, T, H, Dh], the tokens padded to a multiple
  of `multiple` where they are not one: padded keys are masked (key_value_seq_lengths), padded
  queries dropped, so the function is attention over the T tokens."""
  t = q.shape[1]
  padded = -(-t // multiple) * multiple
  if padded == t:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
  out = jax.nn.dot_product_attention(
      pad(q), pad(k), pad(v), key_value_seq_lengths=jnp.full((q.shape[0],), t, jnp.int32),
      implementation=implementation)
  return out[:, :t]


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection: x [B, T, D] -> [B, T, D]."""

  def __init__(self, dim: int, heads: int, *, dtype, attention: str = 'xla', rngs: nnx.Rngs):
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.heads = heads
    self.attention = attention

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.unstack(self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads), axis=2)
    # Softmax in float32 whatever the dtype (both implementations).
    implementation = attention_implementation(self.attention, q.dtype)
    out = attend(q, k, v, implementation,
                 CUDNN_TOKEN_MULTIPLE if implementation == 'cudnn' else 1)
    return self.proj(out.reshape(b, t, d))


class LayerScale(nnx.Module):
  def __init__(self, dim: int, init: float = 1e-5):
    self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)
    self.act = act

  def __call__(self, x):
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); each
  branch dropped per sample with probability `drop_rate` in training (stochastic depth)."""

  def __init__(self, spec: ViTSpec, drop_rate: float, *, dtype, attention: str = 'xla',
               rngs: nnx.Rngs):
    norm = functools.partial(nnx.LayerNorm, spec.dim, epsilon=spec.eps, dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)
    self.norm1 = norm()
    self.attn = Attention(spec.dim, spec.heads, dtype=dtype, attention=attention, rngs=rngs)
    self.ls1 = LayerScale(spec.dim) if spec.layer_scale else None
    self.norm2 = norm()
    self.mlp = Mlp(spec.dim, int(spec.dim * spec.mlp_ratio), spec.act, dtype=dtype, rngs=rngs)
    self.ls2 = LayerScale(spec.dim) if spec.layer_scale else None
    self.drop_rate = drop_rate

  def __call__(self, x, *, train: bool, key: jax.Array | None):
    for index, (norm, branch, scale) in enumerate(((self.norm1, self.attn, self.ls1),
                                                   (self.norm2, self.mlp, self.ls2))):
      out = branch(norm(x))
      if scale is not None:
        out = scale(out)
      if train and self.drop_rate > 0:
        if key is None:
          raise ValueError(f'stochastic depth (rate {self.drop_rate:g}) needs a random key in '
                           'training: call the backbone with key=...')
        out = drop_path(out, self.drop_rate, jax.random.fold_in(key, index))
      x = x + out
    return x


class PatchEmbed(nnx.Module):
  def __init__(self, spec: ViTSpec, *, dtype, rngs: nnx.Rngs):
    self.proj = nnx.Conv(3, spec.dim, (spec.patch, spec.patch), strides=spec.stride,
                         padding='VALID', use_bias=spec.patch_bias, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


class VisionTransformer(nnx.Module):
  """images [B, H, W, 3] (ImageNet-normalised) -> tokens [B, P + R + N, D] after the final norm:
  P = 1 class token (0 without), R registers, N = h * w patches in row-major order.

  Any H, W that patches tile exactly ((H - patch) divisible by the patch stride; for
  non-overlapping patches, a multiple of the patch) works: the position embedding, stored on
  the pretrained grid, is resampled bicubically to (h, w) in the forward pass, as timm's
  `dynamic_img_size`. `drop_path_rate`: block i of N drops its branches with probability
  drop_path_rate * i / (N - 1) (timm's linear rule); training calls then need `key`. `width`
  scales the channels by width / 64 (64: the published size; the heads stay, each narrower),
  for CPU-sized runs. `attention` (ATTENTION): 'cudnn' runs cuDNN's flash attention where it
  exists (attention_implementation), 'xla' XLA's everywhere.
  """

  def __init__(self, spec: ViTSpec, *, width: int = 64, drop_path_rate: float = 0.0,
               attention: str = 'xla', dtype=jnp.float32, axis_name: str | None = None,
               rngs: nnx.Rngs):
    del axis_name  # no batch statistics
    if spec.dim * width % (64 * spec.heads):
      raise ValueError(f'model.width {width} gives {spec.dim * width / 64:g} channels, not a '
                       f'multiple of the {spec.heads} heads')
    spec = dataclasses.replace(spec, dim=spec.dim * width // 64)
    self.spec = spec
    self.dtype = dtype
    self.patch_embed = PatchEmbed(spec, dtype=dtype, rngs=rngs)
    tokens = lambda n, std: nnx.Param(std * jax.random.normal(rngs.params(), (1, n, spec.dim)))
    self.cls_token = tokens(1, 1e-6) if spec.class_token else None
    self.reg_token = tokens(spec.reg_tokens, 1e-6) if spec.reg_tokens else None
    self.pos_embed = nnx.Param(nnx.initializers.truncated_normal(0.02)(
        rngs.params(), (1, spec.pos_prefix + math.prod(spec.grid), spec.dim)))
    norm = functools.partial(nnx.LayerNorm, spec.dim, epsilon=spec.eps, dtype=dtype,
                             param_dtype=jnp.float32, rngs=rngs)
    self.norm_pre = norm() if spec.norm_pre else None
    rates = np.linspace(0.0, drop_path_rate, spec.depth)
    self.blocks = nnx.List([Block(spec, float(rate), dtype=dtype, attention=attention, rngs=rngs)
                            for rate in rates])
    self.norm = norm()
    self.out_features = spec.dim

  def grid_for(self, height: int, width: int) -> tuple[int, int]:
    return patch_grid(self.spec, height, width)

  def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> jax.Array:
    spec = self.spec
    grid = self.grid_for(x.shape[1], x.shape[2])
    (mean, std), (ref_mean, ref_std) = spec.stats, IMAGENET_STATS
    if (mean, std) != (ref_mean, ref_std):
      # The same pixels normalised as the weights were trained: (x * ref_std + ref_mean - mean)
      # / std, per channel.
      x = x * (np.asarray(ref_std) / np.asarray(std)) + (
          (np.asarray(ref_mean) - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
    x = self.patch_embed(x.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, spec.dim)
    pos = resample_pos_embed(self.pos_embed[...], spec.grid, grid, spec.pos_prefix)
    x = x + pos[:, spec.pos_prefix:].astype(self.dtype)
    prefix = []
    if self.cls_token is not None:
      cls = self.cls_token[...] + (pos[:, :1] if spec.pos_prefix else 0.0)
      prefix.append(jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, spec.dim)))
    if self.reg_token is not None:
      prefix.append(jnp.broadcast_to(self.reg_token[...].astype(self.dtype),
                                     (batch, spec.reg_tokens, spec.dim)))
    x = jnp.concatenate(prefix + [x], axis=1)
    if self.norm_pre is not None:
      x = self.norm_pre(x)
    for index, block in enumerate(self.blocks):
      x = block(x, train=train, key=None if key is None else jax.random.fold_in(key, index))
    return self.norm(x)


def class_token_pool(tokens: jax.Array) -> jax.Array:
  """tokens [B, 1 + R + N, D] -> the class token [B, D] float32."""
  return tokens[:, 0].astype(jnp.float32)


def mean_patch_pool(tokens: jax.Array, num_prefix: int = 0) -> jax.Array:
  """tokens [B, P + R + N, D] -> the mean of the N patch tokens [B, D] float32."""
  return jnp.mean(tokens[:, num_prefix:].astype(jnp.float32), axis=1)


def torch_name(path: str) -> str:
  """Flax variable path -> timm's state_dict key, e.g. 'blocks.0.attn.qkv.kernel' ->
  'blocks.0.attn.qkv.weight'; 'cls_token', 'pos_embed', 'blocks.3.ls1.gamma' keep theirs."""
  *modules, leaf = path.split('.')
  return '.'.join(modules + [TORCH_LEAF.get(leaf, leaf)])


def entry(name: str, spec: ViTSpec, pool: str = 'token') -> Backbone:
  """A registry entry for `spec`; `pool` 'token' embeds with the class token, 'mean' with the
  mean of the patch tokens."""
  pools = {'mean': functools.partial(mean_patch_pool, num_prefix=spec.num_prefix)}
  if spec.class_token:
    pools['token'] = class_token_pool
  return Backbone(name=name, family='vit', build=functools.partial(VisionTransformer, spec),
                  torch_name=torch_name, pool=pools[pool], pools=pools,
                  options=('width', 'drop_path_rate', 'attention'),
                  arch={'spec': spec, 'pool': pool})


# (dim, depth, heads) of the published sizes.
SIZES = {'t': (192, 12, 3), 's': (384, 12, 6), 'b': (768, 12, 12), 'l': (1024, 24, 16)}


def _spec(size: str, patch: int, grid: int, **kwargs) -> ViTSpec:
  dim, depth, heads = SIZES[size]
  return ViTSpec(patch=patch, dim=dim, depth=depth, heads=heads, grid=(grid, grid), **kwargs)


_DINOV2 = dict(layer_scale=True, stats=IMAGENET_STATS)  # 518 px pretraining: a 37 x 37 grid
_CLIP = dict(norm_pre=True, patch_bias=False, eps=1e-5, stats=CLIP_STATS)

BACKBONES = (
    # timm / augreg (ImageNet-21k), 224 px.
    *(entry(f'vit_{s}16', _spec(s, 16, 14)) for s in 'tsbl'),
    # TransReID's overlapping patches: 16 x 16 every 12 pixels.
    entry('vit_b16_s12', _spec('b', 16, 14, patch_stride=12)),
    *(entry(f'vit_{s}14_dinov2', _spec(s, 14, 37, **_DINOV2)) for s in 'sbl'),
    # With registers, timm's layout: neither the class token nor the registers have a position.
    *(entry(f'vit_{s}14_dinov2_reg4', _spec(s, 14, 37, reg_tokens=4, embed_class=False,
                                            **_DINOV2)) for s in 'sbl'),
    # open_clip's GELU towers (LAION, DataComp) and OpenAI's QuickGELU ones, 224 px.
    *(entry(f'vit_{s}_clip{suffix}', _spec(s[0], int(s[1:]), 224 // int(s[1:]), act=act, **_CLIP))
      for s in ('b16', 'l14') for suffix, act in (('', 'gelu'), ('_quickgelu', 'quick_gelu'))),
    # SigLIP's image tower (big_vision, 256 px): no class token, so the mean of the patches.
    entry('vit_b16_siglip', _spec('b', 16, 16, class_token=False, act='gelu_tanh'), pool='mean'),
)
