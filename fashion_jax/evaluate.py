"""Evaluation: embed query and gallery, score them with the retrieval engine, write reports.

Writes `<workdir>/eval/`: metrics.json (latest), history.jsonl, cmc.png, ranked_lists.png and,
when switched on, per_category.csv / per_category.md. With `eval.dataset` naming another
dataset (cross-domain evaluation, e.g. trained on DeepFashion, tested on Street2Shop), the
query and gallery come from that dataset and the same reports go to
`<workdir>/eval/<dataset>/`, one folder per evaluation dataset.
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import datasets, input_pipeline
from fashion_jax import train_step as ts
from fashion_jax import visualize
from fashion_jax.retrieval import centroids as retrieval_centroids
from fashion_jax.retrieval import metrics as retrieval_metrics
from fashion_jax.retrieval import rerank as retrieval_rerank

_META_KEYS = ('item_id', 'category', 'domain')


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
  return np.pad(array, [(0, size - len(array))] + [(0, 0)] * (array.ndim - 1))


def embed_split(embed_fn, params, batch_stats, builder, split: str, config, mesh) -> dict:
  """Embeddings and labels of every image of `split`, gathered from all processes.

  Returns {'embeddings': [N, F] float32, 'item_id', 'category', 'domain', 'process',
  'position': [N] int64} in a fixed order; (process, position) locate an image in that
  process's share of the split, for drawing it later.
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
  bar = tqdm(desc=f'embedding {split}', unit='img', disable=process > 0, leave=False)
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
    embeddings = embed_fn(params, batch_stats, images)
    if num_processes > 1:
      local = multihost_utils.process_allgather(local, tiled=True)
    outputs.append({'embeddings': np.asarray(multihost_utils.process_allgather(embeddings, tiled=True)
                                             if num_processes > 1 else embeddings),
                    **local})
  bar.close()
  merged = {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}
  valid = merged.pop('valid')
  return {key: value[valid] for key, value in merged.items()}


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


class _Bars:
  """tqdm bars of one retrieval call, one per stage, fed by its progress(stage, done, total)."""

  def __init__(self, prefix: str):
    self.prefix, self.bars = prefix, {}

  def __call__(self, stage: str, done: int, total: int) -> None:
    if stage not in self.bars:
      self.bars[stage] = tqdm(total=total, desc=f'{self.prefix}: {stage}', leave=False,
                              disable=jax.process_index() > 0)
    self.bars[stage].update(done - self.bars[stage].n)

  def close(self) -> None:
    for bar in self.bars.values():
      bar.close()


def _label_names(builder, *path: str) -> list[str] | None:
  """The ClassLabel names of a feature (e.g. 'images', 'domain'), or None if it has none."""
  feature = builder.info.features
  try:
    for key in path:
      feature = feature[key]
    return list(feature.names)
  except (KeyError, AttributeError, TypeError):
    return None


def _domain_filter(split: dict, name: str, names: list[str] | None, which: str) -> dict:
  """The rows of `split` whose domain is `name` ('' keeps every row)."""
  if not name:
    return split
  if names is None or name not in names:
    raise ValueError(f'eval.{which}_domain {name!r} is not a domain of this dataset '
                     f'({names})')
  rows = split['domain'] == names.index(name)
  return {key: value[rows] for key, value in split.items()}


def score(query: dict, gallery: dict, config, category_names: list[str] | None = None) -> tuple:
  """Every metric the config switches on, from embeddings and labels (no dataset access).

  Args:
    query, gallery: {'embeddings': [N, F], 'item_id', 'category', 'domain': [N]}.
    config: the experiment config (its `eval` block).
    category_names: names for the per-category table keys.

  Returns:
    metrics: {'mAP', 'acc@k', 'num_queries', 'num_skipped', and per switch 'category_constrained',
      'per_category', 'category_average', 'reranked', 'centroids', 'recommendation'}.
    curves: {name: [cmc_max_rank] CMC curve} for the CMC plot.
    per_query: (ap, first_rank, valid, reranked) of the ranking the ranked lists show: the
      unconstrained one, re-ranked when `eval.rerank` is on (`reranked` is then the
      retrieval.search.Reranked of all queries, else None).
  """
  e = config.eval
  ks = tuple(e.ks)
  dtype = jnp.dtype(e.dtype)
  q_emb = np.asarray(jnp.asarray(query['embeddings'], dtype))
  g_emb = np.asarray(jnp.asarray(gallery['embeddings'], dtype))
  options = dict(chunk_size=e.chunk_size, gallery_chunk_size=e.gallery_chunk_size)

  def evaluate_on(name, q, g, q_ids, g_ids, q_cams, g_cams, **extra):
    bars = _Bars(name)
    arrays = retrieval_metrics.per_query_metrics(q, g, q_ids, g_ids, q_cams, g_cams,
                                                 progress=bars, **options, **extra)
    bars.close()
    curves[name] = retrieval_metrics.cmc(arrays[1], arrays[2], e.cmc_max_rank)
    return arrays, retrieval_metrics.summarize(*arrays, ks)

  curves = {}
  # Street and shop play the cameras of ReID: the same-id-same-camera rule then drops nothing
  # for street queries against a shop gallery, as the protocol expects.
  ids = (query['item_id'], gallery['item_id'], query['domain'], gallery['domain'])
  per_query, metrics = evaluate_on('unconstrained', q_emb, g_emb, *ids)
  if e.per_category:
    arrays, metrics['category_constrained'] = evaluate_on(
        'category constrained', q_emb, g_emb, *ids,
        query_groups=query['category'], gallery_groups=gallery['category'])
    table, metrics['category_average'] = retrieval_metrics.per_category(
        *arrays, query['category'], ks)
    name = lambda c: category_names[c] if category_names else str(c)
    metrics['per_category'] = {name(c): row for c, row in table.items()}
  reranked = None
  if e.rerank:
    bars = _Bars('re-ranking')
    reranked = retrieval_rerank.k_reciprocal_rerank(
        q_emb, g_emb, e.rerank_k1, e.rerank_k2, e.rerank_lambda, progress=bars)
    bars.close()
    per_query, metrics['reranked'] = evaluate_on('re-ranked', q_emb, g_emb, *ids,
                                                 rerank=reranked)
  if e.centroids:
    c = retrieval_centroids.gallery_centroids(gallery['embeddings'], gallery['item_id'],
                                              gallery['domain'])
    c_emb = np.asarray(jnp.asarray(c['embeddings'], dtype))
    metrics['centroids'] = evaluate_on('centroids', q_emb, c_emb, query['item_id'], c['ids'],
                                       query['domain'], c['cams'])[1]
    metrics['centroids']['num_gallery'] = len(c['ids'])
  if e.recommendation:
    # Each gallery image is its own camera: the same-id-same-camera rule drops exactly the
    # query image from its own ranking, and keeps the item's other images as positives.
    own = np.arange(len(g_emb))
    metrics['recommendation'] = evaluate_on('recommendation', g_emb, g_emb, gallery['item_id'],
                                            gallery['item_id'], own, own)[1]
  return metrics, curves, (*per_query, reranked)


def ranked_list_rows(query: dict, gallery: dict, ap: np.ndarray, valid: np.ndarray, config,
                     reranked=None) -> tuple[np.ndarray, np.ndarray]:
  """The worst and best evaluated queries by AP, and each one's top gallery indices.

  With `reranked` (all queries' re-ranking), the lists are in the re-ranked order the metrics
  scored. Returns (chosen [R] query indices, indices [R, top_k_shown]).
  """
  order = np.argsort(ap[valid], kind='stable')
  chosen = np.flatnonzero(valid)[order]
  rows = config.eval.num_ranked_queries
  if len(chosen) > rows:
    chosen = np.concatenate([chosen[:rows // 2], chosen[len(chosen) - (rows - rows // 2):]])
  dtype = jnp.dtype(config.eval.dtype)  # the embeddings score() ranked
  indices, _ = retrieval_metrics.rank_gallery(
      np.asarray(jnp.asarray(query['embeddings'][chosen], dtype)),
      np.asarray(jnp.asarray(gallery['embeddings'], dtype)), config.eval.top_k_shown,
      rerank=None if reranked is None else reranked.select(chosen))
  return chosen, indices


def draw_ranked_lists(query: dict, gallery: dict, ap: np.ndarray, valid: np.ndarray, builder,
                      config, path: str, reranked=None) -> None:
  """Worst and best evaluated queries by AP, each with its top results (ranked_list_rows)."""
  chosen, indices = ranked_list_rows(query, gallery, ap, valid, config, reranked)
  key = lambda split, i: (int(split['process'][i]), int(split['position'][i]))
  query_images = _load_images(builder, config.dataset.query_split, config,
                              {key(query, i) for i in chosen})
  gallery_images = _load_images(builder, config.dataset.gallery_split, config,
                                {key(gallery, j) for j in indices.ravel()})
  picture = visualize.ranked_list_image(
      queries=[query_images[key(query, i)] for i in chosen],
      results=[[gallery_images[key(gallery, j)] for j in row] for row in indices],
      correct=[[gallery['item_id'][j] == query['item_id'][i] for j in row]
               for i, row in zip(chosen, indices)],
      titles=[f'AP {ap[i]:.2f}' for i in chosen])
  picture.save(path)


def write_category_table(metrics: dict, ks, out_dir: str) -> None:
  """per_category.csv and per_category.md: one row per category, then the average."""
  columns = ['mAP'] + [f'acc@{k}' for k in ks]
  rows = [(name, row) for name, row in metrics['per_category'].items()]
  rows.append(('average over categories', metrics['category_average']))
  with open(os.path.join(out_dir, 'per_category.csv'), 'w', newline='') as f:
    out = csv.writer(f)
    out.writerow(['category'] + columns + ['num_queries'])
    for name, row in rows:
      out.writerow([name] + [f'{row[c]:.4f}' for c in columns] + [row.get('num_queries', '')])
  with open(os.path.join(out_dir, 'per_category.md'), 'w') as f:
    f.write('| category | ' + ' | '.join(columns) + ' | queries |\n')
    f.write('|---' * (len(columns) + 2) + '|\n')
    for name, row in rows:
      cells = [f'{100 * row[c]:.1f}' for c in columns] + [str(row.get('num_queries', ''))]
      f.write(f'| {name} | ' + ' | '.join(cells) + ' |\n')


def is_cross_dataset(config) -> bool:
  """Whether config.eval names a dataset (or a build of it) other than the training one."""
  name = config.eval.get('dataset', '')
  if not name:
    return False
  return (name != config.dataset.name
          or (config.eval.data_dir or config.dataset.data_dir) != config.dataset.data_dir)


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


def evaluate(embed_fn, params, batch_stats, builder, config, mesh, workdir: str, step: int,
             writer=None) -> dict:
  """Embeds query and gallery, scores them per config.eval, writes the reports (process 0).

  `builder` is the training dataset's; config.eval.dataset may name another one to test on.
  """
  builder = eval_builder(config, builder)
  query = embed_split(embed_fn, params, batch_stats, builder, config.dataset.query_split,
                      config, mesh)
  gallery = embed_split(embed_fn, params, batch_stats, builder, config.dataset.gallery_split,
                        config, mesh)
  domains = _label_names(builder, 'images', 'domain')
  query = _domain_filter(query, config.eval.query_domain, domains, 'query')
  gallery = _domain_filter(gallery, config.eval.gallery_domain, domains, 'gallery')
  scores, curves, (ap, _, valid, reranked) = score(query, gallery, config,
                                                    _label_names(builder, 'category'))
  metrics = {'step': step, 'num_gallery': len(gallery['item_id']), **scores}
  folder = report_folder(config)
  if is_cross_dataset(config):
    metrics['dataset'] = config.eval.dataset
  logging.info('evaluation at step %d on %s: %s', step, builder.info.full_name,
               json.dumps(metrics))
  if writer is not None:
    writer.write_scalars(step, {f'{folder}/{k}': v for k, v in metrics.items()
                                if k.startswith(('mAP', 'acc@'))})
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, folder)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
      json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, 'history.jsonl'), 'a') as f:
      f.write(json.dumps(metrics) + '\n')
    if config.eval.per_category:
      write_category_table(metrics, config.eval.ks, out_dir)
    visualize.cmc_image(curves).save(os.path.join(out_dir, 'cmc.png'))
    if valid.any() and config.eval.num_ranked_queries > 0:
      draw_ranked_lists(query, gallery, ap, valid, builder, config,
                        os.path.join(out_dir, 'ranked_lists.png'), reranked)
  return metrics
