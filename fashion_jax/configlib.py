"""Defaults shared by every experiment config, each field's domain, and the checks that run
before any compilation.

Experiment files in `configs/` start from `base_config()` and change what differs.
"""

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable, Sequence

import ml_collections
from ml_collections.config_flags import config_path

from fashion_jax import evaluators, objective, optim
from fashion_jax import preprocessing
from fashion_jax.models import reid, vit
from fashion_jax.models.backbones import backbone_names, check_options, get_backbone

MODES = ('train_and_evaluate', 'train', 'evaluate')
# Computation dtypes (model.dtype) and the dtypes retrieval ranks in (eval.dtype).
DTYPES = ('float32', 'bfloat16', 'float16')


def base_config() -> ml_collections.ConfigDict:
  """The paper's settings (docs/method.md): ResNet50-IBN-A, last stride 1, 320x320, RST schedule."""
  c = ml_collections.ConfigDict()
  c.mode = 'train_and_evaluate'
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = ''            # TFDS name, e.g. 'street2shop' or 'fashion_synth/demo'
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default
  c.dataset.train_split = 'train'
  c.dataset.query_split = 'query'
  c.dataset.gallery_split = 'gallery'

  c.input = ml_collections.ConfigDict()
  c.input.image_size = (320, 320)  # (height, width); multiples of 16
  # How a stored crop becomes image_size, and with which filter: one of
  # preprocessing.RESIZE_MODES and one of RESIZE_FILTERS (preprocessing.py says what each does).
  c.input.resize_mode = preprocessing.DEFAULT_RESIZE_MODE
  c.input.resize_filter = preprocessing.DEFAULT_RESIZE_FILTER
  c.input.flip_prob = 0.5
  c.input.pad = 10
  c.input.erasing_prob = 0.5
  c.input.erasing_area = (0.02, 0.4)
  c.input.erasing_aspect = 0.3      # aspect ratios in [0.3, 1 / 0.3]
  # Flip, pad + crop and erasing inside the jitted step (fashion_jax/augment.py) instead of on
  # the host, which then only decodes and resizes: the same distribution, other draws.
  c.input.augment_on_device = False
  c.input.shuffle_buffer = 2048     # identities
  # Independent identity streams concatenated into each batch; None: one per process. Fix it
  # to get the same batches whatever the number of processes (e.g. when moving hosts).
  c.input.num_shards = ml_collections.config_dict.placeholder(int)
  c.input.prefetch = 2              # batches kept on the device ahead of the step

  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'resnet50_ibn_a'
  c.model.last_stride = 1
  c.model.width = 64
  c.model.dtype = 'float32'         # computation dtype; parameters stay float32
  c.model.sync_batch_norm = False   # per-device statistics, as a single-GPU PyTorch run
  # Stochastic depth, EfficientNet and ViTs: block i of N skips its branches with probability
  # rate * i / N in training (EfficientNet; torchvision trains ImageNet ones with 0.2), rate *
  # i / (N - 1) for ViTs (timm's rule; DeiT-B uses 0.1).
  c.model.drop_path_rate = 0.0
  # ViTs: 'cudnn' computes attention with cuDNN's fused flash attention on NVIDIA GPUs in
  # bfloat16 or float16 (XLA's elsewhere); 'xla' with XLA's everywhere. Same weights either way.
  c.model.attention = 'xla'
  # How the backbone's output becomes the global feature: '' for the backbone's own (global
  # average pooling for CNNs, the class token for ViTs), or one it offers ('token', 'mean').
  c.model.pool = ''
  # Converted ImageNet weights for the backbone (`python -m fashion_jax.convert_weights`);
  # None trains from scratch. A resumed run restores its checkpoint over them.
  c.model.pretrained = ml_collections.config_dict.placeholder(str)

  c.loss = ml_collections.ConfigDict()
  # The classification term on f_i: 'cross_entropy' (the paper: a linear classifier), or a
  # cosine classifier on the same weights with a margin on the true class, 'cosface' or
  # 'arcface' (docs/method.md section 10), its cosines scaled by id_scale.
  c.loss.identity = 'cross_entropy'
  c.loss.id_scale = 30.0
  c.loss.cosface_margin = 0.35      # subtracted from the true class's cosine
  c.loss.arcface_margin = 0.5       # radians, added to the true class's angle
  # Of the classification term, whichever it is; 0 suits the margins (docs/method.md section 10).
  c.loss.label_smoothing = 0.1
  # 'triplet', 'quadruplet', 'centroid_triplet' (triplet + centroid triplet loss, docs/method.md
  # section 8) or 'none' (classification only)
  c.loss.metric = 'triplet'
  c.loss.triplet_margin = 0.3       # also the centroid triplet loss's margin
  c.loss.quadruplet_margins = (0.3, 0.15)
  c.loss.center_weight = 5e-4       # beta
  c.loss.center_lr = 0.5
  # Weights of the cross-entropy, of the loss.metric term and of the centroid triplet loss (read
  # only with loss.metric='centroid_triplet'); 1 in the papers.
  c.loss.id_weight = 1.0
  c.loss.metric_weight = 1.0
  c.loss.centroid_weight = 1.0

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 3.5e-4
  c.optim.weight_decay = 5e-4
  c.optim.warmup_epochs = 10
  c.optim.warmup_factor = 0.01
  c.optim.milestones = (40, 70)
  c.optim.gamma = 0.1
  # 'adam': coupled L2 decay on every parameter (the strong baseline); 'adamw': decoupled decay,
  # none on norms, biases, position embeddings and tokens (the ViT fine-tuning recipe).
  c.optim.optimizer = 'adam'
  # 'multistep': warmup, then x gamma at each milestone, per epoch; 'cosine': per step, warmup,
  # then half a cosine to final_lr_factor x base_lr at the end of epoch cosine_epochs (set it to
  # train.num_epochs).
  c.optim.schedule = 'multistep'
  c.optim.cosine_epochs = 120
  c.optim.final_lr_factor = 0.0
  # Layer-wise learning-rate decay, ViTs only: block i of L learns at layer_decay ** (L - i)
  # times the head's rate, the embeddings at layer_decay ** (L + 1); 1 switches it off.
  c.optim.layer_decay = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64           # global P x K
  c.train.k = 4                     # images per identity
  c.train.num_epochs = 120
  c.train.steps_per_epoch = ml_collections.config_dict.placeholder(int)  # None: identities / P
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.keep_checkpoints = 3
  c.train.eval_every_epochs = 40
  c.train.allow_config_change = False  # resume a workdir whose config.json differs

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.ks = (1, 5, 10, 20, 50)
  c.eval.num_ranked_queries = 8     # rows in the ranked-list PNG
  c.eval.top_k_shown = 10
  # Queries per jitted retrieval call; None: the most (up to 1,024) whose distances fit in
  # 256 MB per CPU device or 2 GB per accelerator.
  c.eval.chunk_size = ml_collections.config_dict.placeholder(int)
  c.eval.gallery_chunk_size = 2048  # gallery items per block; memory ~ chunk x block
  c.eval.dtype = 'float32'          # embeddings for retrieval: float32, bfloat16 or float16
  # Test-time flip: each image embedded as the normalised sum of f_i of the image and of its
  # mirror image (twice the embedding cost); the paper does not. The search tool follows it.
  c.eval.flip = False
  c.eval.query_domain = ''          # domain filter by name, e.g. 'street'; '' keeps all
  c.eval.gallery_domain = ''        # e.g. 'shop'
  # Evaluators run, in order (registered names, evaluators.EVALUATORS); each switch below that is
  # on appends the evaluator of its name. 'retrieval' (the top-level mAP / Acc@k, ranked lists)
  # must be listed; 'verification' (TPR at FPR over all pairs, roc.png) runs by default. An
  # evaluator reads its options from this block (docs/retrieval.md).
  c.eval.evaluators = ('retrieval', 'verification')
  c.eval.verification_fprs = (1e-4, 1e-3, 1e-2)  # the FPRs whose TPR 'verification' reports
  c.eval.per_category = False       # category-constrained retrieval, table + average
  c.eval.rerank = False             # k-reciprocal re-ranking (docs/method.md section 6)
  c.eval.rerank_k1 = 20
  c.eval.rerank_k2 = 6
  c.eval.rerank_lambda = 0.3
  c.eval.centroids = False          # gallery averaged per item (docs/method.md section 8)
  c.eval.recommendation = False     # gallery against itself (shop->shop), self excluded
  # Average query expansion (docs/method.md section 9): each query replaced by the normalised
  # mean of itself and its k nearest gallery items weighted by similarity^alpha, ranked again
  # (and re-ranked too when eval.rerank is on).
  c.eval.query_expansion = False
  c.eval.query_expansion_k = 2
  c.eval.query_expansion_alpha = 3.0
  c.eval.cmc_max_rank = 50          # CMC curve length
  # Cross-domain evaluation (docs/method.md section 5): test on another dataset's query and gallery
  # splits, e.g. 'street2shop' for a model trained on DeepFashion. '' tests on the training
  # dataset. Reports go to <workdir>/eval/<dataset>/.
  c.eval.dataset = ''
  c.eval.data_dir = ml_collections.config_dict.placeholder(str)  # None: dataset.data_dir
  return c


def clip_vit_config(dataset: str) -> ml_collections.ConfigDict:
  """base_config() with the ViT fine-tuning recipe of configs/*_vit.py on `dataset`: ViT-B/16
  from OpenAI's CLIP image tower at 256x256, AdamW with layer-wise learning-rate decay 0.75,
  5 warmup epochs then a cosine over 60 epochs, the paper's losses, bfloat16 compute."""
  c = base_config()
  c.dataset.name = dataset
  c.input.image_size = (256, 256)   # 16 x 16 patches; the 14 x 14 CLIP grid is resampled
  c.model.backbone = 'vit_b16_clip_quickgelu'
  c.model.pretrained = 'weights/vit_b16_clip_openai'
  c.model.dtype = 'bfloat16'
  c.model.drop_path_rate = 0.1
  c.loss.metric = 'quadruplet'
  c.train.batch_size = 64
  c.train.num_epochs = 60
  c.train.eval_every_epochs = 20
  c.optim.optimizer = 'adamw'
  c.optim.schedule = 'cosine'
  c.optim.cosine_epochs = c.train.num_epochs
  c.optim.base_lr = 1e-4            # the head's; block i of 12 gets 0.75 ** (12 - i) of it
  c.optim.layer_decay = 0.75
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 5
  c.optim.final_lr_factor = 0.01
  return c


@dataclasses.dataclass(frozen=True)
class Domain:
  """What one config field may hold.

  kind: int, float (an int too; finite), bool, str or tuple; None only when `nullable`.
  gt, ge, lt, le, multiple_of: bounds of a number. min_length: of a string or a tuple.
  choices: the values allowed, or a function returning them (a registry's names, read when
    checking, so that a backbone or a loss registered after this module loads is allowed).
  A tuple: `item` is its items' domain, `length` its length (None: any, at least min_length),
  `increasing` keeps its items in non-decreasing order. why: said after what is allowed.
  """
  kind: type
  gt: float | None = None
  ge: float | None = None
  lt: float | None = None
  le: float | None = None
  multiple_of: int | None = None
  choices: Sequence | Callable[[], Sequence] | None = None
  min_length: int = 0
  length: int | None = None
  item: 'Domain | None' = None
  increasing: bool = False
  nullable: bool = False
  why: str = ''

  def allowed(self) -> tuple:
    return tuple(self.choices() if callable(self.choices) else self.choices)

  def problem(self, field: str, value) -> str | None:
    """One line saying why `field` cannot hold `value`; None when it can."""
    why = f' ({self.why})' if self.why else ''
    if value is None and self.nullable:
      return None
    if self.kind is tuple:
      if not self._holds_tuple(value):
        return f'{field} must be {self._tuple_text()}{why}, got {value!r}'
    elif not self._holds_kind(value):
      return f'{field} must be {self._kind_text()}, got {value!r}'
    elif self.choices is not None and value not in self.allowed():
      return f'{field} {value!r} is not one of {", ".join(map(str, self.allowed()))}'
    elif not self._in_bounds(value):
      return f'{field} must be {self._bounds_text()}{why}, got {value!r}'
    return None

  def _holds_kind(self, value) -> bool:
    if self.kind in (bool, str):
      return isinstance(value, self.kind)
    # bool is an int to Python, never to a config.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return False
    return isinstance(value, numbers.Integral) or (self.kind is float and math.isfinite(value))

  def _in_bounds(self, value) -> bool:
    if self.kind is str:
      return len(value) >= self.min_length
    return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le)
            and (self.multiple_of is None or value % self.multiple_of == 0))

  def _holds_tuple(self, value) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) >= self.min_length
            and (self.length is None or len(value) == self.length)
            and all(self.item.problem('', v) is None for v in value)
            and (not self.increasing or list(value) == sorted(value)))

  def _kind_text(self, plural: bool = False) -> str:
    text = {int: ('an integer', 'integers'), float: ('a finite number', 'finite numbers'),
            bool: ('True or False', 'booleans'), str: ('a string', 'strings')}[self.kind][plural]
    return f'{text} or None' if self.nullable else text

  def _bounds_text(self) -> str:
    if self.kind is str:
      return 'non-empty' if self.min_length else ''
    bounds = [(op, bound) for op, bound in (('>', self.gt), ('>=', self.ge), ('<', self.lt),
                                            ('<=', self.le)) if bound is not None]
    if len(bounds) == 2:  # a low and a high bound: an interval
      (low_op, low), (high_op, high) = bounds
      parts = [f'in {"(" if low_op == ">" else "["}{low}, {high}{")" if high_op == "<" else "]"}']
    elif bounds == [('>', 0)]:
      parts = ['positive']
    else:
      parts = [f'{op} {bound}' for op, bound in bounds]
    if self.multiple_of is not None:
      parts.append(f'a multiple of {self.multiple_of}')
    return ' and '.join(parts)

  def _tuple_text(self) -> str:
    if self.length is not None:
      text = f'a tuple of {self.length} '
    else:
      text = 'a non-empty tuple of ' if self.min_length else 'a tuple of '
    text += self.item._kind_text(plural=True)
    if each := self.item._bounds_text():
      text += f', each {each}'
    return text + (', in increasing order' if self.increasing else '')


_POSITIVE_INT = Domain(int, gt=0)
_COUNT = Domain(int, ge=0)
_PROBABILITY = Domain(float, ge=0, le=1)
_NAME = Domain(str, min_length=1)
_OPTIONAL_PATH = Domain(str, min_length=1, nullable=True)

# Every field of base_config() and what it may hold; tests/test_config.py walks them all with
# values outside. Checks involving several fields (batch layout, devices, a backbone's options)
# are validate_config's.
FIELDS: dict[str, Domain] = {
    'mode': Domain(str, choices=MODES),
    'seed': Domain(int, ge=0, le=2**31 - 1),
    'dataset.name': Domain(str, min_length=1, why='a TFDS name, e.g. fashion_synth/demo'),
    'dataset.data_dir': _OPTIONAL_PATH,
    'dataset.train_split': _NAME,
    'dataset.query_split': _NAME,
    'dataset.gallery_split': _NAME,
    'input.image_size': Domain(tuple, length=2, item=Domain(int, gt=0, multiple_of=16),
                               why='height, width'),
    'input.resize_mode': Domain(str, choices=preprocessing.RESIZE_MODES),
    'input.resize_filter': Domain(str, choices=preprocessing.RESIZE_FILTERS),
    'input.flip_prob': _PROBABILITY,
    'input.pad': _COUNT,
    'input.erasing_prob': _PROBABILITY,
    'input.erasing_area': Domain(tuple, length=2, item=_PROBABILITY, increasing=True,
                                 why='fractions of the image area'),
    'input.erasing_aspect': Domain(float, ge=0.01, le=1,
                                    why='aspect ratios in [a, 1 / a]'),
    'input.augment_on_device': Domain(bool),
    'input.shuffle_buffer': _POSITIVE_INT,
    'input.num_shards': Domain(int, gt=0, nullable=True),
    'input.prefetch': _COUNT,
    'model.backbone': Domain(str, choices=backbone_names),
    'model.last_stride': Domain(int, choices=(1, 2)),
    'model.width': _POSITIVE_INT,
    'model.dtype': Domain(str, choices=DTYPES),
    'model.sync_batch_norm': Domain(bool),
    'model.drop_path_rate': Domain(float, ge=0, lt=1),
    'model.attention': Domain(str, choices=vit.ATTENTION),
    'model.pool': Domain(str),
    'model.pretrained': _OPTIONAL_PATH,
    'loss.identity': Domain(str, choices=lambda: tuple(objective.IDENTITY)),
    'loss.id_scale': Domain(float, gt=0),
    'loss.cosface_margin': Domain(float, ge=0, lt=2, why='cosines differ by at most 2'),
    'loss.arcface_margin': Domain(float, ge=0, lt=math.pi / 2, why='radians, below pi/2'),
    'loss.label_smoothing': Domain(float, ge=0, lt=1),
    'loss.metric': Domain(str, choices=lambda: tuple(objective.METRICS)),
    'loss.triplet_margin': Domain(float, ge=0),
    'loss.quadruplet_margins': Domain(tuple, length=2, item=Domain(float, ge=0)),
    'loss.center_weight': Domain(float, ge=0, why='0 switches the center loss off'),
    'loss.center_lr': Domain(float, gt=0),
    'loss.id_weight': Domain(float, ge=0),
    'loss.metric_weight': Domain(float, ge=0),
    'loss.centroid_weight': Domain(float, ge=0),
    'optim.base_lr': Domain(float, gt=0),
    'optim.weight_decay': Domain(float, ge=0),
    'optim.warmup_epochs': _COUNT,
    'optim.warmup_factor': Domain(float, ge=0, le=1, why='of base_lr, at the first epoch'),
    'optim.milestones': Domain(tuple, item=_COUNT),
    'optim.gamma': Domain(float, gt=0, le=1, why='the learning rate decays at each milestone'),
    'optim.optimizer': Domain(str, choices=optim.OPTIMIZERS),
    'optim.schedule': Domain(str, choices=optim.SCHEDULES),
    'optim.cosine_epochs': _POSITIVE_INT,
    'optim.final_lr_factor': Domain(float, ge=0, le=1, why='of base_lr, at the end of the cosine'),
    'optim.layer_decay': Domain(float, gt=0, le=1, why='1 switches it off'),
    'train.batch_size': _POSITIVE_INT,
    'train.k': Domain(int, ge=2, why='batch-hard mining needs a positive'),
    'train.num_epochs': _COUNT,
    'train.steps_per_epoch': Domain(int, gt=0, nullable=True),
    'train.log_every_steps': _POSITIVE_INT,
    'train.checkpoint_every_steps': _POSITIVE_INT,
    'train.keep_checkpoints': _POSITIVE_INT,
    'train.eval_every_epochs': _POSITIVE_INT,
    'train.allow_config_change': Domain(bool),
    'eval.batch_size': _POSITIVE_INT,
    'eval.ks': Domain(tuple, min_length=1, item=_POSITIVE_INT),
    'eval.num_ranked_queries': _COUNT,
    'eval.top_k_shown': _POSITIVE_INT,
    'eval.chunk_size': Domain(int, gt=0, nullable=True),
    'eval.gallery_chunk_size': _POSITIVE_INT,
    'eval.dtype': Domain(str, choices=DTYPES),
    'eval.flip': Domain(bool),
    'eval.query_domain': Domain(str),
    'eval.gallery_domain': Domain(str),
    # Which names are registered, listed once and with 'retrieval': evaluators.check_config.
    'eval.evaluators': Domain(tuple, min_length=1, item=_NAME),
    'eval.per_category': Domain(bool),
    'eval.rerank': Domain(bool),
    'eval.rerank_k1': _POSITIVE_INT,
    'eval.rerank_k2': _POSITIVE_INT,
    'eval.rerank_lambda': _PROBABILITY,
    'eval.centroids': Domain(bool),
    'eval.recommendation': Domain(bool),
    'eval.query_expansion': Domain(bool),
    'eval.query_expansion_k': Domain(int, ge=1),
    'eval.query_expansion_alpha': Domain(float, ge=0),
    'eval.verification_fprs': Domain(tuple, min_length=1, item=Domain(float, gt=0, le=1),
                                     increasing=True),
    'eval.cmc_max_rank': _POSITIVE_INT,
    'eval.dataset': Domain(str),
    'eval.data_dir': _OPTIONAL_PATH,
}
_MISSING = object()


def field_paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """The dotted name of every field of `config` (not of its sections), e.g. 'train.batch_size'."""
  paths = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += field_paths(value, f'{prefix}{key}.')
    else:
      paths.append(prefix + key)
  return paths


def _value(config: ml_collections.ConfigDict, field: str):
  *sections, key = field.split('.')
  for section in sections:
    config = config.get(section)
    if not isinstance(config, ml_collections.ConfigDict):
      return _MISSING
  return config[key] if key in config else _MISSING


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, one line, naming each field whose value is outside its domain in FIELDS:
  `<field> must be <what is allowed>, got <value>` (or `<field> <value> is not one of ...`).

  Only the fields FIELDS declares are checked. A declared field the config lacks is skipped: its
  reader takes the default, as for a config.json written before the field existed. A field FIELDS
  does not declare is left to whoever reads it: an experiment config's own, or an extension's
  option (a registered loss's `loss.proxy_lr`, an evaluator's under `eval`). A misspelt field
  therefore passes here; the command line refuses it (check_field_name), since a config there is
  locked and an override must name a field it has.
  """
  problems = []
  for field, domain in FIELDS.items():
    value = _value(config, field)
    if value is not _MISSING and (problem := domain.problem(field, value)):
      problems.append(problem)
  if problems:
    raise ValueError('; '.join(problems))


def check_field_name(config: ml_collections.ConfigDict, name: str) -> None:
  """Raises a one-line ValueError when `name` (of a command-line override, 'train.batch_size',
  read as ml_collections reads it) is no field of `config`, naming the closest field."""
  try:
    config_path.get_value(name, config)
  except (AttributeError, KeyError, IndexError, ValueError):
    close = difflib.get_close_matches(name, field_paths(config), n=1)
    hint = f'; did you mean {close[0]}?' if close else ''
    raise ValueError(f'the config has no field {name}{hint}') from None


def set_none(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets field `name` to None, as `--config.<name>=None` asks (ml_collections alone reads the
  word as a string, 'None', or refuses it for a number). Raises a one-line ValueError for a field
  the config lacks or one that may not be None."""
  check_field_name(config, name)
  if name in FIELDS and (problem := FIELDS[name].problem(name, None)):
    raise ValueError(problem)
  config_path.set_value(name, config, None)


def unknown_fields(config: ml_collections.ConfigDict) -> list[str]:
  """One line for each field of `config` that no part of the project reads (a config file's
  misspelling, `c.train.num_epoch = 1`), naming the closest field. Not an error: an evaluator
  of one's own may read options of its own from config.eval."""
  lines = []
  for name in field_paths(config):
    if name not in FIELDS:
      close = difflib.get_close_matches(name, list(FIELDS), n=1)
      hint = f' (did you mean {close[0]}?)' if close else ''
      lines.append(f'config field {name} is none of the project\'s{hint}; only an evaluator of '
                   'your own would read it')
  return lines


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int,
                    num_processes: int = 1) -> None:
  """Raises ValueError with a one-line message for a config that cannot run. No compilation.

  Each field against its domain first (check_fields), then what involves several fields.
  """
  check_fields(config)
  check_options(config.model.backbone, width=config.model.get('width', 64),
                drop_path_rate=config.model.get('drop_path_rate', 0.0),
                attention=config.model.get('attention', 'xla'))
  backbone = get_backbone(config.model.backbone)
  reid.pooling(config.model.backbone, config.model.get('pool', ''))
  if config.optim.get('layer_decay', 1.0) != 1.0 and backbone.family != 'vit':
    raise ValueError(f'optim.layer_decay applies to the ViT backbones (built of blocks), not '
                     f'{config.model.backbone}; leave it at 1')
  if backbone.family == 'vit':
    try:
      vit.patch_grid(backbone.arch['spec'], *config.input.image_size)
    except ValueError as e:
      raise ValueError(f'input.image_size: {e} for {config.model.backbone}') from None
  optim_config = config.optim
  if (optim_config.schedule == 'cosine' and optim_config.final_lr_factor == 0
      and optim_config.cosine_epochs < config.train.num_epochs):
    raise ValueError(
        f'optim.cosine_epochs {optim_config.cosine_epochs} is less than train.num_epochs '
        f'{config.train.num_epochs}: with optim.final_lr_factor 0 the last '
        f'{config.train.num_epochs - optim_config.cosine_epochs} epochs would train at a '
        f'learning rate of 0; set --config.optim.cosine_epochs={config.train.num_epochs}')
  k, batch = config.train.k, config.train.batch_size
  if batch % k:
    raise ValueError(f'train.batch_size {batch} is not a multiple of train.k {k}')
  p = batch // k
  if p % num_devices:
    raise ValueError(f'P = batch_size / k = {p} identities is not divisible by the '
                     f'{num_devices} devices; each device needs whole identities')
  if p // num_devices < 2:
    raise ValueError(f'each device gets {p // num_devices} identity; batch-hard mining needs '
                     f'at least 2 per device (raise train.batch_size)')
  shards = config.input.num_shards or num_processes
  if shards % num_processes or p % shards:
    raise ValueError(f'input.num_shards={shards} must be a multiple of the {num_processes} '
                     f'processes and divide P = {p}')
  if num_devices % num_processes:
    raise ValueError(f'{num_devices} devices do not split evenly over {num_processes} processes')
  if config.eval.data_dir and not config.eval.dataset:
    raise ValueError('eval.data_dir is set but eval.dataset is empty; name the dataset to '
                     'evaluate on, e.g. --config.eval.dataset=street2shop')
  evaluators.check_config(config.eval)
  if config.eval.batch_size % num_devices:
    raise ValueError(f'eval.batch_size {config.eval.batch_size} is not divisible by the '
                     f'{num_devices} devices')
