"""Tests for reading a split the standard way (tfds.load with the project's decoders) and for
`python -m data_pipelines.show`, on fashion_synth/tiny."""

import csv
import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import datasets, show

NAME = 'fashion_synth/tiny'


def _stored_images(builder, split: str) -> list[tuple[bytes, int, str, int, str]]:
  """(jpeg, item_id, category, domain, image_id) of every image of a split, in stored order."""
  categories = builder.info.features['category'].names
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=datasets.decoders())
  return [(bytes(jpeg), int(ex['item_id']), categories[int(ex['category'])], int(domain),
           image_id.decode())
          for ex in tfds.as_numpy(ds)
          for jpeg, domain, image_id in zip(*(ex['images'][k] for k in
                                              ('image', 'domain', 'image_id')))]


def test_tfds_load_reads_every_split_with_the_decoders(tiny_data_dir, tiny_builder):
  # Without them, a split whose items hold differently sized images does not decode.
  with pytest.raises(tf.errors.InvalidArgumentError, match='Incompatible shapes'):
    list(tfds.load(NAME, split='query', data_dir=tiny_data_dir))
  for split, info in tiny_builder.info.splits.items():
    examples = list(tfds.as_numpy(tfds.load(NAME, split=split, data_dir=tiny_data_dir,
                                            decoders=datasets.decoders())))
    assert len(examples) == info.num_examples
    for example in examples:
      images = example['images']
      assert len(images['image']) == len(images['domain']) == len(images['bbox']) > 0
      for jpeg in images['image']:
        assert np.asarray(Image.open(io.BytesIO(jpeg))).shape[2] == 3


def test_show_writes_the_images_their_table_and_a_contact_sheet(tiny_data_dir, tiny_builder,
                                                                 tmp_path, capsys):
  out = tmp_path / 'photos'
  # train items hold 2 shop then 2 street images: 6 images span both domains and 2 items.
  assert show.main([NAME, '--split', 'train', '--out', str(out), '--limit', '6',
                    '--data_dir', tiny_data_dir]) == 0
  assert capsys.readouterr().out == (
      f'wrote 6 images, images.csv and contact_sheet.png to {out}\n')
  stored = _stored_images(tiny_builder, 'train')[:6]
  files = ['shop_0.jpg', 'shop_1.jpg', 'street_0.jpg', 'street_1.jpg', 'shop_2.jpg',
           'shop_3.jpg']
  assert sorted(p.name for p in out.iterdir()) == sorted(files + ['contact_sheet.png',
                                                                  'images.csv'])
  with open(out / 'images.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  domains = tiny_builder.info.features['images']['domain'].names
  assert [(r['image'], int(r['product_id']), r['category'], r['domain'], r['image_id'])
          for r in rows] == [(file, item, category, domains[domain], image_id)
                             for file, (_, item, category, domain, image_id)
                             in zip(files, stored)]
  assert len({r['product_id'] for r in rows}) == 2
  for file, (jpeg, *_) in zip(files, stored):
    assert (out / file).read_bytes() == jpeg  # the stored bytes, not a re-encoding

  with Image.open(out / 'contact_sheet.png') as sheet:
    cell_w = show.THUMB + show.PAD
    cell_h = show.THUMB + show.CAPTION_LINES * show.LINE + 2 * show.PAD
    assert sheet.size == (6 * cell_w + show.PAD, cell_h + show.PAD)
    pixels = np.asarray(sheet.convert('L'))
  for column in range(6):
    left = show.PAD + column * cell_w
    thumb = pixels[show.PAD:show.PAD + show.THUMB, left:left + show.THUMB]
    caption = pixels[show.PAD + show.THUMB:cell_h, left:left + show.THUMB]
    assert (thumb < 250).mean() > 0.2 and (caption < 128).any(), column


def test_show_replaces_its_own_output_and_refuses_other_files(tiny_data_dir, tmp_path, capsys):
  out = tmp_path / 'photos'
  run = lambda limit: show.main([NAME, '--split', 'train', '--out', str(out), '--limit',
                                 str(limit), '--data_dir', tiny_data_dir])
  assert run(6) == 0
  # Again with fewer images: the earlier output is replaced, no image is left unlisted.
  assert run(2) == 0
  assert sorted(p.name for p in out.iterdir()) == ['contact_sheet.png', 'images.csv',
                                                   'shop_0.jpg', 'shop_1.jpg']
  # A folder with anything else in it is the user's: refused, nothing touched.
  (out / 'my_list.csv').write_text('mine')
  capsys.readouterr()
  assert run(2) == 2
  assert capsys.readouterr().err == (f'error: cannot write to {out}: it holds other files '
                                     '(my_list.csv); choose a new or empty folder\n')
  assert (out / 'my_list.csv').read_text() == 'mine' and (out / 'shop_1.jpg').exists()
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'images.csv').write_text('image,price\nstreet_0.jpg,3\n')
  (mine / 'street_0.jpg').write_bytes(b'my photo')
  assert show.main([NAME, '--split', 'train', '--out', str(mine), '--limit', '1',
                    '--data_dir', tiny_data_dir]) == 2
  assert (mine / 'street_0.jpg').read_bytes() == b'my photo'


@pytest.mark.parametrize('args, message', [
    (['no_such_dataset', '--split', 'query'],
     "error: unknown dataset 'no_such_dataset': no TFDS builder has this name"),
    (['fashion_synth/huge', '--split', 'query'],
     "error: dataset 'fashion_synth' has no config 'huge'; choose one of tiny, demo"),
    ([NAME, '--split', 'test'],
     "error: dataset 'fashion_synth/tiny' has no split 'test'; choose one of train, query, "
     'gallery'),
    (['street2shop', '--split', 'query'],
     "error: dataset 'street2shop' (Exact Street2Shop (meta/json + downloaded photos)) is not "
     'built in '),
    ([NAME, '--split', 'query', '--limit', '0'], 'error: --limit must be at least 1, got 0'),
])
def test_bad_input_is_one_line(tiny_data_dir, tmp_path, capsys, args, message):
  out = tmp_path / 'photos'
  assert show.main(args + ['--out', str(out), '--data_dir', tiny_data_dir]) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count('\n') == 1, err
  assert not out.exists()
