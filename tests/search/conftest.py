"""Shared fixtures: a tiny trained-format workdir, a small catalogue of real image files, an index.

The checkpoint is written directly (a width-8 ResNet10-IBN-a at 32x32, untrained) in the same
format training writes, so nothing here trains.
"""

import csv
import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = ('dress', 'shoe')


def write_workdir(path, *, seed: int = 0, num_classes: int = 5) -> str:
  """A workdir as training leaves it: config.json and an Orbax checkpoint of the whole training
  state at step 3. Values are drawn with NumPy (He-normal kernels, unit BatchNorm scales and
  variances) on the state's shapes, so nothing is compiled."""
  import jax
  sys.path.insert(0, TESTS)
  import tiny_config
  from fashion_jax import checkpointing, optim, train_step as ts
  from fashion_jax.models import build_model
  config = tiny_config.get_config()
  config.seed = seed
  tx, _ = optim.make_optimizer(config.optim, 1)
  shapes = jax.eval_shape(
      lambda: ts.create_train_state(build_model(config.model, num_classes), tx, num_classes,
                                    loss_config=config.loss)[1])
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    top = str(getattr(path[0], 'key', path[0]))
    if top not in ('params', 'batch_stats') or name in ('bias', 'mean'):
      return np.zeros(leaf.shape, leaf.dtype)
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

  state = jax.tree_util.tree_map_with_path(value, shapes)
  state['step'] = np.int32(3)
  os.makedirs(path, exist_ok=True)
  checkpointer = checkpointing.Checkpointer(os.path.join(path, 'checkpoints'))
  checkpointer.save(3, state)
  checkpointer.wait()
  checkpointer.close()
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  return str(path)


def product_image(product: int, variant: int, size=(48, 64)) -> np.ndarray:
  """A distinct picture per product (stripes of its own colours), slightly varied per image."""
  rng = np.random.default_rng(1000 * product + variant)
  height, width = size
  base = np.random.default_rng(product).integers(0, 256, (2, 3))
  rows = (np.arange(height)[:, None] // (3 + product)) % 2
  image = base[rows.repeat(width, axis=1)].astype(np.float64)
  image += rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope='session')
def workdir(tmp_path_factory):
  return write_workdir(tmp_path_factory.mktemp('workdir'))


@pytest.fixture(scope='session')
def other_workdir(tmp_path_factory):
  return write_workdir(tmp_path_factory.mktemp('other_workdir'), seed=1)


@pytest.fixture(scope='session')
def catalogue(tmp_path_factory):
  """6 products x 2 images (PNG and JPEG, two sizes), categories alternating dress/shoe.

  Returns {'dir', 'csv_first' (products 0-3), 'csv_rest' (products 4-5), 'rows': [...]}; the
  last image of product 5 is a 96x64 picture whose box 16,0,64,48 is the garment.
  """
  folder = tmp_path_factory.mktemp('catalogue')
  rows = []
  for product in range(6):
    for variant in range(2):
      size = (48, 64) if variant == 0 else (56, 40)
      image = product_image(product, variant, size)
      box = ''
      if product == 5 and variant == 1:
        canvas = np.full((48, 96, 3), 255, np.uint8)
        canvas[:, 16:80] = product_image(product, variant, (48, 64))
        image, box = canvas, '16,0,64,48'
      name = f'p{product}_{variant}.' + ('png' if variant == 0 else 'jpg')
      Image.fromarray(image).save(folder / name, quality=95)
      rows.append({'image': name, 'product_id': f'sku-{product}',
                   'category': CATEGORIES[product % 2], 'box': box})

  def write(name, selected):
    with open(folder / name, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['image', 'product_id', 'category', 'x', 'y', 'w', 'h'])
      for row in selected:
        writer.writerow([row['image'], row['product_id'], row['category']] +
                        (row['box'].split(',') if row['box'] else ['', '', '', '']))
    return str(folder / name)

  return {'dir': str(folder), 'csv_first': write('first.csv', rows[:8]),
          'csv_rest': write('rest.csv', rows[8:]), 'rows': rows}


@pytest.fixture(scope='session')
def model(workdir):
  from fashion_jax.search.model import SearchModel
  return SearchModel(workdir)


@pytest.fixture(scope='session')
def index_dir(tmp_path_factory, workdir, catalogue):
  """The whole catalogue indexed in two steps through the command line (float32)."""
  from fashion_jax.search.__main__ import main
  path = str(tmp_path_factory.mktemp('index') / 'shop')
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue',
               catalogue['csv_first'], '--dtype', 'float32']) == 0
  assert main(['index', '--workdir', workdir, '--index', path, '--catalogue',
               catalogue['csv_rest']]) == 0
  return path


@pytest.fixture(scope='session')
def service(index_dir, model):
  """A running service on a free loopback port, small upload and pixel limits."""
  from fashion_jax.search import engine, server
  from fashion_jax.search import index as search_index
  searcher = engine.Searcher(search_index.SearchIndex(index_dir), model, max_pixels=1_000_000)
  httpd = server.make_server(searcher, port=0, max_upload_bytes=200_000, default_k=4, quiet=True,
                             max_in_flight=16)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  host, port = httpd.server_address[:2]
  yield {'url': f'http://{host}:{port}', 'searcher': searcher}
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope='session')
def make_image():
  return product_image
