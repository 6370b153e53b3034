"""Evaluation: embed query and gallery, run the configured evaluators on them, write the reports.

Writes `<workdir>/eval/`: metrics.json (latest), eval_config.json (the config.eval it was computed
with), history.jsonl, cmc.png and the evaluators' tables and pictures (ranked_lists.png, per_category.csv / per_category.md, ...; evaluators.py). With
`eval.dataset` naming another dataset (cross-domain evaluation, e.g. trained on DeepFashion,
tested on Street2Shop), the query and gallery come from that dataset and the same reports go to
`<workdir>/eval/<dataset>/`, one folder per evaluation dataset.
"""

import json
import os
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import datasets, input_pipeline
from fashion_jax import console, evaluators
from fashion_jax import train_step as ts
from fashion_jax import visualize
from fashion_jax.evaluators import Embeddings, EvalData, EvalResult

_META_KEYS = ('item_id', 'category', 'domain')


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
  return np.pad(array, [(0, size - len(array))] + [(0, 0)] * (array.ndim - 1))


def embed_split(embed: Callable[[jax.Array], jax.Array], builder, split: str, config,
                mesh) -> Embeddings:
  """Embeddings and labels of every image of `split`, gathered from all processes.

  `embed` maps images [B, H, W, 3] uint8, sharded over `mesh`, to [B, F] embeddings.
  """
  num_processes, process = jax.process_count(), jax.process_index()
  local_batch = config.eval.batch_size // num_processes
  sharding = NamedSharding(mesh, P(ts.DATA_AXIS))
  ds = input_pipeline.create_eval_dataset(builder, split, config, batch_size=local_batch,
                                          process_index=process, process_count=num_processes)
  iterator = ds.as_numpy_iterator()
  height, width = config.input.image_size
  empty = {'images': np.zeros((0, height, width, 3), np.uint8),
           **{key: np.zeros((0,), np.int64) for key in _META_KEYS}}
  outputs, seen = [], 0
  bar = console.bar(desc=f'embedding {split}', unit='img', leave=False, enabled=process == 0)
  while True:
    batch = next(iterator, empty)
    count = len(batch['images'])
    # Every process must take part in each collective: stop only when all are done.
    if num_processes > 1:
      if multihost_utils.process_allgather(np.int32(count)).max() == 0:
        break
    elif count == 0:
      break
    images = jax.make_array_from_process_local_data(sharding, _pad_to(batch['images'], local_batch))
    local = {key: _pad_to(batch[key].astype(np.int64), local_batch) for key in _META_KEYS}
    local['valid'] = np.arange(local_batch) < count
    local['process'] = np.full(local_batch, process, np.int64)
    local['position'] = seen + np.arange(local_batch, dtype=np.int64)
    seen += count
    bar.update(count)
    embeddings = embed(images)
    if num_processes > 1:
      local = multihost_utils.process_allgather(local, tiled=True)
      embeddings = multihost_utils.process_allgather(embeddings, tiled=True)
    outputs.append({'embeddings': np.asarray(embeddings), **local})
  bar.close()
  merged = {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}
  valid = merged.pop('valid')
  return Embeddings(**merged).select(valid)


def _load_images(builder, split: str, config, wanted: set[tuple[int, int]]) -> dict:
  """The resized images at (process, position) keys, read again from the split."""
  found = {}
  for process in sorted({p for p, _ in wanted}):
    ds = input_pipeline.create_eval_dataset(builder, split, config, batch_size=1,
                                            process_index=process,
                                            process_count=jax.process_count())
    positions = {pos for p, pos in wanted if p == process}
    for position, batch in enumerate(ds.as_numpy_iterator()):
      if position in positions:
        found[(process, position)] = batch['images'][0]
      if position >= max(positions):
        break
  return found


def _label_names(builder, *path: str) -> list[str] | None:
  """The ClassLabel names of a feature (e.g. 'images', 'domain'), or None if it has none."""
  feature = builder.info.features
  try:
    for key in path:
      feature = feature[key]
    return list(feature.names)
  except (KeyError, AttributeError, TypeError):
    return None


def _domain_filter(split: Embeddings, name: str, names: list[str] | None,
                   which: str) -> Embeddings:
  """The rows of `split` whose domain is `name` ('' keeps every row)."""
  if not name:
    return split
  _check_domain(name, names, which)
  return split.select(split.domain == names.index(name))


def _check_domain(name: str, names: list[str] | None, which: str) -> None:
  if name and (names is None or name not in names):
    raise ValueError(f'eval.{which}_domain {name!r} is not a domain of this dataset '
                     f'({names})')


def check_eval_settings(config, builder) -> None:
  """Raises ValueError for eval settings the dataset evaluated on cannot take (a domain it does
  not have), before training: at the first evaluation it would cost the steps since the last
  checkpoint."""
  if config.mode == 'train':
    return
  names = _label_names(eval_builder(config, builder), 'images', 'domain')
  for which in ('query', 'gallery'):
    _check_domain(config.eval[f'{which}_domain'], names, which)


def is_cross_dataset(config) -> bool:
  """Whether config.eval names a dataset (or a build of it) other than the training one."""
  name = config.eval.get('dataset', '')
  if not name:
    return False
  return (name != config.dataset.name
          or (config.eval.data_dir or config.dataset.data_dir) != config.dataset.data_dir)


EVAL_CONFIG_FILE = 'eval_config.json'
REPORTS_FILE = 'reports.json'  # the tables and pictures of the last evaluation


def metrics_settings_match(config, workdir: str) -> bool:
  """Whether the reports in `workdir` were computed with config.eval as it is now."""
  path = epath.Path(workdir) / report_folder(config) / EVAL_CONFIG_FILE
  if not path.exists():
    return False
  return json.loads(path.read_text()) == json.loads(config.eval.to_json_best_effort())


def report_folder(config) -> str:
  """The reports' folder under the workdir: 'eval', or 'eval/<dataset>' for another dataset."""
  if not is_cross_dataset(config):
    return 'eval'
  # 'fashion_synth/tiny:1.0.0' -> 'fashion_synth_tiny_1.0.0': one folder level per dataset.
  return os.path.join('eval', config.eval.dataset.replace('/', '_').replace(':', '_'))


def eval_builder(config, train_builder):
  """The dataset whose query and gallery splits are evaluated (config.eval.dataset or the
  training one). Category and domain names are read from it, so per-category tables use the
  evaluation dataset's categories."""
  if not is_cross_dataset(config):
    return train_builder
  return datasets.get_builder(config.eval.dataset, config.eval.data_dir or config.dataset.data_dir)




def eval_data(embed: Callable[[jax.Array], jax.Array], builder, config, mesh) -> EvalData:
  """The query and gallery splits of `builder` embedded, filtered by eval's domains, and a reader
  of their images for the pictures."""
  query, gallery = (embed_split(embed, builder, config.dataset[f'{which}_split'], config, mesh)
                    for which in ('query', 'gallery'))
  domains = _label_names(builder, 'images', 'domain')

  def read_images(which: str, rows: Embeddings) -> list[np.ndarray]:
    keys = list(zip(rows.process.tolist(), rows.position.tolist()))
    found = _load_images(builder, config.dataset[f'{which}_split'], config, set(keys))
    return [found[key] for key in keys]

  return EvalData(query=_domain_filter(query, config.eval.query_domain, domains, 'query'),
                  gallery=_domain_filter(gallery, config.eval.gallery_domain, domains, 'gallery'),
                  category_names=_label_names(builder, 'category'), read_images=read_images)


def write_reports(metrics: dict, result: EvalResult, out_dir: str) -> dict:
  """metrics.json, a line of history.jsonl, cmc.png, and the evaluators' tables and pictures.

  Returns the pictures drawn, {file name: PIL image}, so that TensorBoard gets them too.
  """
  # epath: a workdir in a bucket (gs://...) gets its reports there, not in a local folder.
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'metrics.json').write_text(json.dumps(metrics, indent=2))
  line = json.dumps(metrics)
  history = out / 'history.jsonl'
  # A finished run evaluated again with the same settings gives the same line: kept once.
  if not (history.exists() and line in history.read_text().splitlines()):
    with history.open('a') as f:
      f.write(line + '\n')
  for name, text in result.tables.items():
    with (out / name).open('wb') as f:  # bytes: csv's \r\n kept as written
      f.write(text.encode())
  pictures = {'cmc.png': visualize.cmc_image(result.curves)}
  pictures.update((name, draw()) for name, draw in result.pictures.items())
  for name, picture in pictures.items():
    with (out / name).open('wb') as f:
      picture.save(f, format=os.path.splitext(name)[1].lstrip('.') or 'png')
  # Tables and pictures of evaluators that ran before but not now (per_category.csv after
  # eval.per_category was switched off) would sit beside metrics that no longer describe them.
  written = sorted({*result.tables, *pictures})
  listed = out / REPORTS_FILE
  before = json.loads(listed.read_text()) if listed.exists() else []
  for name in set(before) - set(written):
    if name == os.path.basename(name):  # a file name of this folder, as written
      (out / name).unlink(missing_ok=True)
  listed.write_text(json.dumps(written))
  return pictures


def evaluate(config, *, embed: Callable[[jax.Array], jax.Array], builder, mesh, workdir: str,
             step: int, writer=None) -> dict:
  """Embeds query and gallery, runs the evaluators of config.eval, writes the reports (process 0).

  `embed` maps images [B, H, W, 3] uint8, sharded over `mesh`, to [B, F] embeddings. `builder`
  is the training dataset's; config.eval.dataset may name another one to test on. Returns the
  metrics of metrics.json.
  """
  builder = eval_builder(config, builder)
  data = eval_data(embed, builder, config, mesh)
  for which, rows in (('query', data.query), ('gallery', data.gallery)):
    bad = int(np.sum(~np.isfinite(rows.embeddings).all(axis=1)))
    if bad:
      raise ValueError(f'{bad} of the {len(rows.embeddings)} {which} embeddings at step {step} '
                       "are not finite: the model's weights hold NaN or inf")
  result = evaluators.run_evaluators(data, evaluators.from_config(config.eval))
  if not result.metrics.get('num_queries'):
    raise ValueError(
        f'none of the {len(data.query.item_id)} queries has its product in the gallery, so '
        f'there is nothing to score (dataset.query_split {config.dataset.query_split!r}, '
        f'dataset.gallery_split {config.dataset.gallery_split!r}, eval.query_domain '
        f'{config.eval.query_domain!r}, eval.gallery_domain {config.eval.gallery_domain!r})')
  metrics = {'step': step, 'num_gallery': len(data.gallery.item_id), **result.metrics}
  folder = report_folder(config)
  if is_cross_dataset(config):
    metrics['dataset'] = config.eval.dataset
  logging.info('evaluation at step %d on %s: %s', step, builder.info.full_name,
               json.dumps(metrics))
  if writer is not None:
    scalars = {f'{folder}/{k}': v for k, v in metrics.items()
               if k.startswith(('mAP', 'mINP', 'acc@'))}
    scalars.update({f'{folder}/{k}': v for k, v in metrics.get('verification', {}).items()
                    if k.startswith('tpr@')})
    writer.write_scalars(step, scalars)
  if jax.process_index() == 0:
    pictures = write_reports(metrics, result, os.path.join(workdir, folder))
    # What the metrics were computed with: a sweep re-evaluates a finished point whose eval
    # settings changed since (metrics_settings_match).
    (epath.Path(workdir) / folder / EVAL_CONFIG_FILE).write_text(
        config.eval.to_json_best_effort(indent=2))
    if writer is not None:
      # 'eval/ranked_lists', 'eval/cmc', 'eval/roc': TensorBoard's Images tab, one per step.
      writer.write_images(step, {f'{folder}/{os.path.splitext(name)[0]}':
                                 np.asarray(picture.convert('RGB'))
                                 for name, picture in pictures.items()})
  return metrics


def console_line(metrics: dict, ks) -> str:
  """'mAP 0.4695  mINP 0.2210  Acc@1 0.409 ...  TPR@FPR=0.001 0.312 ...  (342 queries)'."""
  parts = [f'mAP {metrics["mAP"]:.4f}']
  if 'mINP' in metrics:
    parts.append(f'mINP {metrics["mINP"]:.4f}')
  parts += [f'Acc@{k} {metrics[f"acc@{k}"]:.3f}' for k in ks]
  parts += [f"{key.upper()} {value:.3f}"
            for key, value in metrics.get('verification', {}).items() if key.startswith('tpr@')]
  return '  '.join(parts) + f'  ({metrics["num_queries"]} queries)'
