"""Evaluation: embed query and gallery, score them with the paper's protocol, write reports.

Writes `<workdir>/eval/metrics.json` (latest), appends to `eval/history.jsonl`, and draws the
ranked lists of a few queries to `eval/ranked_lists.png`.
"""

import json
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import input_pipeline
from fashion_jax import train_step as ts
from fashion_jax import visualize
from fashion_jax.retrieval import metrics as retrieval_metrics

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
    embeddings = embed_fn(params, batch_stats, images)
    if num_processes > 1:
      local = multihost_utils.process_allgather(local, tiled=True)
    outputs.append({'embeddings': np.asarray(multihost_utils.process_allgather(embeddings, tiled=True)
                                             if num_processes > 1 else embeddings),
                    **local})
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


def draw_ranked_lists(query: dict, gallery: dict, ap: np.ndarray, valid: np.ndarray, builder,
                      config, path: str) -> None:
  """Worst and best evaluated queries by AP, each with its top results."""
  order = np.argsort(ap[valid], kind='stable')
  evaluated = np.flatnonzero(valid)[order]
  rows = config.eval.num_ranked_queries
  if len(evaluated) > rows:
    evaluated = np.concatenate([evaluated[:rows // 2], evaluated[len(evaluated) - (rows - rows // 2):]])
  chosen = evaluated
  indices, _ = retrieval_metrics.rank_gallery(query['embeddings'][chosen], gallery['embeddings'],
                                              config.eval.top_k_shown)
  indices = np.asarray(indices)
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


def evaluate(embed_fn, params, batch_stats, builder, config, mesh, workdir: str, step: int,
             writer=None) -> dict:
  """Embeds query and gallery, computes mAP and Acc@k, and writes the reports (process 0)."""
  query = embed_split(embed_fn, params, batch_stats, builder, config.dataset.query_split,
                      config, mesh)
  gallery = embed_split(embed_fn, params, batch_stats, builder, config.dataset.gallery_split,
                        config, mesh)
  # Street and shop play the cameras of ReID: the same-id-same-camera rule then drops nothing
  # for street queries against a shop gallery, as the protocol expects.
  metrics = retrieval_metrics.evaluate_retrieval(
      query['embeddings'], gallery['embeddings'], query['item_id'], gallery['item_id'],
      query['domain'], gallery['domain'], ks=tuple(config.eval.ks))
  metrics = {'step': step, 'num_gallery': len(gallery['item_id']), **metrics}
  logging.info('evaluation at step %d: %s', step, json.dumps(metrics))
  if writer is not None:
    writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()
                                if k.startswith(('mAP', 'acc@'))})
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'eval')
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
      json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, 'history.jsonl'), 'a') as f:
      f.write(json.dumps(metrics) + '\n')
    ap, _, valid = (np.asarray(a) for a in retrieval_metrics.per_query_metrics(
        query['embeddings'], gallery['embeddings'], query['item_id'], gallery['item_id']))
    if valid.any() and config.eval.num_ranked_queries > 0:
      draw_ranked_lists(query, gallery, ap, valid, builder, config,
                        os.path.join(out_dir, 'ranked_lists.png'))
  return metrics
