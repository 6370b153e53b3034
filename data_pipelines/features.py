"""The feature layout all project datasets share: one example per item, its images a sequence.

The input pipeline reads any dataset with this layout (data_pipelines/input_pipeline.py).
"""

import tensorflow as tf
import tensorflow_datasets as tfds

DOMAINS = ('street', 'shop')


def item_images() -> tfds.features.Sequence:
  """Each image of an item: JPEG bytes, street or shop, a unique id, its box in the photo."""
  return tfds.features.Sequence({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'domain': tfds.features.ClassLabel(names=DOMAINS),
      'image_id': tf.string,
      'bbox': tfds.features.BBoxFeature(),
  })


def item_features(categories, **extra) -> tfds.features.FeaturesDict:
  """One example per item: its id, category, any dataset-specific fields, and its images."""
  return tfds.features.FeaturesDict({
      'item_id': tf.int64,
      'category': tfds.features.ClassLabel(names=categories),
      **extra,
      'images': item_images(),
  })
