"""The two exports, reloaded in a fresh process without this project's code, embed like the
checkpoint (preprocessing included)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from fashion_jax.search.__main__ import main

_LOADER = textwrap.dedent('''
    import sys
    # Neither the project nor Flax may be needed to use an export.
    for name in ('fashion_jax', 'data_pipelines', 'flax', 'orbax', 'orbax.checkpoint'):
        sys.modules[name] = None
    import numpy as np
    import jax
    import tensorflow as tf
    folder, inputs, out = sys.argv[1:4]
    batches = dict(np.load(inputs))
    with open(folder + '/embed.stablehlo', 'rb') as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    loaded = tf.saved_model.load(folder + '/saved_model')
    serve = loaded.signatures['serving_default']
    results = {}
    for name, images in batches.items():
        results['stablehlo_' + name] = np.asarray(exported.call(images))
    # One shape is enough for the SavedModel: it wraps the same serialized module.
    results['saved_model_wide'] = serve(images=tf.constant(batches['wide']))['embeddings'].numpy()
    np.savez(out, **results)
    print('ok', sorted(results))
''')


def test_exports_match_the_checkpoint(workdir, model, make_image, tmp_path, capsys,
                                      monkeypatch):
  out = tmp_path / 'export'
  assert main(['export', '--workdir', workdir, '--out', str(out)]) == 0
  with open(out / 'export.json') as f:
    described = json.load(f)
  assert described['model']['fingerprint'] == model.fingerprint
  assert described['embedding_dim'] == 64
  # Lowered for every platform, not only this machine's CPU (called on CPU below).
  assert described['stablehlo']['platforms'] == ['cpu', 'cuda', 'rocm', 'tpu']
  # Two batches of different crop sizes: one export serves any batch and image size.
  batches = {'wide': np.stack([make_image(p, 0, (48, 64)) for p in range(3)]),
             'tall': np.stack([make_image(p, 1, (70, 30)) for p in range(2)])}
  np.savez(tmp_path / 'inputs.npz', **batches)
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH='')
  result = subprocess.run(
      [sys.executable, '-c', _LOADER, str(out), str(tmp_path / 'inputs.npz'),
       str(tmp_path / 'outputs.npz')], cwd=str(tmp_path), env=env, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  outputs = np.load(tmp_path / 'outputs.npz')
  for name, images in batches.items():
    # The exports resize in JAX (resize_images); the search may resize on the host with the
    # input pipeline's kernel, whose pixels differ by one grey level on values at .5.
    on_host = model.embed_crops(list(images))
    monkeypatch.setattr(model, 'host_resize', False)
    expected = model.embed_crops(list(images))
    monkeypatch.undo()
    np.testing.assert_allclose(on_host, expected, atol=2e-3)
    np.testing.assert_allclose(outputs['stablehlo_' + name], expected, atol=1e-5)
    if name == 'wide':
      np.testing.assert_allclose(outputs['saved_model_' + name], expected, atol=1e-5)
  # Different photos give different embeddings: the comparison can fail.
  assert np.abs(expected[0] - expected[1]).max() > 1e-2


def test_preprocessing_is_the_evaluation_pipelines(make_image):
  """Decoding and resizing against the tf.data evaluation pipeline's, on encoded files."""
  import io
  import tensorflow as tf
  from PIL import Image
  from data_pipelines import input_pipeline
  from fashion_jax.search import images as image_io
  from fashion_jax.search.model import preprocess
  differing = total = 0
  for size, fmt in (((48, 64), 'PNG'), ((70, 30), 'JPEG'), ((300, 200), 'JPEG'),
                    ((20, 24), 'PNG'), ((32, 32), 'JPEG')):
    encoded = io.BytesIO()
    Image.fromarray(make_image(3, 1, size)).save(encoded, format=fmt, quality=80)
    encoded = encoded.getvalue()
    decoded = image_io.decode(encoded)
    if fmt == 'PNG' or image_io.simplejpeg is not None:
      # JPEG: TensorFlow's fast IDCT, reproduced by simplejpeg (the search extra).
      np.testing.assert_array_equal(
          decoded, tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy())
    expected = np.round(input_pipeline.decode_resized(encoded, (32, 32)).numpy())
    ours = np.asarray(preprocess(decoded[None], (32, 32)))[0]
    difference = np.abs(ours.astype(np.int32) - expected.astype(np.int32))
    # Float rounding may move a value that sits on .5 by one grey level; nothing more.
    assert difference.max() <= 1, size
    differing += int((difference > 0).sum())
    total += difference.size
  assert differing <= 0.005 * total


def test_an_export_replaces_an_earlier_one_and_refuses_other_folders(workdir, tmp_path, capsys):
  # An earlier export with a SavedModel; the new one has none: nothing of the old stays.
  out = tmp_path / 'export'
  (out / 'saved_model').mkdir(parents=True)
  (out / 'saved_model' / 'saved_model.pb').write_bytes(b'old')
  (out / 'export.json').write_text('{}')
  assert main(['export', '--workdir', workdir, '--out', str(out), '--no-saved-model']) == 0
  assert sorted(p.name for p in out.iterdir()) == ['embed.stablehlo', 'export.json']
  with open(out / 'export.json') as f:
    assert json.load(f)['saved_model'] is None
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.export-')]
  # The staging folder of an export killed before its cleanup goes with the next export there;
  # that of a running one (this process) stays.
  import subprocess
  gone = subprocess.Popen(['true'])
  gone.wait()
  (tmp_path / f'.export-{gone.pid}-abc').mkdir()
  (tmp_path / f'.export-{os.getpid()}-xyz').mkdir()
  assert main(['export', '--workdir', workdir, '--out', str(out), '--no-saved-model']) == 0
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.export-')) == [
      f'.export-{os.getpid()}-xyz']
  (tmp_path / f'.export-{os.getpid()}-xyz').rmdir()
  # A folder of the user's is not written into.
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('mine')
  capsys.readouterr()
  assert main(['export', '--workdir', workdir, '--out', str(mine), '--no-saved-model']) == 2
  assert capsys.readouterr().err == (f'error: cannot export to {mine}: it holds other files '
                                     '(notes.txt); choose a new or empty folder\n')
  assert sorted(p.name for p in mine.iterdir()) == ['notes.txt']


def test_a_saved_model_without_tensorflow_is_one_line_before_any_work(workdir, tmp_path, capsys,
                                                                      monkeypatch):
  import importlib.util
  from fashion_jax.search import export
  found = importlib.util.find_spec
  monkeypatch.setattr(export.importlib.util, 'find_spec',
                      lambda name, *args: None if name == 'tensorflow' else found(name, *args))
  out = tmp_path / 'export'
  assert main(['export', '--workdir', workdir, '--out', str(out)]) == 2
  assert capsys.readouterr().err == ('error: the SavedModel needs TensorFlow (pip install -e '
                                     '".[data]"); --no-saved-model writes the StableHLO export '
                                     'alone\n')
  assert not out.exists() and not list(tmp_path.iterdir())
  # An output folder that cannot be made is named as given, not by the staging folder.
  assert main(['export', '--workdir', workdir, '--out', '/proc/fashion_jax_export',
               '--no-saved-model']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: cannot export to /proc/fashion_jax_export: ') and '.export-' \
      not in err, err
