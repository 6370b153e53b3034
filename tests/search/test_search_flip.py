"""A workdir evaluated with the test-time flip (eval.flip) is searched with it too."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fashion_jax.search import index as search_index
from fashion_jax.search.images import InputError
from fashion_jax.search.model import SearchModel


def _flip_workdir(path, workdir) -> str:
  shutil.copytree(os.path.join(workdir, 'checkpoints'), os.path.join(path, 'checkpoints'))
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['eval']['flip'] = True
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  return str(path)


def test_flip_workdir_embeds_mirror_images_alike_and_has_its_own_fingerprint(
    tmp_path, workdir, model, make_image):
  assert 'flip' not in model.preprocessing  # workdirs without it keep their fingerprints
  flip = SearchModel(_flip_workdir(tmp_path / 'flip', workdir))
  assert flip.preprocessing == {**model.preprocessing, 'flip': True}
  assert flip.fingerprint != model.fingerprint
  crop = make_image(2, 0, (60, 40))
  mirror = np.ascontiguousarray(crop[:, ::-1])
  together = flip.embed_crops([crop, mirror])
  np.testing.assert_allclose(together[0], together[1], atol=1e-5)
  plain = model.embed_crops([crop, mirror])
  assert np.abs(plain[0] - plain[1]).max() > 1e-3
  # (The flip itself is checked in tests/models/test_flip_embedding.py.) Exports hold it too.
  fn = jax.jit(flip.embed_with_params_fn())
  exported = [np.asarray(fn(flip.weights, image[None]))[0] for image in (crop, mirror)]
  np.testing.assert_allclose(exported[0], exported[1], atol=1e-5)
  # The export resizes in JAX, the search tool on the host: the pixels differ by rounding.
  np.testing.assert_allclose(exported[0], together[0], atol=2e-4)
  with pytest.raises(InputError, match="flip False in the index, True here") as error:
    search_index.check_model({'model': model.describe()}, flip)
  assert len(str(error.value).splitlines()) == 1
