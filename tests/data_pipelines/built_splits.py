"""Builds a dataset from a fake raw tree and reads its splits back, images left encoded."""

import tensorflow_datasets as tfds


def prepare_from_raw(builder_class, raw: str, data_dir: str) -> tfds.core.DatasetBuilder:
  builder = builder_class(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw))
  return builder


def records(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
  """The stored examples of a split in file order, images as their JPEG bytes."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'images': {'image': tfds.decode.SkipDecoding()}})
  return list(tfds.as_numpy(ds))


def items_by_id(builder: tfds.core.DatasetBuilder, splits) -> dict[str, dict[int, dict]]:
  """{split: {item_id: example}}."""
  return {split: {int(ex['item_id']): ex for ex in records(builder, split)} for split in splits}
