"""Tests for the fashion_synth TFDS builder and its renderer.

The tiny config is built offline once per module into a temporary directory.
"""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines.fashion_synth import fashion_synth_dataset_builder as fsb
from data_pipelines.fashion_synth import render

SPLITS = ('train', 'query', 'gallery')
STREET, SHOP = fsb.DOMAINS.index('street'), fsb.DOMAINS.index('shop')
CONFIG = next(c for c in fsb.Builder.BUILDER_CONFIGS if c.name == 'tiny')


def _build_and_read(data_dir) -> tuple[tfds.core.DatasetBuilder, dict[str, list[dict]]]:
  builder = tfds.builder('fashion_synth/tiny', data_dir=data_dir)
  builder.download_and_prepare()
  examples = {}
  for split in SPLITS:
    ds = builder.as_dataset(split=split, decoders=fsb.SKIP_IMAGE_DECODING)
    examples[split] = sorted(tfds.as_numpy(ds), key=lambda ex: ex['item_id'])
  return builder, examples


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return _build_and_read(tmp_path_factory.mktemp('first'))


@pytest.fixture(scope='module')
def examples(built):
  return built[1]


def _ids(examples, split) -> list[int]:
  return [int(ex['item_id']) for ex in examples[split]]


def _decode(jpeg: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(jpeg)))


def test_splits_and_features(built):
  builder, _ = built
  assert set(builder.info.splits.keys()) == set(SPLITS)
  assert builder.info.splits['train'].num_examples == CONFIG.num_train_items
  assert builder.info.splits['query'].num_examples == CONFIG.num_test_items
  features = builder.info.features
  assert set(features.keys()) == {'item_id', 'category', 'images'}
  assert features['category'].names == list(render.CATEGORIES[:CONFIG.num_categories])
  images = features['images'].feature
  assert set(images.keys()) == {'image', 'domain', 'image_id', 'bbox'}
  assert images['domain'].names == ['street', 'shop']
  assert images['image'].shape == (None, None, 3)
  assert images['image'].encoding_format == 'jpeg'


def test_one_example_per_item_and_disjoint_roles(examples):
  train, query, gallery = (_ids(examples, s) for s in SPLITS)
  for ids in (train, query, gallery):
    assert len(ids) == len(set(ids))
  assert not set(train) & (set(query) | set(gallery))
  distractors = set(gallery) - set(query)
  assert len(distractors) == CONFIG.num_distractor_items
  assert len(set(query) - set(gallery)) == max(
      1, round(CONFIG.missing_shop_fraction * CONFIG.num_test_items))
  assert len(gallery) == len(query) - len(set(query) - set(gallery)) + len(distractors)


def test_domains_and_image_counts_per_split(examples):
  expected = {
      'train': [SHOP] * CONFIG.shop_images_per_item + [STREET] * CONFIG.street_images_per_item,
      'query': [STREET] * CONFIG.street_images_per_item,
      'gallery': [SHOP] * CONFIG.shop_images_per_item,
  }
  for split in SPLITS:
    for ex in examples[split]:
      assert list(ex['images']['domain']) == expected[split], split


def test_image_ids_are_unique_and_name_their_item(examples):
  seen = set()
  for split in SPLITS:
    for ex in examples[split]:
      for image_id, domain in zip(ex['images']['image_id'], ex['images']['domain']):
        image_id = image_id.decode()
        assert image_id.startswith(f"{fsb.DOMAINS[domain]}/{int(ex['item_id']):06d}_")
        assert image_id not in seen
        seen.add(image_id)


def test_images_and_bboxes_agree(examples):
  scene = round(CONFIG.image_size * CONFIG.difficulty.scene_scale)
  for split in SPLITS:
    for ex in examples[split]:
      images = ex['images']
      for jpeg, domain, box in zip(images['image'], images['domain'], images['bbox']):
        image = _decode(jpeg)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        if domain == SHOP:
          assert image.shape[:2] == (CONFIG.image_size, CONFIG.image_size)
          np.testing.assert_array_equal(box, [0.0, 0.0, 1.0, 1.0])
        else:
          ymin, xmin, ymax, xmax = box
          assert 0.0 <= ymin < ymax <= 1.0 and 0.0 <= xmin < xmax <= 1.0
          assert (ymax - ymin) * (xmax - xmin) < 0.5  # the garment is a part of the scene
          # The stored crop is exactly the recorded box of the scene.
          np.testing.assert_allclose(
              image.shape[:2], [(ymax - ymin) * scene, (xmax - xmin) * scene], atol=1e-3)


def test_categories_are_stored_and_consistent(examples):
  by_item = {}
  for split in SPLITS:
    for ex in examples[split]:
      category = int(ex['category'])
      assert 0 <= category < CONFIG.num_categories
      assert by_item.setdefault(int(ex['item_id']), category) == category
  assert {int(ex['category']) for ex in examples['train']} == set(range(CONFIG.num_categories))


def test_rebuild_into_another_dir_gives_identical_examples(examples, tmp_path):
  _, again = _build_and_read(tmp_path)
  for split in SPLITS:
    assert len(again[split]) == len(examples[split])
    for a, b in zip(examples[split], again[split]):
      assert a['item_id'] == b['item_id'] and a['category'] == b['category']
      for key in ('image', 'domain', 'image_id', 'bbox'):
        np.testing.assert_array_equal(a['images'][key], b['images'][key])


def test_rendering_is_a_function_of_seed_item_and_index():
  difficulty = render.Difficulty()

  def draw(item_id, index):
    item = render.sample_item(7, item_id, item_id % 3, difficulty)
    shop = render.render_shop(
        item, 32, index, render.rng_for(7, render.Stream.IMAGE, item_id, SHOP, index), difficulty)
    street, box = render.render_street(
        item, 32, render.rng_for(7, render.Stream.IMAGE, item_id, STREET, index), difficulty)
    return shop, street, box

  first = draw(5, 1)
  draw(6, 1)  # rendering another item in between must not change anything
  for a, b in zip(first, draw(5, 1)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], draw(5, 2)[0])
  assert not np.array_equal(first[0], draw(8, 1)[0])


def test_items_of_a_category_share_few_colours():
  difficulty = render.Difficulty()
  families = render.PALETTE[render.colour_families(0, 2, difficulty)]
  assert len(families) == difficulty.colour_families
  for i in range(40):
    item = render.sample_item(0, i, 2, difficulty)
    for colour in (item.base, item.accent):
      assert np.abs(colour - families).max(axis=1).min() < 5 * difficulty.colour_jitter


def test_every_category_renders_a_centred_garment_on_white():
  difficulty = render.Difficulty()
  for category in range(len(render.CATEGORIES)):
    item = render.sample_item(0, category, category, difficulty)
    shop = render.render_shop(item, 48, 0, np.random.default_rng(0), difficulty)
    alpha = np.asarray(render.render_garment(item, 48))[..., 3]
    assert 0.1 < np.mean(alpha > 127) < 0.8, render.CATEGORIES[category]
    np.testing.assert_array_equal(shop[alpha == 0], 255)
    assert np.all(shop[0] == 255) and np.all(shop[-1] == 255)  # margins: the item is whole


def test_config_rejects_more_categories_than_rendered():
  with pytest.raises(ValueError):
    fsb.FashionSynthConfig(name='bad', num_categories=len(render.CATEGORIES) + 1)
