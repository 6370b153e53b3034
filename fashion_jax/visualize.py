"""Ranked-list pictures: each query with its top gallery results, framed green when correct.

Plain PIL on uint8 arrays, so it runs wherever the embeddings do.
"""

import numpy as np
from PIL import Image, ImageDraw

GREEN = (40, 170, 60)
RED = (210, 40, 40)
QUERY_FRAME = (60, 60, 60)


def _framed(image: np.ndarray, colour, border: int) -> Image.Image:
  tile = Image.fromarray(np.asarray(image, np.uint8))
  canvas = Image.new('RGB', (tile.width + 2 * border, tile.height + 2 * border), colour)
  canvas.paste(tile, (border, border))
  return canvas


def ranked_list_image(queries: list[np.ndarray], results: list[list[np.ndarray]],
                      correct: list[list[bool]], titles: list[str] | None = None,
                      border: int = 3, gap: int = 8) -> Image.Image:
  """One row per query: the query, a gap, then its results left to right.

  Args:
    queries: R images [H, W, 3] uint8 (one size for all images).
    results: R lists of result images, best first.
    correct: R lists of bools, True where the result shows the query's item.
    titles: optional R short captions drawn above each row (e.g. the query's AP).
  """
  height, width = queries[0].shape[:2]
  cell_w, cell_h = width + 2 * border, height + 2 * border
  caption = 12 if titles else 0
  columns = max(len(r) for r in results)
  sheet = Image.new('RGB', (cell_w * (columns + 1) + gap, (cell_h + caption) * len(queries)),
                    'white')
  draw = ImageDraw.Draw(sheet)
  for row, (query, row_results, row_correct) in enumerate(zip(queries, results, correct)):
    top = row * (cell_h + caption)
    if titles:
      draw.text((2, top), titles[row], fill=(0, 0, 0))
    sheet.paste(_framed(query, QUERY_FRAME, border), (0, top + caption))
    for col, (image, ok) in enumerate(zip(row_results, row_correct)):
      sheet.paste(_framed(image, GREEN if ok else RED, border),
                  (cell_w * (col + 1) + gap, top + caption))
  return sheet
