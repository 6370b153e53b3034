"""What a run writes for TensorBoard, read back from its event files: the evaluation's pictures,
the config as hparams (the HParams tab) and as text."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import tiny_config
from fashion_jax import train


@pytest.fixture(scope='module')
def run(tiny_data_dir, tmp_path_factory):
  config = tiny_config.get_config()
  config.dataset.data_dir = tiny_data_dir
  config.train.num_epochs = 1
  workdir = str(tmp_path_factory.mktemp('tensorboard'))
  train.train_and_evaluate(config, workdir)
  events = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  return config, workdir, events


def test_pictures_of_each_evaluation_are_images(run):
  _, workdir, events = run
  assert sorted(events.PluginTagToContent('images')) == ['eval/cmc', 'eval/ranked_lists',
                                                         'eval/roc']
  for name in ('cmc', 'ranked_lists', 'roc'):
    written = events.Tensors(f'eval/{name}')
    assert [event.step for event in written] == [0, 2]  # the untrained model, the end
    # An image summary holds width, height and the PNG.
    width, height, png = tf.make_ndarray(written[-1].tensor_proto)
    with Image.open(os.path.join(workdir, 'eval', f'{name}.png')) as saved:
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))),
                                    np.asarray(saved.convert('RGB')))
      assert (int(width), int(height)) == saved.size


def test_config_is_hparams_and_text(run):
  config, workdir, events = run
  content = events.PluginTagToContent('hparams')['_hparams_/session_start_info']
  hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  assert hparams['optim.base_lr'].number_value == pytest.approx(config.optim.base_lr)
  assert hparams['loss.metric'].string_value == 'triplet'
  assert hparams['input.image_size'].string_value == '(32, 32)'
  assert hparams['eval.per_category'].bool_value is False
  assert hparams['model.pretrained'].string_value == 'None'
  assert len(hparams) == len(train.hparams(config))

  assert list(events.PluginTagToContent('text')) == ['config']
  text = tf.make_ndarray(events.Tensors('config')[0].tensor_proto).item().decode()
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.loads(text) == json.load(f)
