"""The training augmentation on the device: flip, zero-pad + random crop and random erasing of a
uint8 batch inside the jitted step, drawn from per-example keys of (seed, step, example).

The same distribution as the host pipeline's (data_pipelines/input_pipeline.py), drawn from
JAX's generator instead of TensorFlow's; the model normalises afterwards, as it does for
host-augmented images. No TensorFlow here.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# The ImageNet mean pixel in [0, 255]: random erasing fills with it, which becomes ~0 once
# the model normalises, as erasing after normalisation with the mean does.
MEAN_PIXEL = (124, 116, 104)
# Folded into the seed's key before the step, so augmentation keys never coincide with the
# step keys of train_step.step_key (whose first fold is a step number, below 2**31).
_STREAM = np.uint32(2**32 - 1)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The `input.*` settings the augmentation draws from (docs/method.md section 4)."""
  flip_prob: float = 0.5
  pad: int = 10
  erasing_prob: float = 0.5
  erasing_area: tuple[float, float] = (0.02, 0.4)
  erasing_aspect: float = 0.3  # aspect ratios in [a, 1 / a]
  attempts: int = 100  # rectangles tried for one that fits, as the reference

  @classmethod
  def from_config(cls, input_config) -> 'Augmentation':
    return cls(flip_prob=float(input_config.flip_prob), pad=int(input_config.pad),
               erasing_prob=float(input_config.erasing_prob),
               erasing_area=tuple(float(v) for v in input_config.erasing_area),
               erasing_aspect=float(input_config.erasing_aspect))


def example_keys(seed: int, step: jax.Array, examples: jax.Array) -> jax.Array:
  """[n] keys, one per example index of the global batch of `step`.

  A function of (seed, step, example) only, so a resumed run draws what the uninterrupted run
  drew, and the draws do not depend on how the batch is split over devices.
  """
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)
  return jax.vmap(lambda example: jax.random.fold_in(base, example))(examples)


def draw(key: jax.Array, image_size: tuple[int, int], aug: Augmentation) -> dict:
  """One example's random choices, as int32/bool scalars.

  `top`, `left`: the crop window's corner in the unpadded (flipped) image, in [-pad, pad];
  `erase_*`: the erased rectangle in the cropped image (`erase` False: none). The erasing
  follows Zhong et al. as the host does: area uniform in erasing_area of the image, aspect
  uniform in [a, 1 / a], sides rounded half to even, the first of `attempts` tries that fits.
  """
  height, width = image_size
  k_flip, k_crop, k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(key, 7)
  top, left = jax.random.randint(k_crop, (2,), 0, 2 * aug.pad + 1) - aug.pad
  target = jax.random.uniform(k_area, (aug.attempts,), minval=aug.erasing_area[0],
                              maxval=aug.erasing_area[1]) * (height * width)
  aspect = jax.random.uniform(k_aspect, (aug.attempts,), minval=aug.erasing_aspect,
                              maxval=1.0 / aug.erasing_aspect)
  h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits)
  h, w = h[first], w[first]
  return {
      'flip': jax.random.uniform(k_flip) < aug.flip_prob,
      'top': top,
      'left': left,
      'erase': (jax.random.uniform(k_apply) < aug.erasing_prob) & jnp.any(fits),
      'erase_top': jax.random.randint(k_top, (), 0, jnp.maximum(height - h, 1)),
      'erase_left': jax.random.randint(k_left, (), 0, jnp.maximum(width - w, 1)),
      'erase_h': h,
      'erase_w': w,
  }


def apply(images: jax.Array, choices: dict) -> jax.Array:
  """images [B, H, W, C] uint8 -> [B, H, W, C]: flipped, padded + cropped, erased per `choices`
  (each entry [B], as `draw` vmapped returns them).

  Flip and crop are one gather of source rows and columns (a pixel from outside the image is
  the zero padding); erasing is one select. Nothing is padded or flipped in memory.
  """
  _, height, width, _ = images.shape
  rows = jnp.arange(height)[None] + choices['top'][:, None]  # [B, H] rows of the source
  window = jnp.arange(width)[None] + choices['left'][:, None]  # [B, W] columns, flipped image
  cols = jnp.where(choices['flip'][:, None], width - 1 - window, window)
  inside = (((rows >= 0) & (rows < height))[:, :, None]
            & ((window >= 0) & (window < width))[:, None, :])
  out = jnp.take_along_axis(images, jnp.clip(rows, 0, height - 1)[:, :, None, None], axis=1)
  out = jnp.take_along_axis(out, jnp.clip(cols, 0, width - 1)[:, None, :, None], axis=2)
  out = jnp.where(inside[..., None], out, jnp.zeros((), images.dtype))
  i, j = jnp.arange(height)[None], jnp.arange(width)[None]
  in_rows = (i >= choices['erase_top'][:, None]) & (
      i < (choices['erase_top'] + choices['erase_h'])[:, None])
  in_cols = (j >= choices['erase_left'][:, None]) & (
      j < (choices['erase_left'] + choices['erase_w'])[:, None])
  erased = choices['erase'][:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
  return jnp.where(erased[..., None], jnp.asarray(MEAN_PIXEL, images.dtype), out)


def augment_batch(images: jax.Array, keys: jax.Array, aug: Augmentation) -> jax.Array:
  """images [B, H, W, 3] uint8 (resized, not yet augmented), keys [B] -> augmented [B, H, W, 3]."""
  image_size = images.shape[1:3]
  choices = jax.vmap(lambda key: draw(key, image_size, aug))(keys)
  return apply(images, choices)
