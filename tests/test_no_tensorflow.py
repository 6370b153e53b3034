"""The JAX side (models, losses, step, checkpoints, retrieval, preprocessing) must work where
TensorFlow is absent."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent('''
    import sys
    # A None entry makes any `import tensorflow` fail, as on a machine without it.
    for name in ('tensorflow', 'tensorflow_datasets'):
        sys.modules[name] = None
    import numpy as np
    import jax
    from fashion_jax import checkpointing, configlib, optim, preprocessing, train_step as ts
    # The host resize's module came along (it would be None had its import needed TensorFlow).
    assert preprocessing.resample is not None
    from fashion_jax.models import build_model
    from fashion_jax.retrieval import metrics

    c = configlib.base_config()
    c.model.backbone, c.model.width = 'resnet10_ibn_a', 8
    model = build_model(c.model, 4)
    tx, schedule = optim.make_optimizer(c.optim, 1)
    graphdef, state = ts.create_train_state(model, tx, 4, loss_config=c.loss)
    mesh = ts.make_mesh(jax.devices()[:1])
    step = ts.make_train_step(graphdef, tx, mesh, c.loss, schedule)
    crops = np.random.default_rng(0).integers(0, 256, (8, 40, 24, 3), dtype=np.uint8)
    images = np.asarray(preprocessing.preprocess(crops, (32, 32), 'letterbox', 'area'))
    labels = np.repeat(np.arange(4), 2).astype(np.int32)
    state, m = step(ts.replicate(state, mesh), images, labels)
    ckpt = checkpointing.Checkpointer(sys.argv[1])
    ckpt.save(1, state)
    ckpt.wait()
    restored = ckpt.restore(state)
    emb = ts.make_embed_fn(graphdef, mesh)(restored['params'], restored['batch_stats'], images)
    result = metrics.evaluate_retrieval(np.asarray(emb), np.asarray(emb), labels, labels)
    assert result['acc@1'] == 1.0, result  # each query finds itself first
    assert 'tensorflow' not in {k for k, v in sys.modules.items() if v is not None}
    print('ok', float(m['loss']))
''')


def test_jax_side_runs_without_tensorflow(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='')
  result = subprocess.run([sys.executable, '-c', _SCRIPT, str(tmp_path / 'ckpt')], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('ok')
