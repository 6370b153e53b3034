"""Letterbox preprocessing (input.resize_mode = 'letterbox'): PIL's thumbnail size, the tf.data
pipeline's pixels, white borders, symbolic image sizes, the export, and the fingerprint."""

import io
import json
import os
import shutil
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fashion_jax.preprocessing import letterbox_geometry, preprocess, resize_images
from fashion_jax.search import images as image_io
from fashion_jax.search.__main__ import main
from fashion_jax.search.images import InputError
from fashion_jax.search.model import SearchModel


@pytest.fixture(scope='module')
def letterbox_workdir(tmp_path_factory, workdir):
  """The fixture workdir's checkpoint with resize_mode = 'letterbox' in its config.json."""
  path = str(tmp_path_factory.mktemp('letterbox_workdir'))
  shutil.copytree(os.path.join(workdir, 'checkpoints'), os.path.join(path, 'checkpoints'))
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['input']['resize_mode'] = 'letterbox'
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  return path


@pytest.fixture(scope='module')
def letterbox_model(letterbox_workdir):
  return SearchModel(letterbox_workdir)


def _nearer(target: Fraction, candidates: dict) -> set:
  """The candidates (n -> distance function) at the least exact distance from `target`."""
  distances = {n: abs(target - f(n)) for n, f in candidates.items()}
  best = min(distances.values())
  return {n for n, d in distances.items() if d == best}


def test_letterbox_size_is_pils_thumbnail():
  """Against Image.thumbnail on every size up to 3x the target (4 targets) and on random large
  ones. PIL compares float distances; where floor and ceiling are exactly as near (a tie) its
  choice follows float rounding, while the rule (shared with the tf.data pipeline) takes the
  floor. Everywhere else they must agree."""
  rng = np.random.default_rng(0)
  checked = ties_up = 0
  for target in ((32, 32), (40, 24), (24, 40), (7, 5)):
    height, width = target
    grid_h, grid_w = np.meshgrid(np.arange(1, 3 * height + 4), np.arange(1, 3 * width + 4),
                                 indexing='ij')
    sizes = [grid_h.ravel(), grid_w.ravel()]
    if target == (32, 32):
      sizes = [np.concatenate([sizes[0], rng.integers(97, 1200, 150)]),
               np.concatenate([sizes[1], rng.integers(1, 1200, 150)])]
    hs, ws = sizes
    geometry = [np.asarray(v) for v in letterbox_geometry(hs, ws, target)]
    for h, w, nh, nw, top, left in zip(hs, ws, *geometry):
      h, w = int(h), int(w)
      thumb = Image.new('L', (w, h))
      thumb.thumbnail((width, height))
      pil = (thumb.height, thumb.width)
      assert (top, left) == ((height - nh) // 2, (width - nw) // 2)
      assert nh <= height and nw <= width and nh <= h and nw <= w
      checked += 1
      if pil == (nh, nw):
        continue
      # Only an exact tie may differ, and then the rule has the floor.
      aspect = Fraction(w, h)
      if nh == height:
        assert pil[0] == height, (target, h, w, pil, (nh, nw))
        candidates = {n: (lambda n: Fraction(n, height)) for n in {nw, pil[1]}}
      else:
        assert pil[1] == width and nw == width, (target, h, w, pil, (nh, nw))
        candidates = {n: (lambda n: Fraction(width, n)) for n in {nh, pil[0]}}
      assert len(_nearer(aspect, candidates)) == 2, (target, h, w, pil, (nh, nw))
      assert pil > (nh, nw), (target, h, w, pil, (nh, nw))
      ties_up += 1
  assert checked > 20_000
  # Ties are rare: 41 of the 28,833 sizes here.
  assert ties_up < 0.005 * checked, ties_up


def _png(image: np.ndarray) -> bytes:
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, format='PNG')
  return encoded.getvalue()


def test_letterbox_pixels_are_the_input_pipelines():
  from data_pipelines import input_pipeline
  rng = np.random.default_rng(1)
  target = (40, 24)
  differing = total = 0
  # Tall, wide, smaller, exactly the target, wider only, the same aspect, a rounding tie.
  for size in ((90, 40), (30, 100), (20, 12), (40, 24), (22, 61), (80, 48), (80, 47)):
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).resize(
        size[::-1], Image.Resampling.BICUBIC))
    image = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    encoded = _png(image)
    decoded = image_io.decode(encoded)
    np.testing.assert_array_equal(decoded, image)
    expected = np.asarray(input_pipeline.decode_resized_uint8(encoded, target, 'triangle',
                                                             'letterbox'))
    ours = np.asarray(preprocess(decoded[None], target, 'letterbox'))[0]
    assert ours.shape == expected.shape == target + (3,)
    nh, nw, top, left = (int(v) for v in letterbox_geometry(*size, target))
    content = np.zeros(target, bool)
    content[top:top + nh, left:left + nw] = True
    # The pipeline's border is where ours is.
    assert (expected[~content] == 255).all(), size
    difference = np.abs(ours.astype(np.int32) - expected.astype(np.int32))
    # Float rounding may move a value that sits on .5 by one grey level; nothing more.
    assert difference.max() <= 1, size
    differing += int((difference > 0).sum())
    total += difference.size
  assert differing <= 0.005 * total


def test_letterbox_borders_are_white_and_content_is_the_resized_crop():
  rng = np.random.default_rng(2)
  target = (32, 32)
  # Black 64 x 16 -> 32 x 8 content in columns 12..19, white elsewhere.
  out = np.asarray(preprocess(np.zeros((1, 64, 16, 3), np.uint8), target, 'letterbox'))[0]
  assert (out[:, 12:20] == 0).all()
  assert (out[:, :12] == 255).all() and (out[:, 20:] == 255).all()
  # Wide random crop: its content equals the crop stretched to the content size, bit for bit,
  # and every other pixel is exactly white.
  crop = rng.integers(0, 256, (1, 37, 100, 3), np.uint8)
  nh, nw, top, left = (int(v) for v in letterbox_geometry(37, 100, target))
  assert (nh, nw, top, left) == (12, 32, 10, 0)
  out = np.asarray(preprocess(crop, target, 'letterbox'))[0]
  np.testing.assert_array_equal(out[top:top + nh, left:left + nw],
                                np.asarray(preprocess(crop, (nh, nw), 'stretch'))[0])
  assert (out[:top] == 255).all() and (out[top + nh:] == 255).all()
  # A crop smaller than the target is not enlarged: it is pasted as it is.
  small = rng.integers(0, 256, (1, 10, 7, 3), np.uint8)
  out = np.asarray(preprocess(small, target, 'letterbox'))[0]
  np.testing.assert_array_equal(out[11:21, 12:19], small[0])
  assert (out == 255).sum() == 32 * 32 * 3 - small.size + (small == 255).sum()
  # The aspect ratio of the target: letterbox and stretch are the same pixels.
  square = rng.integers(0, 256, (1, 96, 96, 3), np.uint8)
  np.testing.assert_array_equal(np.asarray(preprocess(square, target, 'letterbox')),
                                np.asarray(preprocess(square, target, 'stretch')))


def test_letterbox_with_symbolic_sizes_is_the_same_pixels():
  """Exported with b, h, w symbolic (as the embedding exports are), the letterbox rounds
  exactly like the compiled one."""
  target = (32, 32)
  batch, height, width = jax.export.symbolic_shape('b, h, w')
  exported = jax.export.export(jax.jit(lambda images: resize_images(images, target, 'letterbox')))(
      jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8))
  exported = jax.export.deserialize(exported.serialize())
  rng = np.random.default_rng(3)
  for size in ((70, 30), (30, 70), (20, 12), (64, 31)):
    images = rng.integers(0, 256, (2,) + size + (3,), np.uint8)
    np.testing.assert_array_equal(np.asarray(exported.call(images)),
                                  np.asarray(preprocess(images, target, 'letterbox')), size)


def test_letterbox_workdir_embeds_exports_and_refuses_stretch_index(
    letterbox_workdir, letterbox_model, model, index_dir, catalogue, make_image, tmp_path,
    capsys, monkeypatch):
  assert letterbox_model.resize_mode == 'letterbox'
  assert letterbox_model.preprocessing['resize'] == 'letterbox'
  assert model.preprocessing['resize'] == 'stretch'
  # Same weights, other preprocessing: another fingerprint.
  assert letterbox_model.fingerprint != model.fingerprint
  crops = [make_image(p, 1, (70, 30)) for p in range(2)]
  # The JAX resize's pixels, or the compiled kernel's on the host: one grey level apart at most.
  jax_pixels = np.asarray(preprocess(crops[0][None], (32, 32), 'letterbox'))[0]
  assert np.abs(letterbox_model.prepare(crops[0]).astype(np.int32) - jax_pixels).max() <= 1
  assert np.abs(letterbox_model.embed_crops(crops) - model.embed_crops(crops)).max() > 1e-2

  out = tmp_path / 'export'
  assert main(['export', '--workdir', letterbox_workdir, '--out', str(out),
               '--no-saved-model']) == 0
  with open(out / 'export.json') as f:
    described = json.load(f)
  assert described['model']['fingerprint'] == letterbox_model.fingerprint
  assert described['model']['preprocessing']['resize'] == 'letterbox'
  with open(out / 'embed.stablehlo', 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  for images in (np.stack(crops), np.stack([make_image(p, 0, (48, 64)) for p in range(3)])):
    on_host = letterbox_model.embed_crops(list(images))
    # The export resizes in JAX, as the model does without its host resize.
    monkeypatch.setattr(letterbox_model, 'host_resize', False)
    expected = letterbox_model.embed_crops(list(images))
    monkeypatch.undo()
    np.testing.assert_allclose(np.asarray(exported.call(images)), expected, atol=1e-5)
    np.testing.assert_allclose(on_host, expected, atol=2e-3)

  # An index built with stretching is not queried with letterboxing; the line says why.
  photo = os.path.join(catalogue['dir'], 'p0_0.png')
  capsys.readouterr()
  code = main(['query', '--index', index_dir, photo, '--workdir', letterbox_workdir,
               '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert 'index was built by another model' in err
  assert "resize 'stretch' in the index, 'letterbox' here" in err, err


def test_unknown_resize_mode_is_refused(tmp_path, workdir):
  shutil.copytree(os.path.join(workdir, 'checkpoints'), tmp_path / 'checkpoints')
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['input']['resize_mode'] = 'crop'
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  with pytest.raises(InputError, match="input.resize_mode 'crop'"):
    SearchModel(str(tmp_path))
  # A config.json from before the setting existed stretches.
  del config['input']['resize_mode']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  assert SearchModel(str(tmp_path)).preprocessing['resize'] == 'stretch'
