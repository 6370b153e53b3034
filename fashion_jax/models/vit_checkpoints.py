"""Published ViT checkpoints -> timm's state_dict (names and PyTorch layouts), which
`vit.torch_name` maps onto the Flax model; the same renamings as timm's own loaders.

Layouts, told apart by their keys: timm (as is), DINOv2 (`mask_token`, `register_tokens`),
OpenAI / open_clip CLIP (the image tower under `visual.`), big_vision and vision_transformer
`.npz` (`Transformer/encoderblock_N/...` or a scanned `Transformer/encoderblock/...`).
"""

import math
import re

import numpy as np

from fashion_jax.models.vit import ViTSpec, resample_pos_embed

# Classification, projection and pooling heads: the ReID head replaces them.
_TIMM_HEADS = ('head.', 'fc_norm.', 'attn_pool.')
_BIG_VISION_HEADS = ('head/', 'pre_logits/', 'MAPHead_0/')
# open_clip's names -> timm's, applied in order (timm's `_convert_openai_clip`).
_CLIP_SWAPS = (('conv1', 'patch_embed.proj'), ('positional_embedding', 'pos_embed'),
               ('class_embedding', 'cls_token'), ('transformer.resblocks.', 'blocks.'),
               ('ln_pre', 'norm_pre'), ('ln_post', 'norm'), ('ln_', 'norm'),
               ('in_proj_', 'qkv.'), ('out_proj', 'proj'), ('mlp.c_fc', 'mlp.fc1'),
               ('mlp.c_proj', 'mlp.fc2'))
_BIG_VISION_PREFIXES = ('opt/target/', 'params/img/', 'params/', '')


def layout_of(tensors) -> str:
  """'big_vision', 'clip', 'dinov2' or 'timm'."""
  if any(k.endswith('embedding/kernel') for k in tensors):
    return 'big_vision'
  if 'visual.class_embedding' in tensors or 'class_embedding' in tensors:
    return 'clip'
  if 'mask_token' in tensors or 'register_tokens' in tensors:
    return 'dinov2'
  return 'timm'


def to_timm(tensors, spec: ViTSpec) -> tuple[dict[str, np.ndarray], list[str]]:
  """A checkpoint's arrays (any layout above) -> (timm-named arrays fitted to `spec`, dropped
  keys). Keys it does not recognise pass through under their own names, so the converter
  reports them as unknown."""
  layout = layout_of(tensors)
  if layout == 'big_vision':
    out, dropped = _from_big_vision(tensors)
  elif layout == 'clip':
    out, dropped = _from_clip(tensors)
  else:
    # DINOv2 names are timm's but for its registers; its mask token only serves pretraining.
    dropped = sorted(k for k in tensors if k == 'mask_token' or k.startswith(_TIMM_HEADS))
    out = {('reg_token' if k == 'register_tokens' else k): v for k, v in tensors.items()
           if k not in dropped}
  return _fit_pos_embed(out, spec), dropped


def _from_clip(tensors):
  prefix = 'visual.' if 'visual.class_embedding' in tensors else ''
  out, dropped = {}, []
  for key, value in tensors.items():
    # The text tower, and `visual.proj` into the joint image-text space.
    if not key.startswith(prefix) or key == f'{prefix}proj':
      dropped.append(key)
      continue
    name = key.removeprefix(prefix)
    for old, new in _CLIP_SWAPS:
      name = name.replace(old, new)
    if name == 'cls_token':
      value = value.reshape(1, 1, -1)
    elif name == 'pos_embed':
      value = value[None]
    out[name] = value
  return out, sorted(dropped)


def _from_big_vision(w):
  """Flax layouts -> PyTorch's: kernels [in, out] -> weights [out, in], HWIO -> OIHW, and the
  per-head query/key/value [D, heads, D/heads] fused into qkv [3D, D] (timm's `_load_weights`)."""
  prefix = next(p for p in _BIG_VISION_PREFIXES if f'{p}embedding/kernel' in w)
  scanned = f'{prefix}Transformer/encoderblock/LayerNorm_0/scale' in w
  # big_vision numbers a block's layers 0, 0, 1; the original vision_transformer 1, 3, 2.
  big_vision = prefix.startswith('params/') or f'{prefix}pos_embedding' in w or scanned
  mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
  used, out = set(), {}

  def put(name, sources, combine=lambda x: x, index=None):
    """out[name] = combine(*arrays) when every source is present; else the converter reports
    `name` missing."""
    keys = [prefix + source for source in sources]
    if all(k in w for k in keys):
      used.update(keys)
      out[name] = combine(*(np.asarray(w[k]) if index is None else np.asarray(w[k])[index]
                            for k in keys))

  put('patch_embed.proj.weight', ['embedding/kernel'], lambda k: k.transpose(3, 2, 0, 1))
  put('patch_embed.proj.bias', ['embedding/bias'])
  put('cls_token', ['cls'])
  put('pos_embed', ['pos_embedding' if f'{prefix}pos_embedding' in w else
                    'Transformer/posembed_input/pos_embedding'])
  put('norm.weight', ['Transformer/encoder_norm/scale'])
  put('norm.bias', ['Transformer/encoder_norm/bias'])
  if scanned:
    blocks = [('Transformer/encoderblock/', i) for i in
              range(w[f'{prefix}Transformer/encoderblock/LayerNorm_0/scale'].shape[0])]
  else:
    numbers = sorted({int(m.group(1)) for k in w if (m := re.match(
        re.escape(prefix) + r'Transformer/encoderblock_(\d+)/', k))})
    blocks = [(f'Transformer/encoderblock_{i}/', None) for i in numbers]
  attn, qkv = f'MultiHeadDotProductAttention_{mha}/', ('query', 'key', 'value')
  for i, (block, index) in enumerate(blocks):

    def bput(name, sources, combine=lambda x: x, i=i, block=block, index=index):
      put(f'blocks.{i}.{name}', [block + source for source in sources], combine, index)

    for norm, ln in (('norm1', 0), ('norm2', ln2)):
      bput(f'{norm}.weight', [f'LayerNorm_{ln}/scale'])
      bput(f'{norm}.bias', [f'LayerNorm_{ln}/bias'])
    bput('attn.qkv.weight', [f'{attn}{n}/kernel' for n in qkv],
         lambda *ks: np.concatenate([k.reshape(k.shape[0], -1).T for k in ks]))
    bput('attn.qkv.bias', [f'{attn}{n}/bias' for n in qkv],
         lambda *bs: np.concatenate([b.reshape(-1) for b in bs]))
    bput('attn.proj.weight', [f'{attn}out/kernel'], lambda k: k.reshape(-1, k.shape[-1]).T)
    bput('attn.proj.bias', [f'{attn}out/bias'])
    for r in range(2):
      bput(f'mlp.fc{r + 1}.weight', [f'MlpBlock_{mlp}/Dense_{r}/kernel'], lambda k: k.T)
      bput(f'mlp.fc{r + 1}.bias', [f'MlpBlock_{mlp}/Dense_{r}/bias'])
  rest = [k for k in w if k not in used]
  dropped = sorted(k for k in rest if not k.startswith(prefix) or
                   k.removeprefix(prefix).startswith(_BIG_VISION_HEADS))
  out.update({k: w[k] for k in rest if k not in dropped})  # unknown to the converter
  return out, dropped


def _square_side(n: int) -> int | None:
  side = math.isqrt(n)
  return side if side * side == n else None


def _fit_pos_embed(tensors, spec: ViTSpec):
  """The position embedding on `spec.grid`, with a class-token row exactly when `spec` has one:
  a checkpoint's class row without one in `spec` is added to the class token (DINOv2's
  registers), one missing becomes zeros (big_vision adds positions before the class token), and
  another grid (a square one: 384 px, 518 px) is resampled as timm does at load."""
  pos = tensors.get('pos_embed')
  if pos is None or pos.ndim != 3:
    return tensors
  side = _square_side(pos.shape[1])
  prefix = 0 if side else 1
  side = side or _square_side(pos.shape[1] - 1)
  if side is None:
    return tensors
  tensors = dict(tensors)
  if prefix and not spec.pos_prefix and 'cls_token' in tensors:
    tensors['cls_token'] = tensors['cls_token'] + pos[:, :1]
    pos, prefix = pos[:, 1:], 0
  elif not prefix and spec.pos_prefix:
    pos, prefix = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1), 1
  tensors['pos_embed'] = np.asarray(
      resample_pos_embed(np.asarray(pos, np.float32), (side, side), spec.grid, prefix))
  return tensors
