"""Defaults shared by every experiment config, and the checks that run before any compilation.

Experiment files in `configs/` start from `base_config()` and change what differs.
"""

import ml_collections

from fashion_jax import evaluators, objective
from fashion_jax import preprocessing
from fashion_jax.models.backbones import check_options

MODES = ('train_and_evaluate', 'train', 'evaluate')


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
  # Stochastic depth, EfficientNet only: block i of N skips its branch with probability
  # rate * i / N in training (torchvision trains ImageNet EfficientNets with 0.2).
  c.model.drop_path_rate = 0.0
  # Converted ImageNet weights for the backbone (`python -m fashion_jax.convert_weights`);
  # None trains from scratch. A resumed run restores its checkpoint over them.
  c.model.pretrained = ml_collections.config_dict.placeholder(str)

  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.1
  c.loss.metric = 'triplet'         # 'triplet', 'quadruplet' or 'none' (classification only)
  c.loss.triplet_margin = 0.3
  c.loss.quadruplet_margins = (0.3, 0.15)
  c.loss.center_weight = 5e-4       # beta
  c.loss.center_lr = 0.5

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 3.5e-4
  c.optim.weight_decay = 5e-4
  c.optim.warmup_epochs = 10
  c.optim.warmup_factor = 0.01
  c.optim.milestones = (40, 70)
  c.optim.gamma = 0.1

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
  c.eval.query_domain = ''          # domain filter by name, e.g. 'street'; '' keeps all
  c.eval.gallery_domain = ''        # e.g. 'shop'
  # Evaluators run, in order (registered names, evaluators.EVALUATORS); each switch below that is
  # on appends the evaluator of its name. 'retrieval' (the top-level mAP / Acc@k, ranked lists)
  # must be listed. An evaluator reads its options from this block (docs/retrieval.md).
  c.eval.evaluators = ('retrieval',)
  c.eval.per_category = False       # category-constrained retrieval, table + average
  c.eval.rerank = False             # k-reciprocal re-ranking (docs/method.md section 6)
  c.eval.rerank_k1 = 20
  c.eval.rerank_k2 = 6
  c.eval.rerank_lambda = 0.3
  c.eval.centroids = False          # gallery averaged per item (docs/method.md section 8)
  c.eval.recommendation = False     # gallery against itself (shop->shop), self excluded
  c.eval.cmc_max_rank = 50          # CMC curve length
  # Cross-domain evaluation (docs/method.md section 5): test on another dataset's query and gallery
  # splits, e.g. 'street2shop' for a model trained on DeepFashion. '' tests on the training
  # dataset. Reports go to <workdir>/eval/<dataset>/.
  c.eval.dataset = ''
  c.eval.data_dir = ml_collections.config_dict.placeholder(str)  # None: dataset.data_dir
  return c


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int,
                    num_processes: int = 1) -> None:
  """Raises ValueError with a one-line message for a config that cannot run. No compilation."""
  if config.mode not in MODES:
    raise ValueError(f'unknown mode {config.mode!r}; choose one of {", ".join(MODES)}')
  if not config.dataset.name:
    raise ValueError('config.dataset.name is empty; name a TFDS dataset, e.g. fashion_synth/demo')
  check_options(config.model.backbone, width=config.model.get('width', 64),
                drop_path_rate=config.model.get('drop_path_rate', 0.0))
  if config.model.last_stride not in (1, 2):
    raise ValueError(f'model.last_stride must be 1 or 2, got {config.model.last_stride}')
  objective.check_metric(config.loss.metric)
  height, width = config.input.image_size
  if height % 16 or width % 16 or height <= 0 or width <= 0:
    raise ValueError(f'input.image_size must be positive multiples of 16, got {height}x{width}')
  preprocessing.resize_settings(config.input)
  if config.loss.center_weight < 0:
    raise ValueError(f'loss.center_weight must be >= 0 (0 switches the center loss off), got '
                     f'{config.loss.center_weight}')
  k, batch = config.train.k, config.train.batch_size
  if k < 2:
    raise ValueError(f'train.k must be >= 2 (batch-hard mining needs a positive), got {k}')
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
