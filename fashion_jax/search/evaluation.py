"""How well an index finds the right product for labelled photos: `search evaluate`.

The training evaluation ranks the test split's gallery images with the exact engine. This
measures what a shop serves instead: its own catalogue, as indexed (float16 vectors, the
chosen backend, centroids), ranked by product, for its own labelled street photos. So it also
shows what an approximate backend or centroids cost against the exact one.

Per query the right product's rank among the k returned (or none), then over the queries whose
product is in the index: Acc@n (the share with the right product in the first n) and MRR@k
(the mean of 1 / rank, 0 when it is not returned), overall and per category.
"""

import numpy as np

from fashion_jax import console
from fashion_jax.search import images as image_io

_CUTOFFS = (1, 5, 10, 20, 50, 100)
_CHUNK = 256  # photos decoded and embedded at a time: memory stays bounded


def evaluate(searcher, queries: list[dict], *, k: int, filter_by_category: bool = False,
             progress: bool = True) -> dict:
  """queries: [{'path', 'box', 'category', 'product_id', 'row'}] -> {'overall', 'categories',
  'queries', 'left_out', 'unusable'}: the figures (`metrics`); per query its rank (None when
  the product was not returned) and the products returned first; the photos that could not be
  read or cropped (row, path, error), which are left out of the figures."""
  in_index = set(np.asarray(searcher.latest_index.product_ids)[
      searcher.latest_index.product_live])
  rows, left_out, unusable = [], 0, []
  bar = console.bar(total=len(queries), desc='evaluating', unit='photo', enabled=progress,
                    leave=False)
  try:
    for start in range(0, len(queries), _CHUNK):
      chunk, crops = [], []
      for query in queries[start:start + _CHUNK]:
        try:
          crops.append(image_io.crop(image_io.read(query['path'], max_pixels=searcher.max_pixels),
                                     query['box'], name=query['path']))
          chunk.append(query)
        except image_io.InputError as error:  # counted and named; the others are measured
          unusable.append({'row': query.get('row'), 'query': query['path'],
                           'error': image_io.one_line(error)})
      bar.update(len(queries[start:start + _CHUNK]) - len(chunk))
      if not chunk:
        continue
      embeddings = searcher.model.embed_crops(crops)
      del crops
      groups = {}
      for number, query in enumerate(chunk):
        groups.setdefault(query['category'] if filter_by_category else None, []).append(number)
      found = [None] * len(chunk)
      for category, numbers in groups.items():
        for number, results in zip(numbers, searcher.search_embeddings(
            embeddings[numbers], k=k, category=category)):
          found[number] = [result['product_id'] for result in results]
      for query, products in zip(chunk, found):
        if query['product_id'] not in in_index:
          left_out += 1
          continue
        rank = products.index(query['product_id']) + 1 if query['product_id'] in products else None
        rows.append({'query': query['path'], 'box': list(query['box']) if query['box'] else None,
                     'category': query['category'], 'product_id': query['product_id'],
                     'rank': rank, 'returned': products[:10]})
      bar.update(len(chunk))
  finally:
    bar.close()
  if not rows:
    raise image_io.InputError(f'nothing to measure: of {len(queries)} labelled photos, '
                              f'{left_out} are of products the index does not hold and '
                              f'{len(unusable)} could not be used' +
                              (f" (row {unusable[0]['row']}: {unusable[0]['error']})"
                               if unusable else ''))
  categories = sorted({row['category'] for row in rows if row['category']})
  return {'k': k, 'filter_by_category': filter_by_category, 'left_out': left_out,
          'unusable': unusable,
          'overall': metrics([row['rank'] for row in rows], k),
          'categories': {category: metrics([row['rank'] for row in rows
                                            if row['category'] == category], k)
                         for category in categories},
          'queries': rows}


def metrics(ranks: list[int | None], k: int) -> dict:
  """{'queries', 'Acc@n' for each cutoff n <= k, 'MRR@k'} of the right products' ranks."""
  found = np.asarray([rank if rank is not None else 0 for rank in ranks], np.int64)
  figures = {'queries': len(ranks)}
  if not len(ranks):
    return figures
  for cutoff in [c for c in _CUTOFFS if c <= k] + ([k] if k not in _CUTOFFS else []):
    figures[f'Acc@{cutoff}'] = float(np.mean((found >= 1) & (found <= cutoff)))
  figures[f'MRR@{k}'] = float(np.mean(np.where(found >= 1, 1.0 / np.maximum(found, 1), 0.0)))
  return figures


def summary(result: dict) -> list[str]:
  """The figures as lines for the console."""
  def line(figures):
    return '  '.join(f'{name} {value:.3f}' for name, value in figures.items()
                     if name != 'queries')

  overall = result['overall']
  lines = [f"{overall['queries']} queries, k={result['k']}" +
           (f" ({result['left_out']} left out: their product is not in the index)"
            if result['left_out'] else '') +
           (f" ({len(result['unusable'])} photos could not be used, the first at row "
            f"{result['unusable'][0]['row']}: {result['unusable'][0]['error']})"
            if result['unusable'] else '') +
           (', each searched within its category' if result['filter_by_category'] else ''),
           '  ' + line(overall)]
  for category, figures in result['categories'].items():
    lines.append(f"  {category} ({figures['queries']}): {line(figures)}")
  return lines
