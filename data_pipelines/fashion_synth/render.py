"""Procedural garments rendered as studio shop photos and as cropped street photos.

Pure numpy + PIL (no TensorFlow): every image is a function of (seed, item id, domain, index).
"""

import dataclasses
import enum
import io

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# Street2Shop's category spellings; a config uses the first `num_categories` of them.
CATEGORIES = ('tops', 'dresses', 'pants', 'skirts', 'bags', 'hats', 'footwear')

# Garment colours. Categories draw their few colour families from here, so colour alone
# narrows an item down to a group of look-alikes rather than identifying it.
PALETTE = np.array([
    (32, 42, 84), (28, 28, 30), (232, 226, 214), (178, 34, 42), (204, 182, 150),
    (128, 128, 132), (108, 116, 52), (112, 26, 48), (228, 150, 170), (118, 168, 218),
    (212, 170, 44), (30, 120, 118), (52, 128, 64), (122, 80, 50),
], np.float32) / 255.0

SKIN_TONES = ((236, 200, 170), (200, 150, 110), (140, 96, 64), (90, 60, 40))

PATTERNS = ('plain', 'stripes', 'checks', 'dots')
LOGOS = ('circle', 'square', 'diamond', 'cross', 'triangle', 'ring')

# Where a print may sit on each category, as (x0, y0, x1, y1) in unit canvas coordinates.
_PRINT_REGIONS = {
    'tops': (0.36, 0.26, 0.64, 0.62), 'dresses': (0.40, 0.22, 0.60, 0.70),
    'pants': (0.32, 0.20, 0.68, 0.55), 'skirts': (0.36, 0.32, 0.64, 0.62),
    'bags': (0.30, 0.55, 0.70, 0.78), 'hats': (0.38, 0.30, 0.62, 0.46),
    'footwear': (0.30, 0.40, 0.70, 0.56),
}

_SUPERSAMPLE = 2  # silhouettes are drawn at this multiple and box-filtered for soft edges


class Stream(enum.IntEnum):
  """Separates the random streams so that no two uses of one seed share numbers."""
  ITEM = 0
  IMAGE = 1
  PALETTE = 2
  SPLIT = 3


def rng_for(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
  """A generator that depends only on its arguments, so build order cannot change images."""
  return np.random.default_rng([seed, int(stream), *keys])


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """Knobs for how hard retrieval is. Pairs are (low, high) ranges of uniform draws."""
  # Item appearance: fewer colour families and weaker shape variation -> more look-alikes.
  colour_families: int = 3
  colour_jitter: float = 0.04
  shape_jitter: float = 1.0
  pattern_frequency: tuple[float, float] = (2.5, 8.0)
  logo_prob: float = 0.6
  # Shop shots of one item differ by this much (0 = identical copies).
  shop_jitter: float = 1.0
  # Street photos: geometry of the garment in the scene.
  scene_scale: float = 2.0
  garment_scale: tuple[float, float] = (0.5, 0.9)
  rotation_deg: float = 20.0
  perspective: float = 0.12
  clutter_shapes: tuple[int, int] = (6, 16)
  occlusion_prob: float = 0.6
  occlusion_size: tuple[float, float] = (0.2, 0.5)
  # Street photos: photometric corruption.
  brightness: tuple[float, float] = (0.65, 1.25)
  illumination_gradient: float = 0.35
  colour_cast: float = 0.12
  blur_sigma: tuple[float, float] = (0.0, 1.2)
  noise_std: tuple[float, float] = (0.0, 0.04)
  jpeg_quality: tuple[int, int] = (25, 75)
  # Annotators' boxes are loose or tight by up to this fraction of the box side.
  box_jitter: float = 0.08


@dataclasses.dataclass(frozen=True, eq=False)
class Item:
  """Everything that identifies one product; images of it differ only in how it is shot."""
  item_id: int
  category: int
  shape: np.ndarray  # [4] float in [-1, 1] times shape_jitter: silhouette proportions
  base: np.ndarray  # [3] RGB in [0, 1]
  accent: np.ndarray  # [3] pattern colour
  trim: np.ndarray  # [3] collar/waistband/sole colour
  logo_colour: np.ndarray  # [3]
  pattern: str
  frequency: float  # pattern periods across the canvas
  angle: float  # radians
  phase: float
  duty: float  # share of a period in the accent colour
  logo: str | None
  logo_centre: tuple[float, float]  # (x, y) in unit canvas coordinates
  logo_size: float


def colour_families(seed: int, category: int, difficulty: Difficulty) -> np.ndarray:
  """Indices into PALETTE of the few colours that all items of a category are dyed in."""
  return rng_for(seed, Stream.PALETTE, category).choice(
      len(PALETTE), size=difficulty.colour_families, replace=False)


def sample_item(seed: int, item_id: int, category: int, difficulty: Difficulty) -> Item:
  """Draws a product's attributes; base and pattern colours come from its category's families."""
  rng = rng_for(seed, Stream.ITEM, item_id)
  families = colour_families(seed, category, difficulty)
  base_family, accent_family = rng.choice(families, size=2, replace=False)
  jitter = rng.normal(0.0, difficulty.colour_jitter, (2, 3)).astype(np.float32)
  base = np.clip(PALETTE[base_family] + jitter[0], 0.0, 1.0)
  accent = np.clip(PALETTE[accent_family] + jitter[1], 0.0, 1.0)
  trim = accent if rng.random() < 0.5 else base * 0.6
  x0, y0, x1, y1 = _PRINT_REGIONS[CATEGORIES[category]]
  return Item(
      item_id=item_id,
      category=category,
      shape=rng.uniform(-1.0, 1.0, 4) * difficulty.shape_jitter,
      base=base,
      accent=accent,
      trim=trim,
      logo_colour=PALETTE[rng.integers(len(PALETTE))],
      pattern=PATTERNS[rng.choice(len(PATTERNS), p=(0.16, 0.34, 0.25, 0.25))],
      frequency=float(rng.uniform(*difficulty.pattern_frequency)),
      angle=float(np.deg2rad(45.0 * rng.integers(4) + rng.normal(0.0, 8.0))),
      phase=float(rng.random()),
      duty=float(rng.uniform(0.3, 0.6)),
      logo=LOGOS[rng.integers(len(LOGOS))] if rng.random() < difficulty.logo_prob else None,
      logo_centre=(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))),
      logo_size=float(rng.uniform(0.06, 0.12)),
  )


def _mirror(left: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """Closes a left half-outline with its mirror image about x = 0.5 (points on it may repeat)."""
  return left + [(1.0 - x, y) for x, y in reversed(left)]


def _silhouette(category: str, s: np.ndarray) -> tuple[list, list]:
  """Drawing ops (kind, geometry, fill) for the garment body and its trim, unit coordinates."""
  a, b, c, d = 0.5 * s  # keeps items of a category recognisably the same garment
  if category == 'tops':
    w, hem, sleeve = 0.21 + 0.03 * a, 0.86 + 0.05 * b, 0.14 + 0.08 * c
    reach = np.array([-0.6, 0.8]) * sleeve  # sleeves hang down and outwards
    shoulder, armpit = np.array([0.47 - w, 0.14]), np.array([0.5 - w, 0.33])
    left = [(0.41, 0.11), tuple(shoulder), tuple(shoulder + reach), tuple(armpit + reach),
            tuple(armpit), (0.51 - w, hem)]
    body = [('poly', _mirror(left), 255), ('ellipse', (0.40, 0.04, 0.60, 0.19 + 0.03 * d), 0)]
    trim = [('ring', (0.38, 0.02, 0.62, 0.21 + 0.03 * d), 255),
            ('rect', (0.0, hem - 0.045, 1.0, hem), 255)]
  elif category == 'dresses':
    hem, flare = 0.90 + 0.05 * a, 0.30 + 0.07 * b
    left = [(0.5, 0.20 + 0.05 * c), (0.43, 0.07), (0.37, 0.07), (0.34, 0.28), (0.39, 0.42),
            (0.5 - flare, hem)]
    body = [('poly', _mirror(left), 255)]
    trim = [('rect', (0.0, 0.40 + 0.02 * d, 1.0, 0.45 + 0.02 * d), 255)]
  elif category == 'pants':
    hip, cuff = 0.27 - 0.02 * a, 0.30 - 0.05 * b
    inseam = (0.47 - 0.02 * c, 0.92)
    left = [(0.30, 0.08), (hip, 0.40), (cuff, 0.92), inseam, (0.5, 0.40 + 0.04 * d)]
    body = [('poly', _mirror(left), 255)]
    trim = [('rect', (0.0, 0.08, 1.0, 0.14), 255)]
  elif category == 'skirts':
    hem, flare = 0.78 + 0.06 * a, 0.32 + 0.07 * b
    body = [('poly', [(0.33, 0.18), (0.67, 0.18), (0.5 + flare, hem), (0.5 - flare, hem)], 255)]
    trim = [('rect', (0.0, 0.18, 1.0, 0.25 + 0.02 * c), 255)]
  elif category == 'bags':
    top, side = 0.40 + 0.04 * a, 0.18 - 0.04 * b
    handle = ('ring', (0.32 - 0.04 * c, 0.14, 0.68 + 0.04 * c, top + 0.25), 255)
    body = [('rounded', (side, top, 1.0 - side, 0.85), 255), handle]
    trim = [handle, ('poly', [(side, top), (1.0 - side, top), (0.5, top + 0.2 + 0.05 * d)], 255)]
  elif category == 'hats':
    crown, brim = 0.28 - 0.03 * a, 0.06 - 0.04 * b
    body = [('chord', (crown, 0.20 + 0.04 * c, 1.0 - crown, 0.95), 255),
            ('ellipse', (brim, 0.53, 1.0 - brim, 0.69), 255)]
    trim = [('rect', (0.0, 0.47, 1.0, 0.56), 255)]
  elif category == 'footwear':
    ankle = 0.28 + 0.04 * a
    outline = [(0.08, 0.66), (0.09, 0.52), (0.30, 0.47 + 0.03 * b), (0.45, ankle + 0.08),
               (0.50, ankle), (0.74, ankle - 0.02), (0.88, 0.36), (0.92, 0.50), (0.93, 0.66)]
    body = [('poly', outline, 255), ('rounded', (0.05, 0.60, 0.95, 0.70 + 0.02 * c), 255)]
    trim = [('rect', (0.0, 0.62, 1.0, 0.72), 255)]
  else:
    raise ValueError(f'unknown category {category!r}')
  return body, trim


def _draw(ops: list, n: int) -> Image.Image:
  """Rasterises drawing ops onto an n x n greyscale canvas."""
  img = Image.new('L', (n, n), 0)
  draw = ImageDraw.Draw(img)
  for kind, geometry, fill in ops:
    xy = [tuple(p) for p in np.asarray(geometry, np.float64).reshape(-1, 2) * n]
    if kind == 'poly':
      draw.polygon(xy, fill=fill)
    elif kind == 'ellipse':
      draw.ellipse(xy, fill=fill)
    elif kind == 'chord':
      draw.chord(xy, 180, 360, fill=fill)
    elif kind == 'rounded':
      draw.rounded_rectangle(xy, radius=0.06 * n, fill=fill)
    elif kind == 'ring':
      draw.ellipse(xy, outline=fill, width=max(1, round(0.05 * n)))
    elif kind == 'rect':
      draw.rectangle(xy, fill=fill)
  return img


def _unit_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [0, 1]: u as a [1, n] row, v as an [n, 1] column."""
  t = (np.arange(n, dtype=np.float32) + 0.5) / n
  return t[None, :], t[:, None]


def _texture(item: Item, n: int) -> np.ndarray:
  """The item's fabric over the whole canvas: [n, n, 3] float32."""
  u, v = _unit_grid(n)
  cos, sin = np.float32(np.cos(item.angle)), np.float32(np.sin(item.angle))
  p = ((u * cos + v * sin) * item.frequency + item.phase) % 1.0
  q = ((v * cos - u * sin) * item.frequency + item.phase) % 1.0
  if item.pattern == 'stripes':
    on = p < item.duty
  elif item.pattern == 'checks':
    on = (p < 0.5) ^ (q < 0.5)
  elif item.pattern == 'dots':
    on = (p - 0.5) ** 2 + (q - 0.5) ** 2 < (0.5 * item.duty) ** 2
  else:
    on = np.zeros((n, n), bool)
  rgb = np.where(on[..., None], item.accent, item.base)
  if item.logo is not None:
    dx, dy = np.abs(u - item.logo_centre[0]), v - item.logo_centre[1]
    r, size = np.hypot(dx, dy), item.logo_size
    far, near = np.maximum(dx, np.abs(dy)), np.minimum(dx, np.abs(dy))
    logo = {
        'circle': r < size,
        'ring': (r < size) & (r > 0.55 * size),
        'square': far < 0.85 * size,
        'diamond': dx + np.abs(dy) < 1.1 * size,
        'cross': (far < size) & (near < 0.3 * size),
        'triangle': (dy < 0.7 * size) & (2.0 * dx < dy + size),
    }[item.logo]
    rgb = np.where(logo[..., None], item.logo_colour, rgb)
  # Soft folds and a top-left key light make flat colour read as fabric.
  shade = 1.05 - 0.12 * (u + v) + 0.04 * np.sin(2 * np.pi * (3.0 * u + item.phase))
  return rgb * shade[..., None]


def render_garment(item: Item, n: int) -> Image.Image:
  """The item on a transparent n x n canvas (RGBA; colour is set under transparent pixels too)."""
  body_ops, trim_ops = _silhouette(CATEGORIES[item.category], item.shape)
  body = _draw(body_ops, n * _SUPERSAMPLE)
  trim = ImageChops.multiply(_draw(trim_ops, n * _SUPERSAMPLE), body)
  alpha = body.resize((n, n), Image.BOX)
  t = np.asarray(trim.resize((n, n), Image.BOX), np.float32)[..., None] / 255.0
  rgb = _texture(item, n) * (1.0 - t) + item.trim * t
  # Darkened seams along the outline separate the garment from similar backgrounds.
  edge = ImageChops.subtract(alpha, alpha.filter(ImageFilter.MinFilter(3)))
  rgb *= 1.0 - 0.4 / 255.0 * np.asarray(edge, np.float32)[..., None]
  img = Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), 'RGB')
  img.putalpha(alpha)
  return img


def _warp(img: Image.Image, out: int, centre: np.ndarray, angle: float,
          corner_shift: np.ndarray) -> Image.Image:
  """Projects an RGBA canvas into an out x out one: rotated, centred, corners displaced."""
  n = img.size[0]
  src = np.array([(0, 0), (n, 0), (n, n), (0, n)], np.float64)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  dst = (src - n / 2) @ rot.T + centre + corner_shift
  # PIL wants the homography from output to input pixels; solve for its 8 unknowns.
  rows, rhs = [], []
  for (x, y), (sx, sy) in zip(dst, src):
    rows += [[x, y, 1, 0, 0, 0, -x * sx, -y * sx], [0, 0, 0, x, y, 1, -x * sy, -y * sy]]
    rhs += [sx, sy]
  coeffs = np.linalg.solve(np.array(rows), np.array(rhs))
  return img.transform((out, out), Image.PERSPECTIVE, tuple(coeffs), Image.BILINEAR)


def render_shop(item: Item, size: int, view: int, rng: np.random.Generator,
                difficulty: Difficulty) -> np.ndarray:
  """A catalogue photo: the item centred on white. View 0 is the canonical front shot.

  Returns: [size, size, 3] uint8.
  """
  j = 0.0 if view == 0 else difficulty.shop_jitter
  n = round(size * (1.0 - j * rng.uniform(0.0, 0.12)))
  centre = size / 2 + j * rng.uniform(-0.04, 0.04, 2) * size
  angle = np.deg2rad(j * rng.uniform(-4.0, 4.0))
  shift = j * rng.uniform(-0.03, 0.03, (4, 2)) * n
  photo = Image.new('RGBA', (size, size), (255, 255, 255, 255))
  photo.alpha_composite(_warp(render_garment(item, n), size, centre, angle, shift))
  return np.asarray(photo.convert('RGB'))


def _clutter(rng: np.random.Generator, n: int, difficulty: Difficulty) -> Image.Image:
  """A busy street background: a lit gradient under random shapes, some in garment colours."""
  c0, c1 = rng.uniform(0.1, 0.9, (2, 3)).astype(np.float32)
  theta = rng.uniform(0, 2 * np.pi)
  # A linear gradient survives upsampling exactly, so it is computed on a coarse grid.
  u, v = _unit_grid(16)
  t = np.cos(theta) * (u - 0.5) + np.sin(theta) * (v - 0.5) + 0.71
  gradient = (c0 + (c1 - c0) * (t / 1.42)[..., None]) * 255.0
  img = Image.fromarray(gradient.astype(np.uint8), 'RGB').resize((n, n), Image.BILINEAR)
  draw = ImageDraw.Draw(img)
  for _ in range(rng.integers(*difficulty.clutter_shapes, endpoint=True)):
    colour = PALETTE[rng.integers(len(PALETTE))] if rng.random() < 0.5 else rng.random(3)
    fill = tuple(int(x) for x in colour * 255)
    x, y = rng.uniform(-0.1, 1.0, 2) * n
    w, h = rng.uniform(0.05, 0.45, 2) * n
    kind = rng.integers(4)
    if kind == 0:
      draw.rectangle((x, y, x + w, y + h), fill=fill)
    elif kind == 1:
      draw.ellipse((x, y, x + w, y + h), fill=fill)
    elif kind == 2:
      draw.line((x, y, x + w, y + h), fill=fill, width=int(rng.integers(1, max(2, n // 24))))
    else:
      draw.polygon([tuple(p) for p in rng.uniform(0, 1, (3, 2)) * (w, h) + (x, y)], fill=fill)
  return img


def _occlude(img: Image.Image, box: np.ndarray, rng: np.random.Generator,
             difficulty: Difficulty) -> None:
  """Covers part of the garment with an arm or a passing object, in place."""
  y0, x0, y1, x1 = box
  h, w = y1 - y0, x1 - x0
  f = rng.uniform(*difficulty.occlusion_size)
  cy, cx = y0 + rng.random() * h, x0 + rng.random() * w
  skin = rng.random() < 0.5
  fill = SKIN_TONES[rng.integers(len(SKIN_TONES))] if skin else tuple(
      int(x) for x in rng.integers(0, 256, 3))
  draw = ImageDraw.Draw(img)
  if skin:  # an arm reaching in from outside the box, ending in a hand
    direction = rng.uniform(0, 2 * np.pi)
    far = (cx + 2 * w * np.cos(direction), cy + 2 * h * np.sin(direction))
    draw.line((cx, cy) + far, fill=fill, width=max(1, int(f * min(h, w) * 0.7)))
    draw.ellipse((cx - f * w / 3, cy - f * h / 3, cx + f * w / 3, cy + f * h / 3), fill=fill)
  else:
    draw.ellipse((cx - f * w / 2, cy - f * h / 2, cx + f * w / 2, cy + f * h / 2), fill=fill)


def render_street(item: Item, size: int, rng: np.random.Generator,
                  difficulty: Difficulty) -> tuple[np.ndarray, np.ndarray]:
  """A user photo of the item in a cluttered scene, cropped to an annotator's box.

  Args:
    size: the shop image side; the scene is `difficulty.scene_scale` times larger.
  Returns:
    crop: [h, w, 3] uint8, the scene inside the annotated box, JPEG-degraded.
    bbox: [4] float32, that box in the scene as normalized [ymin, xmin, ymax, xmax].
  """
  d = difficulty
  scene_n = round(size * d.scene_scale)
  n = max(8, round(size * rng.uniform(*d.garment_scale)))
  reach = min(0.75 * n * (1.0 + d.perspective), scene_n / 2)  # keeps the garment in frame
  centre = rng.uniform(reach, scene_n - reach, 2)
  angle = np.deg2rad(rng.uniform(-d.rotation_deg, d.rotation_deg))
  shift = rng.uniform(-d.perspective, d.perspective, (4, 2)) * n
  layer = _warp(render_garment(item, n), scene_n, centre, angle, shift)
  scene = _clutter(rng, scene_n, d).convert('RGBA')
  scene.alpha_composite(layer)
  scene = scene.convert('RGB')

  ys, xs = np.nonzero(np.asarray(layer.getchannel('A')) > 127)
  box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float64)
  if rng.random() < d.occlusion_prob:
    _occlude(scene, box, rng, d)
  side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
  annotated = np.round(box + rng.uniform(-d.box_jitter, d.box_jitter, 4) * side)
  y0, x0 = np.clip(annotated[:2], 0, scene_n - 2).astype(int)
  y1, x1 = np.clip(annotated[2:], (y0 + 2, x0 + 2), scene_n).astype(int)

  # Only the annotated region is kept, so blur and light just it (plus a margin for the blur).
  sigma = rng.uniform(*d.blur_sigma)
  m = int(np.ceil(3 * sigma)) + 1
  top, left = max(0, y0 - m), max(0, x0 - m)
  region = scene.crop((left, top, min(scene_n, x1 + m), min(scene_n, y1 + m)))
  region = np.asarray(region.filter(ImageFilter.GaussianBlur(sigma)), np.float32)
  rgb = region[y0 - top:y1 - top, x0 - left:x1 - left] / 255.0
  u, v = _unit_grid(scene_n)
  light = rng.uniform(-1.0, 1.0, 2) * d.illumination_gradient
  gain = rng.uniform(*d.brightness) * (
      1.0 + light[0] * (u[:, x0:x1] - 0.5) + light[1] * (v[y0:y1] - 0.5))
  cast = 1.0 + rng.uniform(-d.colour_cast, d.colour_cast, 3)
  noise = rng.normal(0.0, rng.uniform(*d.noise_std), rgb.shape)
  rgb = rgb * (gain[..., None] * cast) + noise

  crop = Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
  buffer = io.BytesIO()
  crop.save(buffer, 'JPEG', quality=int(rng.integers(*d.jpeg_quality, endpoint=True)))
  crop = np.asarray(Image.open(buffer).convert('RGB'))
  return crop, np.array([y0, x0, y1, x1], np.float32) / scene_n
