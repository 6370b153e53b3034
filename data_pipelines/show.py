"""Writes the images of a dataset split to a folder, to look at them or to try the visual search
with: each image as a JPEG file and a contact sheet of captioned thumbnails.

  python -m data_pipelines.show fashion_synth/demo --split query --out runs/demo_photos --limit 12

In --out: <domain>_<n>.jpg, the n-th image of that domain in the split's stored order (the
stored bytes, unchanged); images.csv, what each file is (image, product_id, category, domain,
image_id: a catalogue `python -m fashion_jax.search index --catalogue` reads); contact_sheet.png,
every image captioned with its file, product id, category and domain. Bad input is one line on
stderr and exit status 2.
"""

import argparse
import collections
import csv
import io
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont, ImageOps

from fashion_jax import console

SHEET_FILE = 'contact_sheet.png'
CSV_FILE = 'images.csv'
THUMB = 128  # thumbnail box on the sheet; small crops are enlarged to it so they can be seen
COLUMNS = 8
PAD = 6
LINE = 13  # caption line height, for PIL's default font
CAPTION_LINES = 3


class ShowError(Exception):
  """Bad input, reported in one line."""


class _Parser(argparse.ArgumentParser):
  """Usage mistakes are one line on stderr and exit status 2, like every other bad input."""

  def error(self, message):
    self.exit(2, f'error: {" ".join(message.split())} (see {self.prog} --help)\n')


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='python -m data_pipelines.show', description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('name', help='dataset, e.g. fashion_synth/demo, street2shop, '
                      'deepfashion_consumer2shop/highres')
  parser.add_argument('--split', required=True, help='train, query or gallery')
  parser.add_argument('--out', required=True, help='folder for the images and the sheet')
  parser.add_argument('--limit', type=int, default=48, help='images written (default 48)')
  parser.add_argument('--data_dir', '--data-dir', dest='data_dir',
                      help="where the dataset is built (TFDS's default if unset)")
  return parser


def read_images(name: str, split: str, limit: int, data_dir: str | None = None) -> list[dict]:
  """The first `limit` images of a split, in stored order, as {jpeg, product_id, category,
  domain, image_id}; ShowError for an unknown or unbuilt dataset, an unknown split."""
  # TensorFlow is imported here, so that usage errors are answered without it.
  import tensorflow_datasets as tfds

  from data_pipelines import datasets
  try:
    builder = datasets.get_builder(name, data_dir)
  except datasets.DatasetMissingError as e:
    raise ShowError(str(e)) from None
  if split not in builder.info.splits:
    raise ShowError(f'dataset {name!r} has no split {split!r}; choose one of '
                    f'{", ".join(builder.info.splits)}')
  features = builder.info.features
  categories, domains = features['category'].names, features['images']['domain'].names
  # No autocache: only the first `limit` images are read.
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=datasets.decoders(),
                          read_config=tfds.ReadConfig(try_autocache=False))
  images = []
  for example in tfds.as_numpy(ds):
    item = example['images']
    for jpeg, domain, image_id in zip(item['image'], item['domain'], item['image_id']):
      if len(images) == limit:
        return images
      images.append({'jpeg': bytes(jpeg), 'product_id': int(example['item_id']),
                     'category': categories[int(example['category'])],
                     'domain': domains[int(domain)], 'image_id': image_id.decode()})
  return images


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
  """`text`, cut short with '..' if it is wider than `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + '..', font=font) > width:
    text = text[:-1]
  return text + '..'


def contact_sheet(images: list[dict]) -> Image.Image:
  """A grid of the images' thumbnails, each captioned with its file, product id, category and
  domain (the keys 'file', 'product_id', 'category', 'domain' of each dict)."""
  columns = min(COLUMNS, len(images))
  rows = math.ceil(len(images) / columns)
  cell_w, cell_h = THUMB + PAD, THUMB + CAPTION_LINES * LINE + 2 * PAD
  sheet = Image.new('RGB', (columns * cell_w + PAD, rows * cell_h + PAD), 'white')
  draw = ImageDraw.Draw(sheet)
  font = ImageFont.load_default()
  for position, image in enumerate(images):
    left = PAD + position % columns * cell_w
    top = PAD + position // columns * cell_h
    with Image.open(io.BytesIO(image['jpeg'])) as photo:
      thumb = ImageOps.contain(photo.convert('RGB'), (THUMB, THUMB))
    sheet.paste(thumb, (left + (THUMB - thumb.width) // 2, top + (THUMB - thumb.height) // 2))
    caption = (image['file'], f"product {image['product_id']}",
               f"{image['category']}, {image['domain']}")
    for line, text in enumerate(caption):
      draw.text((left, top + THUMB + PAD // 2 + line * LINE), _fit(draw, text, font, THUMB),
                fill='black', font=font)
  return sheet


_HEADER = ('image', 'product_id', 'category', 'domain', 'image_id')


def _clear_earlier_output(out: str) -> None:
  """Makes room in `out`: nothing to do for a new or empty folder; an earlier output of this
  command (its images.csv and contact sheet) is removed with the images it lists, so none stays
  unlisted; a folder holding anything else is refused (nothing of the user's is overwritten)."""
  if not os.path.isdir(out) or not os.listdir(out):
    return
  earlier = []
  try:
    with open(os.path.join(out, CSV_FILE), newline='') as f:
      rows = list(csv.reader(f))
    if rows and tuple(rows[0]) == _HEADER and os.path.isfile(os.path.join(out, SHEET_FILE)):
      earlier = [row[0] for row in rows[1:] if row and os.path.basename(row[0]) == row[0]]
  except (OSError, UnicodeDecodeError, csv.Error):
    pass
  ours = {*earlier, CSV_FILE, SHEET_FILE}
  others = sorted(set(os.listdir(out)) - ours)
  if not earlier or others:
    raise ShowError(f'cannot write to {out}: it holds other files ({", ".join(others[:3])}'
                    f'{", ..." if len(others) > 3 else ""}); choose a new or empty folder')
  for name in ours:
    if os.path.isfile(os.path.join(out, name)):
      os.remove(os.path.join(out, name))


def write(images: list[dict], out: str) -> None:
  """Each image as <domain>_<n>.jpg, images.csv and the contact sheet, into `out` (new, empty,
  or an earlier output of this command, which is replaced)."""
  try:
    _clear_earlier_output(out)
    os.makedirs(out, exist_ok=True)
    counts = collections.Counter()
    for image in images:
      image['file'] = f"{image['domain']}_{counts[image['domain']]}.jpg"
      counts[image['domain']] += 1
      with open(os.path.join(out, image['file']), 'wb') as f:
        f.write(image['jpeg'])
    with open(os.path.join(out, CSV_FILE), 'w', newline='') as f:
      table = csv.writer(f)
      table.writerow(_HEADER)
      table.writerows((i['file'], i['product_id'], i['category'], i['domain'], i['image_id'])
                      for i in images)
    contact_sheet(images).save(os.path.join(out, SHEET_FILE))
  except OSError as e:
    raise ShowError(f'cannot write to {out}: {e.strerror or e}') from None


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.limit < 1:
      raise ShowError(f'--limit must be at least 1, got {args.limit}')
    images = read_images(args.name, args.split, args.limit, args.data_dir)
    if not images:
      raise ShowError(f'{args.name} split {args.split!r} has no images')
    write(images, args.out)
  except ShowError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {len(images)} images, {CSV_FILE} and {SHEET_FILE} to {args.out}')
  return 0


if __name__ == '__main__':
  console.quiet_start(sys.argv)  # before TensorFlow loads
  console.set_verbosity(requested=False)
  sys.exit(main())
