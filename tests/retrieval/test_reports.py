"""Tests for the built-in evaluators (fashion_jax/evaluators.py) and the report writing of
fashion_jax/evaluate.py on plain arrays, no model."""


import numpy as np
import pytest
import retrieval_reference as reference
from PIL import Image

from fashion_jax import configlib, evaluate, evaluators
from fashion_jax.retrieval import metrics


def _embeddings(split: dict) -> evaluators.Embeddings:
  rows = len(split['item_id'])
  return evaluators.Embeddings(**split, process=np.zeros(rows, np.int64),
                               position=np.arange(rows))


@pytest.fixture(scope='module')
def splits():
  data = reference.clustered(7, num_queries=50, gallery_size=150, num_categories=3)
  query = {'embeddings': data['query_emb'], 'item_id': data['query_ids'],
           'category': data['query_groups'], 'domain': np.zeros(50, np.int64)}
  gallery = {'embeddings': data['gallery_emb'], 'item_id': data['gallery_ids'],
             'category': data['gallery_groups'], 'domain': np.ones(150, np.int64)}
  return query, gallery


def test_score_with_every_switch(splits, tmp_path):
  query, gallery = splits
  config = configlib.base_config()
  config.eval.per_category = config.eval.rerank = config.eval.centroids = True
  config.eval.recommendation = True
  config.eval.gallery_chunk_size = 64
  data = evaluators.EvalData(_embeddings(query), _embeddings(gallery), ['tops', 'skirts', 'bags'])
  result = evaluators.run_evaluators(data, evaluators.from_config(config.eval))
  scores, curves = result.metrics, result.curves
  ks = tuple(config.eval.ks)
  plain = metrics.evaluate_retrieval(query['embeddings'], gallery['embeddings'],
                                     query['item_id'], gallery['item_id'], ks=ks)
  assert {k: scores[k] for k in plain} == pytest.approx(plain)
  assert sorted(scores['per_category']) == ['bags', 'skirts', 'tops']
  assert scores['category_average']['mAP'] == pytest.approx(
      np.mean([row['mAP'] for row in scores['per_category'].values()]))
  # Every category holds an id's whole set of images, so constraining cannot lose a positive.
  assert scores['category_constrained']['mAP'] >= plain['mAP']
  assert scores['reranked']['mAP'] != pytest.approx(plain['mAP'])
  assert scores['centroids']['num_gallery'] == len(np.unique(gallery['item_id']))
  # A gallery image is never its own positive: ids with one image are skipped.
  singles = np.sum(np.bincount(gallery['item_id']) == 1)
  assert scores['recommendation']['num_skipped'] == singles
  assert set(curves) == {'unconstrained', 'category constrained', 're-ranked', 'centroids',
                         'recommendation'}
  np.testing.assert_allclose(curves['unconstrained'][[0, 4]], [plain['acc@1'], plain['acc@5']])

  evaluate.write_reports(scores, result, str(tmp_path))
  table = (tmp_path / 'per_category.md').read_text().splitlines()
  assert len(table) == 2 + 3 + 1 and table[-1].startswith('| average over categories |')
  # Percent in the Markdown, whose header says so; fractions in the CSV, as in metrics.json.
  assert table[0].startswith('| category | mAP % | mINP % | acc@1 % |')
  average = scores['category_average']['mAP']
  assert table[-1].split(' | ')[1] == f'{100 * average:.1f}'
  assert f'{average:.4f}' in (tmp_path / 'per_category.csv').read_text().splitlines()[-1]
  assert (tmp_path / 'per_category.csv').read_text().count('\n') == 5
  assert Image.open(tmp_path / 'cmc.png').size == (640, 420)


def test_domain_filter_keeps_named_rows(splits):
  query, _ = splits
  mixed = _embeddings(dict(query, domain=np.arange(50) % 2))
  kept = vars(evaluate._domain_filter(mixed, 'shop', ['street', 'shop'], 'query'))
  assert len(kept['item_id']) == 25 and (kept['domain'] == 1).all()
  assert evaluate._domain_filter(mixed, '', ['street', 'shop'], 'query') is mixed
  with pytest.raises(ValueError, match="eval.query_domain 'studio'"):
    evaluate._domain_filter(mixed, 'studio', ['street', 'shop'], 'query')


@pytest.mark.parametrize('rerank', [False, True])
def test_ranked_lists_show_the_order_the_metrics_scored(splits, rerank):
  query, gallery = splits
  config = configlib.base_config()
  config.eval.num_ranked_queries = 10
  config.eval.top_k_shown = 150
  data = evaluators.EvalData(_embeddings(query), _embeddings(gallery))
  ranking = evaluators.Retrieval(config.eval, rerank=rerank).rank(data)
  ap, first_rank, valid, _, reranked = ranking
  assert (reranked is not None) == rerank
  chosen, indices = evaluators.ranked_list_rows(data, ranking, config.eval)
  assert len(chosen) == 10 and valid[chosen].all()
  assert ap[chosen[0]] == ap[valid].min() and ap[chosen[-1]] == ap[valid].max()
  for i, row in zip(chosen, indices):
    correct = gallery['item_id'][row] == query['item_id'][i]
    # The shown list's first correct item sits where the metrics found it, and its AP is theirs.
    assert np.argmax(correct) == first_rank[i]
    hits = np.flatnonzero(correct)
    assert np.mean(np.arange(1, len(hits) + 1) / (hits + 1)) == pytest.approx(ap[i], abs=1e-6)
