"""TFDS builder for fashion_synth, a street-to-shop retrieval dataset rendered from a seed.

Same splits and roles as Street2Shop after the centroids-reid conversion, with no download.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import features
from data_pipelines.fashion_synth import render

DOMAINS = features.DOMAINS

# Street crops differ in size, and a Sequence decodes its images into one stacked tensor,
# so examples holding several street crops fail to decode by default. Pass this as
# `as_dataset(..., decoders=SKIP_IMAGE_DECODING)` to get JPEG bytes ([N] tf.string), then
# decode each image with `tf.io.decode_jpeg`.
SKIP_IMAGE_DECODING = {'images': {'image': tfds.decode.SkipDecoding()}}


@dataclasses.dataclass(eq=False)
class FashionSynthConfig(tfds.core.BuilderConfig):
  """Sizes, seed and difficulty of one rendering of the dataset."""
  num_categories: int = 3
  num_train_items: int = 16
  num_test_items: int = 8
  num_distractor_items: int = 4
  shop_images_per_item: int = 2
  street_images_per_item: int = 2
  image_size: int = 32  # shop image side; street scenes are `difficulty.scene_scale` times it
  # Share of test items whose shop images are absent from the gallery (Street2Shop's dead
  # URLs): their queries have no positive and evaluation must skip them. At least one item.
  missing_shop_fraction: float = 0.05
  seed: int = 0
  difficulty: render.Difficulty = render.Difficulty()

  def __post_init__(self):
    if not 1 <= self.num_categories <= len(render.CATEGORIES):
      raise ValueError(f'num_categories must be in [1, {len(render.CATEGORIES)}]')
    if self.num_test_items < 2:
      raise ValueError('need a test item without gallery images and one with')


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Which items go where: (item_id, category) pairs per role, and the lost shop items."""
  train: list[tuple[int, int]]
  test: list[tuple[int, int]]
  distractors: list[tuple[int, int]]
  missing_shop: frozenset[int]


def _plan(config: FashionSynthConfig) -> _Plan:
  """Consecutive ids per role (train, test, distractors); categories cycle within a role."""
  def role(start: int, count: int) -> list[tuple[int, int]]:
    return [(start + i, i % config.num_categories) for i in range(count)]

  n_train, n_test = config.num_train_items, config.num_test_items
  test = role(n_train, n_test)
  n_missing = max(1, round(config.missing_shop_fraction * n_test))
  missing = render.rng_for(config.seed, render.Stream.SPLIT).choice(
      n_test, size=n_missing, replace=False)
  return _Plan(
      train=role(0, n_train),
      test=test,
      distractors=role(n_train + n_test, config.num_distractor_items),
      missing_shop=frozenset(test[i][0] for i in missing),
  )


class Builder(tfds.core.GeneratorBasedBuilder):
  """Procedurally rendered garments photographed in the shop and in the street."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      FashionSynthConfig(
          name='tiny',
          description='For tests: 3 categories, 28 items, 32 px; builds in seconds.',
      ),
      FashionSynthConfig(
          name='demo',
          description='For a CPU demo: 6 categories, 480 items, 96 px shop images.',
          num_categories=6,
          num_train_items=300,
          num_test_items=120,
          num_distractor_items=60,
          shop_images_per_item=2,
          street_images_per_item=3,
          image_size=96,
      ),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Synthetic street-to-shop fashion retrieval. Each example is one product: its '
            'category and its images, each a shop photo (item on white) or a street photo '
            'crop (item in a cluttered, badly lit scene, cropped to its annotated box). '
            'train: train products with both domains; query: test products, street only; '
            'gallery: shop images of test products (a few missing) and of distractors.'),
        features=features.item_features(render.CATEGORIES[:config.num_categories]),
        homepage=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # every image is rendered; nothing is downloaded
    plan = _plan(self.builder_config)
    gallery = [x for x in plan.test if x[0] not in plan.missing_shop] + plan.distractors
    return {
        'train': self._generate_examples(plan.train, ('shop', 'street')),
        'query': self._generate_examples(plan.test, ('street',)),
        'gallery': self._generate_examples(gallery, ('shop',)),
    }

  def _generate_examples(self, items: list[tuple[int, int]], domains: tuple[str, ...]):
    """Yields one example per item, holding its images of the given domains."""
    config = self.builder_config
    counts = {'shop': config.shop_images_per_item, 'street': config.street_images_per_item}
    for item_id, category in items:
      item = render.sample_item(config.seed, item_id, category, config.difficulty)
      images = []
      for domain in domains:
        for index in range(counts[domain]):
          rng = render.rng_for(
              config.seed, render.Stream.IMAGE, item_id, DOMAINS.index(domain), index)
          if domain == 'shop':
            image = render.render_shop(item, config.image_size, index, rng, config.difficulty)
            bbox = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
          else:
            image, bbox = render.render_street(item, config.image_size, rng, config.difficulty)
          images.append({'image': image, 'domain': domain,
                         'image_id': f'{domain}/{item_id:06d}_{index}', 'bbox': bbox})
      yield f'{item_id:06d}', {'item_id': item_id, 'category': category, 'images': images}
