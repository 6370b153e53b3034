"""Report pictures: ranked lists (each query with its top results, green when correct), CMC curves.

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


# Line colours of the CMC plot, one per curve in order.
CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
                 (140, 86, 75))


def cmc_image(curves: dict[str, np.ndarray], size: tuple[int, int] = (640, 420)) -> Image.Image:
  """CMC curves (Acc@r against rank r = 1..R) on one set of axes, with a legend.

  Args:
    curves: {name: [R] accuracies in [0, 1]} (NaN curves, with no evaluated query, are skipped).
    size: (width, height) in pixels.
  """
  width, height = size
  left, right, top, bottom = 50, 20, 20, 40
  sheet = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(sheet)
  plot_w, plot_h = width - left - right, height - top - bottom
  max_rank = max(len(c) for c in curves.values())
  to_x = lambda rank: left + plot_w * (rank - 1) / max(max_rank - 1, 1)
  to_y = lambda acc: top + plot_h * (1.0 - acc)
  for tick in range(0, 11, 2):
    y = to_y(tick / 10)
    draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
    draw.text((8, y - 6), f'{tick * 10}%', fill=(0, 0, 0))
  for rank in sorted({1, *range(10, max_rank + 1, 10), max_rank}):
    draw.text((to_x(rank) - 6, height - bottom + 6), str(rank), fill=(0, 0, 0))
  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  draw.text((left + plot_w // 2 - 15, height - 16), 'rank', fill=(0, 0, 0))
  legend = 0
  for (name, curve), colour in zip(curves.items(), CURVE_COLOURS * len(curves)):
    if np.isnan(curve).any():
      continue
    points = [(to_x(r + 1), to_y(a)) for r, a in enumerate(curve)]
    draw.line(points if len(points) > 1 else points * 2, fill=colour, width=2)
    y = height - bottom - 16 - 14 * legend
    draw.line([(width - right - 170, y + 6), (width - right - 150, y + 6)], fill=colour, width=2)
    draw.text((width - right - 145, y), f'{name}: rank-1 {100 * curve[0]:.1f}%', fill=(0, 0, 0))
    legend += 1
  return sheet


def roc_image(fpr: np.ndarray, tpr: np.ndarray, marks: dict[float, float],
              size: tuple[int, int] = (640, 420), min_fpr: float = 1e-6) -> Image.Image:
  """The ROC curve (TPR against FPR on a log axis from `min_fpr` to 1), with the operating
  points `marks` {fpr: tpr} labelled.

  Args:
    fpr, tpr: [B] non-decreasing rates (retrieval.verification's 'roc').
  """
  width, height = size
  left, right, top, bottom = 50, 20, 20, 40
  sheet = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(sheet)
  plot_w, plot_h = width - left - right, height - top - bottom
  decades = -np.log10(min_fpr)
  to_x = lambda f: left + plot_w * (np.log10(max(f, min_fpr)) + decades) / decades
  to_y = lambda t: top + plot_h * (1.0 - t)
  for tick in range(0, 11, 2):
    y = to_y(tick / 10)
    draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
    draw.text((8, y - 6), f'{tick * 10}%', fill=(0, 0, 0))
  for power in range(-int(decades), 1):
    x = to_x(10.0 ** power)
    draw.line([(x, top), (x, height - bottom)], fill=(235, 235, 235))
    draw.text((x - 12, height - bottom + 6), f'1e{power}' if power else '1', fill=(0, 0, 0))
  draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
  draw.text((left + plot_w // 2 - 60, height - 16), 'false positive rate', fill=(0, 0, 0))
  draw.text((left + 6, top + 4), 'true positive rate', fill=(0, 0, 0))
  keep = np.concatenate([[True], (np.diff(fpr) > 0) | (np.diff(tpr) > 0)])
  points = [(to_x(f), to_y(t)) for f, t in zip(fpr[keep], tpr[keep]) if f > 0]
  if points:
    draw.line(points if len(points) > 1 else points * 2, fill=CURVE_COLOURS[0], width=2)
  for number, (f, t) in enumerate(sorted(marks.items())):
    if np.isnan(t):
      continue
    x, y = to_x(f), to_y(t)
    draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=(0, 0, 0), width=2)
    draw.text((width - right - 190, height - bottom - 16 - 14 * number),
              f'TPR at FPR {f:g}: {100 * t:.1f}%', fill=(0, 0, 0))
  return sheet
