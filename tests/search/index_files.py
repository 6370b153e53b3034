"""The files of a search index's current generation, as its index.json names them."""

import json
import os


def index_file(directory, role: str) -> str:
  """The name of the file with `role` ('embeddings', 'items', 'centroids', 'backend')."""
  with open(os.path.join(directory, 'index.json')) as f:
    return json.load(f)['files'][role]


def items_text(directory) -> str:
  """The items file's text: what a change that must not happen would alter."""
  with open(os.path.join(directory, index_file(directory, 'items'))) as f:
    return f.read()
