"""Tests for the evaluator registry (fashion_jax/evaluators.py) and evaluate() running a registered
evaluator end to end on fashion_synth/tiny."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tiny_config
from fashion_jax import configlib, evaluate, evaluators
from fashion_jax import train_step as ts


class MeanCosine:
  """A toy evaluator: the mean cosine similarity of every query-gallery pair."""
  name = 'mean_cosine'

  def __init__(self, e):
    self.key = e.mean_cosine_key  # an option of its own, read from config.eval

  def run(self, data: evaluators.EvalData) -> evaluators.EvalResult:
    unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
    similarity = unit(data.query.embeddings) @ unit(data.gallery.embeddings).T
    return evaluators.EvalResult({self.key: float(similarity.mean())})


@pytest.fixture
def registry(monkeypatch):
  """EVALUATORS as a copy, so that the evaluators a test registers leave with it."""
  monkeypatch.setattr(evaluators, 'EVALUATORS', dict(evaluators.EVALUATORS))
  evaluators.register_evaluator('mean_cosine', MeanCosine)


@jax.jit
def _mean_colour(images: jax.Array) -> jax.Array:
  """[B, H, W, 3] uint8 -> [B, 3]: a model-free embedding, enough to run the evaluation."""
  return images.astype(jnp.float32).mean(axis=(1, 2)) / 255.0 + 0.1


def test_registered_evaluator_runs_through_evaluate(registry, tiny_data_dir, tiny_builder,
                                                    tmp_path):
  config = tiny_config.get_config()
  config.dataset.data_dir = tiny_data_dir
  config.eval.evaluators = ('retrieval', 'mean_cosine')
  config.eval.mean_cosine_key = 'mean_query_gallery_cosine'
  configlib.validate_config(config, num_devices=jax.device_count())
  mesh = ts.make_mesh()
  metrics = evaluate.evaluate(config, embed=_mean_colour, builder=tiny_builder, mesh=mesh,
                              workdir=str(tmp_path), step=3)

  data = evaluate.eval_data(_mean_colour, tiny_builder, config, mesh)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  expected = np.mean(unit(data.query.embeddings) @ unit(data.gallery.embeddings).T)
  assert metrics['mean_query_gallery_cosine'] == pytest.approx(expected, abs=1e-6)
  with open(tmp_path / 'eval' / 'metrics.json') as f:
    assert json.load(f) == metrics
  assert list(metrics)[:3] == ['step', 'num_gallery', 'mAP']
  assert list(metrics)[-1] == 'mean_query_gallery_cosine'
  assert os.path.exists(tmp_path / 'eval' / 'ranked_lists.png')


def test_evaluator_names_follow_the_list_then_the_switches():
  e = configlib.base_config().eval
  assert evaluators.evaluator_names(e) == ('retrieval', 'verification')
  e.recommendation = e.per_category = True
  assert evaluators.evaluator_names(e) == ('retrieval', 'verification', 'per_category',
                                           'recommendation')
  e.evaluators = ('retrieval', 'recommendation', 'centroids')
  assert evaluators.evaluator_names(e) == ('retrieval', 'recommendation', 'centroids',
                                           'per_category')


@pytest.mark.parametrize('names, message', [
    (('retrieval', 'nope'), "eval.evaluators: unknown 'nope'"),
    (('centroids',), "must list 'retrieval'"),
    (('retrieval', 'centroids', 'centroids'), 'lists an evaluator twice'),
])
def test_check_config_rejects(names, message):
  config = configlib.base_config()
  config.dataset.name = 'fashion_synth/tiny'
  config.eval.evaluators = names
  with pytest.raises(ValueError, match=message):
    configlib.validate_config(config, num_devices=1)


def test_two_evaluators_reporting_one_key_are_refused(registry):
  config = configlib.base_config()
  config.eval.evaluators = ('retrieval', 'mean_cosine', 'also_cosine')
  config.eval.mean_cosine_key = 'cosine'
  also = type('AlsoCosine', (MeanCosine,), {'name': 'also_cosine'})
  evaluators.register_evaluator('also_cosine', also)
  with pytest.raises(ValueError, match='already registered'):
    evaluators.register_evaluator('also_cosine', also)
  rng = np.random.default_rng(0)
  split = evaluators.Embeddings(rng.normal(size=(6, 4)).astype(np.float32),
                                np.arange(6) % 3, *np.zeros((4, 6), np.int64))
  data = evaluators.EvalData(split, split)
  with pytest.raises(ValueError, match="'mean_cosine' and 'also_cosine' both report 'cosine'"):
    evaluators.run_evaluators(data, evaluators.from_config(config.eval))


def test_ranked_lists_show_the_last_ranking_scored():
  """With re-ranking on, ranked_lists.png shows the re-ranked order, as before evaluators."""
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(10, 8))
  make = lambda ids, domain: evaluators.Embeddings(
      (centres[ids] + rng.normal(scale=0.8, size=(len(ids), 8))).astype(np.float32), ids,
      np.zeros_like(ids), np.full_like(ids, domain), np.zeros_like(ids), np.arange(len(ids)))
  query, gallery = make(np.arange(20) % 10, 0), make(np.arange(60) % 10, 1)
  # Each image drawn as a flat tile of its row's shade: the picture shows which rows were chosen.
  tiles = lambda which, rows: [np.full((8, 8, 3), p, np.uint8) for p in rows.position * 4]
  data = evaluators.EvalData(query, gallery, read_images=tiles)
  config = configlib.base_config()
  config.eval.rerank = True
  config.eval.top_k_shown = 20
  result = evaluators.run_evaluators(data, evaluators.from_config(config.eval))
  drawn = np.asarray(result.pictures['ranked_lists.png']())
  picture = lambda rerank: np.asarray(evaluators.draw_ranked_lists(
      data, evaluators.Retrieval(config.eval, rerank=rerank).rank(data), config.eval))
  np.testing.assert_array_equal(drawn, picture(True))
  assert not np.array_equal(drawn, picture(False))


def test_reports_of_evaluators_that_no_longer_run_are_removed(tmp_path):
  # A per-category table left from an evaluation with eval.per_category on used to stay beside
  # metrics.json after it was switched off.
  curve = {'unconstrained': np.linspace(0.2, 1.0, 5)}
  blank = lambda: Image.new('RGB', (8, 8))
  first = evaluators.EvalResult(curves=curve, tables={'per_category.csv': 'a,b\r\n'},
                                pictures={'roc.png': blank, 'ranked_lists.png': blank})
  evaluate.write_reports({'step': 1}, first, str(tmp_path))
  (tmp_path / 'notes.txt').write_text('mine')  # not a report: kept
  second = evaluators.EvalResult(curves=curve, pictures={'ranked_lists.png': blank})
  evaluate.write_reports({'step': 2}, second, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['cmc.png', 'history.jsonl', 'metrics.json',
                                          'notes.txt', 'ranked_lists.png', 'reports.json']
  assert len((tmp_path / 'history.jsonl').read_text().splitlines()) == 2


def test_history_keeps_an_evaluation_repeated_with_the_same_result_once(tmp_path):
  # A finished run run again re-evaluates its last step: the same line twice told nothing.
  result = evaluators.EvalResult(curves={'unconstrained': np.linspace(0.2, 1.0, 5)})
  for metrics in ({'step': 4, 'mAP': 0.5}, {'step': 4, 'mAP': 0.5}, {'step': 4, 'mAP': 0.6},
                  {'step': 6, 'mAP': 0.5}):
    evaluate.write_reports(metrics, result, str(tmp_path))
  lines = [json.loads(line) for line in (tmp_path / 'history.jsonl').read_text().splitlines()]
  assert lines == [{'step': 4, 'mAP': 0.5}, {'step': 4, 'mAP': 0.6}, {'step': 6, 'mAP': 0.5}]
