"""`search verify`: a sound index passes; damage a search would not notice is found."""

import json
import os
import shutil

import numpy as np
import pytest

from fashion_jax.search import index as search_index
from fashion_jax.search.__main__ import main
from index_files import index_file


@pytest.fixture
def index_copy(index_dir, tmp_path):
  path = str(tmp_path / 'index')
  shutil.copytree(index_dir, path)
  return path


def _verify(path, capsys):
  code = main(['verify', '--index', path, '--quiet'])
  out, err = capsys.readouterr()
  return code, out, err


def _flip(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x40]))


def test_a_sound_index_verifies(index_copy, capsys):
  assert main(['verify', '--index', index_copy]) == 0
  out, err = capsys.readouterr()
  assert out.splitlines()[-1] == f'{index_copy}: verified, no problems'
  assert 'checked: 2 of 2 files match their recorded size and sha256' in out
  assert 'checked: embeddings: 12 live rows are finite unit vectors' in out
  assert 'checked: thumbnails: all 12 live rows have one' in out
  assert 'problem' not in err


def test_a_flipped_byte_in_the_embeddings_is_found_though_the_index_still_opens(index_copy,
                                                                             capsys):
  name = index_file(index_copy, 'embeddings')
  path = os.path.join(index_copy, name)
  stored = np.load(path, mmap_mode='r')  # float32 [rows, dim] after the .npy header
  # Row 5, the sign and exponent of its dimension 7.
  _flip(path, stored.offset + 5 * stored.strides[0] + 7 * stored.strides[1] + 3)
  del stored
  index = search_index.SearchIndex(index_copy)  # a search trusts it: no error
  with np.errstate(over='ignore'):
    assert not abs(np.linalg.norm(index.embeddings[5]) - 1) < 0.01
  code, _, err = _verify(index_copy, capsys)
  assert code == 1
  assert f'problem: {name}: its sha256 is not the one index.json records' in err
  assert 'problem: embeddings: 1 live rows are not finite unit vectors (rows 5)' in err
  assert err.splitlines()[-1] == f'{index_copy}: 2 problem(s): damaged index'


def test_thumbnails_missing_or_changed_are_found(index_copy, capsys):
  os.remove(os.path.join(index_copy, 'thumbs', '00000003.jpg'))
  with open(os.path.join(index_copy, 'thumbs', '00000004.jpg'), 'wb') as f:
    f.write(b'not a picture')
  _flip(os.path.join(index_copy, 'thumbs', '00000007.jpg'), 200)  # inside: still a JPEG
  code, _, err = _verify(index_copy, capsys)
  assert code == 1
  assert 'thumbnails: 1 live rows have none (rows 3)' in err
  assert 'thumbnails: 2 are not the JPEGs written (rows 4, 7)' in err


def test_index_json_changed_by_hand_and_names_outside_the_index_are_found(index_copy, tmp_path,
                                                                          capsys):
  meta_path = os.path.join(index_copy, 'index.json')
  with open(meta_path) as f:
    meta = json.load(f)
  meta['categories'][0] = meta['categories'][0] + 'x'  # a rename a query would then refuse
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  code, _, err = _verify(index_copy, capsys)
  assert code == 1 and 'index.json: its fields are not those its sha256 was computed from' in err
  for outside in ('/dev/zero', '../outside.npy'):
    meta['checksums'] = {outside: {'bytes': 1, 'sha256': '0'}}
    with open(meta_path, 'w') as f:
      json.dump(meta, f)
    code, _, err = _verify(index_copy, capsys)
    assert code == 1 and 'checksums (not files inside the index)' in err, err


def test_an_index_without_records_and_a_killed_change_are_notes_not_problems(index_copy,
                                                                            capsys):
  meta_path = os.path.join(index_copy, 'index.json')
  with open(meta_path) as f:
    meta = json.load(f)
  del meta['checksums'], meta['meta_sha256']  # as an index written before them
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  # What an `index` killed before its commit leaves.
  leftover = f"embeddings-{meta['generation'] + 1}.npy"
  shutil.copy(os.path.join(index_copy, meta['files']['embeddings']),
              os.path.join(index_copy, leftover))
  code, out, err = _verify(index_copy, capsys)
  assert code == 0 and not err
  assert 'note: no sizes and sha256 recorded' in out
  assert f'note: 1 files of a change that did not finish or of earlier generations ({leftover})' \
      in out
  # The next change records them, and deletes the leftover (a remove keeps the embeddings).
  assert main(['remove', '--index', index_copy, '--products', 'sku-2']) == 0
  code, out, err = _verify(index_copy, capsys)
  assert code == 0 and 'note' not in out, out
  assert not os.path.exists(os.path.join(index_copy, leftover))


def test_a_damaged_index_json_is_a_problem_and_a_folder_that_is_not_an_index_an_error(
    index_copy, tmp_path, capsys):
  with open(os.path.join(index_copy, 'index.json'), 'a') as f:
    f.write('}')
  code, _, err = _verify(index_copy, capsys)
  assert code == 1 and 'index.json is not valid JSON' in err
  assert main(['verify', '--index', str(tmp_path / 'nothing')]) == 2
  assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'}: not a search index (no " \
      'index.json)\n'
