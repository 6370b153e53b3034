"""Evaluators: named evaluations of query and gallery embeddings, each adding metrics and reports.

`EVALUATORS` maps a name to a factory of config.eval; `evaluator_names` says which ones a run uses.
Array code only: reading the images a picture shows is left to `EvalData.read_images`.
"""

import csv
import dataclasses
import functools
import io
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from fashion_jax import console, visualize
from fashion_jax.retrieval import centroids as retrieval_centroids
from fashion_jax.retrieval import metrics as retrieval_metrics
from fashion_jax.retrieval import query_expansion as retrieval_qe
from fashion_jax.retrieval import rerank as retrieval_rerank
from fashion_jax.retrieval import verification as retrieval_verification
from fashion_jax.retrieval.search import Reranked

# Boolean switches of config.eval, each adding the evaluator of the same name after
# config.eval.evaluators; this order is the order of their sections in metrics.json.
SWITCHES = ('per_category', 'rerank', 'centroids', 'recommendation', 'query_expansion')


@dataclasses.dataclass(frozen=True)
class Embeddings:
  """One split's embeddings and labels, one row per image, in a fixed order.

  embeddings: [N, F] float32; item_id, category, domain: [N] int64. process, position: [N] int64
  locate each image in its process's share of the split, so that it can be read again to draw it.
  """
  embeddings: np.ndarray
  item_id: np.ndarray
  category: np.ndarray
  domain: np.ndarray
  process: np.ndarray
  position: np.ndarray

  def select(self, rows: np.ndarray) -> 'Embeddings':
    """The rows given by `rows` ([N] bool mask, or indices) of every field."""
    return Embeddings(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class EvalData:
  """What every evaluator gets: the query and gallery of one evaluation, embedded once.

  category_names: names of the category ids (None: the ids are the names).
  read_images(split, rows): the images [H, W, 3] uint8 of `rows`, a selection of `split`'s
    ('query' or 'gallery') Embeddings, in their order; None where no dataset is at hand.
  """
  query: Embeddings
  gallery: Embeddings
  category_names: list[str] | None = None
  read_images: Callable[[str, Embeddings], list[np.ndarray]] | None = None


@dataclasses.dataclass
class EvalResult:
  """What one evaluator adds to the reports.

  metrics: keys of metrics.json (the top level's, or sections of its own).
  curves: {legend: [eval.cmc_max_rank] CMC curve}, drawn together in cmc.png.
  tables: {file name: text} written to the report folder.
  pictures: {file name: () -> PIL image}, called only by the process that writes the reports.
  """
  metrics: dict = dataclasses.field(default_factory=dict)
  curves: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  tables: dict[str, str] = dataclasses.field(default_factory=dict)
  pictures: dict[str, Callable[[], Image.Image]] = dataclasses.field(default_factory=dict)


class Evaluator(Protocol):
  """One named evaluation, built by its factory from config.eval."""
  name: str

  def run(self, data: EvalData) -> EvalResult:
    ...


EVALUATORS: dict[str, Callable[[ml_collections.ConfigDict], Evaluator]] = {}


def register_evaluator(name: str, factory: Callable[[ml_collections.ConfigDict], Evaluator]):
  """Makes `name` usable in config.eval.evaluators; factory(config.eval) builds the evaluator."""
  if name in EVALUATORS:
    raise ValueError(f'an evaluator named {name!r} is already registered')
  EVALUATORS[name] = factory


def evaluator_names(e: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.eval.evaluators, then the evaluator of each switch that is on and not yet listed."""
  listed = tuple(e.evaluators)
  return listed + tuple(name for name in SWITCHES if e[name] and name not in listed)


def check_config(e: ml_collections.ConfigDict) -> None:
  """Raises ValueError for an evaluator list that cannot run."""
  listed = tuple(e.evaluators)
  unknown = [name for name in listed if name not in EVALUATORS]
  if unknown:
    raise ValueError(f'eval.evaluators: unknown {", ".join(map(repr, unknown))}; registered: '
                     f'{", ".join(EVALUATORS)}')
  if len(set(listed)) < len(listed):
    raise ValueError(f'eval.evaluators lists an evaluator twice: {listed}')
  if 'retrieval' not in listed:
    raise ValueError("eval.evaluators must list 'retrieval': its mAP and Acc@k are the "
                     'top-level metrics that the console and TensorBoard show')
  if e.get('rerank_k2', 1) > e.get('rerank_k1', 0) + 1:
    raise ValueError(f'eval.rerank_k2 {e.rerank_k2} is more than eval.rerank_k1 + 1 = '
                     f'{e.rerank_k1 + 1}: the query expansion averages each point over its k2 '
                     'nearest, taken from its k1 + 1 nearest (docs/method.md section 6)')


def from_config(e: ml_collections.ConfigDict) -> list[Evaluator]:
  """The evaluators of `evaluator_names(e)`, in that order."""
  return [EVALUATORS[name](e) for name in evaluator_names(e)]


def run_evaluators(data: EvalData, evaluators: Sequence[Evaluator]) -> EvalResult:
  """Every evaluator's result merged in order.

  A metric key may come from one evaluator only; a later table or picture replaces an earlier
  one of the same file name (so with re-ranking on, ranked_lists.png shows the re-ranked order).
  """
  merged, owners = EvalResult(), {}
  for evaluator in evaluators:
    result = evaluator.run(data)
    for key in result.metrics:
      if key in owners:
        raise ValueError(f'evaluators {owners[key]!r} and {evaluator.name!r} both report {key!r}')
      owners[key] = evaluator.name
    merged.metrics.update(result.metrics)
    merged.curves.update(result.curves)
    merged.tables.update(result.tables)
    merged.pictures.update(result.pictures)
  return merged


class _Bars:
  """tqdm bars of one retrieval call, one per stage, fed by its progress(stage, done, total)."""

  def __init__(self, prefix: str):
    self.prefix, self.bars = prefix, {}

  def __call__(self, stage: str, done: int, total: int) -> None:
    if stage not in self.bars:
      self.bars[stage] = console.bar(total=total, desc=f'{self.prefix}: {stage}', leave=False,
                                    enabled=jax.process_index() == 0)
    self.bars[stage].update(done - self.bars[stage].n)

  def close(self) -> None:
    for bar in self.bars.values():
      bar.close()


def _cast(embeddings: np.ndarray, e) -> np.ndarray:
  """[N, F] embeddings in eval.dtype, the dtype retrieval ranks in."""
  return np.asarray(jnp.asarray(embeddings, jnp.dtype(e.dtype)))


class Ranking(NamedTuple):
  """Per-query results of one ranking: ap [Q] float32, first_rank [Q] int32 (0-based), valid [Q]
  bool, inp [Q] float32 (mINP's term), and the re-ranking it used (a retrieval.search.Reranked
  of all queries, or None)."""
  ap: np.ndarray
  first_rank: np.ndarray
  valid: np.ndarray
  inp: np.ndarray
  reranked: Reranked | None = None


def _rank(e, legend: str, query_emb, gallery_emb, query_ids, gallery_ids, query_cams,
          gallery_cams, *, rerank: Reranked | None = None, **groups) -> Ranking:
  """retrieval.metrics.per_query_metrics with eval's chunk sizes, its progress bars named
  `legend`; `groups` are its query_groups and gallery_groups."""
  bars = _Bars(legend)
  arrays = retrieval_metrics.per_query_metrics(
      query_emb, gallery_emb, query_ids, gallery_ids, query_cams, gallery_cams, rerank=rerank,
      chunk_size=e.chunk_size, gallery_chunk_size=e.gallery_chunk_size, progress=bars, **groups)
  bars.close()
  return Ranking(*arrays, rerank)


def _summary(e, legend: str, ranking: Ranking) -> tuple[dict, dict[str, np.ndarray]]:
  """(mAP, mINP, Acc@k and query counts, {legend: CMC curve}) of a ranking."""
  return (retrieval_metrics.summarize(ranking.ap, ranking.first_rank, ranking.valid, tuple(e.ks),
                                      inp=ranking.inp),
          {legend: retrieval_metrics.cmc(ranking.first_rank, ranking.valid, e.cmc_max_rank)})


def _street_shop(data: EvalData) -> tuple[np.ndarray, ...]:
  """Ids and cameras of the query-gallery protocol: street and shop play the cameras of ReID, so
  the same-id-same-camera rule drops nothing for street queries against a shop gallery."""
  return data.query.item_id, data.gallery.item_id, data.query.domain, data.gallery.domain


class Retrieval:
  """Every query against the whole gallery: mAP, Acc@k and query counts at the top level of
  metrics.json, or with `rerank` after k-reciprocal re-ranking (docs/method.md section 6), in
  section 'reranked'. Offers ranked_lists.png of the ranking it scored."""

  def __init__(self, e: ml_collections.ConfigDict, rerank: bool = False):
    self.e, self.rerank = e, rerank
    self.name, self.legend = ('rerank', 're-ranked') if rerank else ('retrieval', 'unconstrained')

  def rank(self, data: EvalData) -> Ranking:
    e = self.e
    query_emb, gallery_emb = _cast(data.query.embeddings, e), _cast(data.gallery.embeddings, e)
    reranked = None
    if self.rerank:
      bars = _Bars('re-ranking')
      reranked = retrieval_rerank.k_reciprocal_rerank(
          query_emb, gallery_emb, e.rerank_k1, e.rerank_k2, e.rerank_lambda, progress=bars)
      bars.close()
    return _rank(e, self.legend, query_emb, gallery_emb, *_street_shop(data), rerank=reranked)

  def run(self, data: EvalData) -> EvalResult:
    ranking = self.rank(data)
    metrics, curves = _summary(self.e, self.legend, ranking)
    result = EvalResult({'reranked': metrics} if self.rerank else metrics, curves)
    if data.read_images and ranking.valid.any() and self.e.num_ranked_queries > 0:
      result.pictures['ranked_lists.png'] = functools.partial(draw_ranked_lists, data, ranking,
                                                              self.e)
    return result


class QueryExpansion:
  """Queries replaced by their average query expansion (alpha-QE, docs/method.md section 9;
  eval.query_expansion_k neighbours, exponent eval.query_expansion_alpha), then ranked again:
  section 'query_expansion', and with eval.rerank also 'query_expansion_reranked' (the expanded
  queries re-ranked)."""
  name = 'query_expansion'

  def __init__(self, e: ml_collections.ConfigDict):
    self.e = e

  def run(self, data: EvalData) -> EvalResult:
    e = self.e
    gallery_emb = _cast(data.gallery.embeddings, e)
    expanded = retrieval_qe.expand_queries(
        _cast(data.query.embeddings, e), gallery_emb, e.query_expansion_k,
        e.query_expansion_alpha, chunk_size=e.chunk_size or 1024,
        gallery_chunk_size=e.gallery_chunk_size)
    expanded = _cast(expanded, e)
    result = EvalResult()
    for section, legend, rerank in (('query_expansion', 'query expansion', False),
                                    ('query_expansion_reranked', 'query expansion + re-ranking',
                                     True)):
      if rerank and not e.rerank:
        continue
      reranked = None
      if rerank:
        bars = _Bars('re-ranking')
        reranked = retrieval_rerank.k_reciprocal_rerank(
            expanded, gallery_emb, e.rerank_k1, e.rerank_k2, e.rerank_lambda, progress=bars)
        bars.close()
      ranking = _rank(e, legend, expanded, gallery_emb, *_street_shop(data), rerank=reranked)
      metrics, curves = _summary(e, legend, ranking)
      result.metrics[section] = metrics
      result.curves.update(curves)
    return result


class PerCategory:
  """Each query ranked against its own category only (Street2Shop's protocol): sections
  'category_constrained', 'category_average' (unweighted over categories) and 'per_category',
  and per_category.csv / per_category.md."""
  name = 'per_category'

  def __init__(self, e: ml_collections.ConfigDict):
    self.e = e

  def run(self, data: EvalData) -> EvalResult:
    e, legend = self.e, 'category constrained'
    ranking = _rank(e, legend, _cast(data.query.embeddings, e), _cast(data.gallery.embeddings, e),
                    *_street_shop(data), query_groups=data.query.category,
                    gallery_groups=data.gallery.category)
    summary, curves = _summary(e, legend, ranking)
    table, average = retrieval_metrics.per_category(*ranking[:3], data.query.category,
                                                    tuple(e.ks), inp=ranking.inp)
    names = data.category_names
    metrics = {'category_constrained': summary, 'category_average': average,
               'per_category': {names[c] if names else str(c): row for c, row in table.items()}}
    return EvalResult(metrics, curves, category_tables(metrics, e.ks))


class Centroids:
  """Queries against the gallery averaged per item and domain (docs/method.md section 8):
  section 'centroids', with the number of centroids as its 'num_gallery'."""
  name = 'centroids'

  def __init__(self, e: ml_collections.ConfigDict):
    self.e = e

  def run(self, data: EvalData) -> EvalResult:
    e, gallery = self.e, data.gallery
    c = retrieval_centroids.gallery_centroids(gallery.embeddings, gallery.item_id, gallery.domain)
    ranking = _rank(e, self.name, _cast(data.query.embeddings, e), _cast(c['embeddings'], e),
                    data.query.item_id, c['ids'], data.query.domain, c['cams'])
    metrics, curves = _summary(e, self.name, ranking)
    metrics['num_gallery'] = len(c['ids'])
    return EvalResult({self.name: metrics}, curves)


class Recommendation:
  """The gallery against itself (shop->shop), each image excluded from its own ranking: section
  'recommendation'."""
  name = 'recommendation'

  def __init__(self, e: ml_collections.ConfigDict):
    self.e = e

  def run(self, data: EvalData) -> EvalResult:
    gallery = _cast(data.gallery.embeddings, self.e)
    # Each gallery image is its own camera: the same-id-same-camera rule drops exactly the
    # query image from its own ranking, and keeps the item's other images as positives.
    own = np.arange(len(gallery))
    ids = data.gallery.item_id
    ranking = _rank(self.e, self.name, gallery, gallery, ids, ids, own, own)
    metrics, curves = _summary(self.e, self.name, ranking)
    return EvalResult({self.name: metrics}, curves)


class Verification:
  """Every query-gallery pair as a same-product decision on its cosine similarity: section
  'verification' with the TPR at each of eval.verification_fprs and the pair counts, and
  roc.png (docs/method.md section 9)."""
  name = 'verification'

  def __init__(self, e: ml_collections.ConfigDict):
    self.e = e

  def run(self, data: EvalData) -> EvalResult:
    fprs = tuple(float(f) for f in self.e.get('verification_fprs', (1e-4, 1e-3, 1e-2)))
    result = retrieval_verification.verification(
        data.query.embeddings, data.gallery.embeddings, data.query.item_id,
        data.gallery.item_id, fprs, chunk_size=self.e.chunk_size)
    metrics = {f'tpr@fpr={f:g}': result['tpr'][f] for f in fprs}
    metrics.update(num_positive_pairs=result['num_positive_pairs'],
                   num_negative_pairs=result['num_negative_pairs'])
    fpr, tpr = result['roc']
    picture = functools.partial(visualize.roc_image, fpr, tpr, result['tpr'])
    return EvalResult({self.name: metrics}, pictures={'roc.png': picture})


def category_tables(metrics: dict, ks: Sequence[int]) -> dict[str, str]:
  """per_category.csv (fractions) and per_category.md (percent): one row per category, then the
  average."""
  columns = ['mAP', 'mINP'] + [f'acc@{k}' for k in ks]
  rows = [(name, row) for name, row in metrics['per_category'].items()]
  rows.append(('average over categories', metrics['category_average']))
  text = io.StringIO()
  out = csv.writer(text)
  out.writerow(['category'] + columns + ['num_queries'])
  for name, row in rows:
    out.writerow([name] + [f'{row[c]:.4f}' for c in columns] + [row.get('num_queries', '')])
  # The Markdown table is for reading, in percent as papers print them; the CSV keeps the
  # fractions of metrics.json.
  lines = ['| category | ' + ' | '.join(f'{c} %' for c in columns) + ' | queries |',
           '|---' * (len(columns) + 2) + '|']
  for name, row in rows:
    cells = [f'{100 * row[c]:.1f}' for c in columns] + [str(row.get('num_queries', ''))]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return {'per_category.csv': text.getvalue(), 'per_category.md': '\n'.join(lines) + '\n'}


def ranked_list_rows(data: EvalData, ranking: Ranking,
                     e: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The worst and best evaluated queries by AP, and each one's top gallery indices.

  The lists are in the order `ranking` scored (re-ranked when it was). Returns (chosen [R]
  query indices, indices [R, eval.top_k_shown]).
  """
  order = np.argsort(ranking.ap[ranking.valid], kind='stable')
  chosen = np.flatnonzero(ranking.valid)[order]
  rows = e.num_ranked_queries
  if len(chosen) > rows:
    chosen = np.concatenate([chosen[:rows // 2], chosen[len(chosen) - (rows - rows // 2):]])
  reranked = ranking.reranked
  indices, _ = retrieval_metrics.rank_gallery(
      _cast(data.query.embeddings[chosen], e), _cast(data.gallery.embeddings, e), e.top_k_shown,
      rerank=None if reranked is None else reranked.select(chosen))
  return chosen, np.asarray(indices)


def draw_ranked_lists(data: EvalData, ranking: Ranking,
                      e: ml_collections.ConfigDict) -> Image.Image:
  """Worst and best evaluated queries by AP, each with its top results (ranked_list_rows)."""
  chosen, indices = ranked_list_rows(data, ranking, e)
  results = data.read_images('gallery', data.gallery.select(indices.ravel()))
  width = indices.shape[1]
  return visualize.ranked_list_image(
      queries=data.read_images('query', data.query.select(chosen)),
      results=[results[row * width:(row + 1) * width] for row in range(len(chosen))],
      correct=list(data.gallery.item_id[indices] == data.query.item_id[chosen, None]),
      titles=[f'AP {ranking.ap[i]:.2f}' for i in chosen])


register_evaluator('retrieval', Retrieval)
register_evaluator('per_category', PerCategory)
register_evaluator('rerank', functools.partial(Retrieval, rerank=True))
register_evaluator('centroids', Centroids)
register_evaluator('recommendation', Recommendation)
register_evaluator('verification', Verification)
register_evaluator('query_expansion', QueryExpansion)
