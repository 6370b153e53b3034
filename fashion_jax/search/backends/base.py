"""The interface every search backend implements, and the table that picks one by name.

A backend holds catalogue vectors, one per row (an image, or a product's centroid), each with a
product number and a category number, and answers "the k best products for this query, inside
this category": several rows of one product collapse to its best score. The index directory
(`search/index.py`) stays the record of what each row is; a backend only searches it.
"""

import abc
from typing import ClassVar

import numpy as np

NO_CATEGORY = -1  # a row without a category, or a search without a category filter


class BackendError(ValueError):
  """A backend's service refused or could not be reached; the message is one line."""


class Backend(abc.ABC):
  """Product-level nearest-neighbour search over unit vectors by inner product."""

  name: ClassVar[str]
  settings: ClassVar[tuple[str, ...]] = ()  # the names of its settings

  @classmethod
  def settings_for(cls, directory: str, settings: dict, *, new: bool) -> dict:
    """`settings` as index.json records them for the index in `directory`: checked (a
    one-line ValueError for a name the backend does not take), normalised, and for a `new`
    index completed with what must not change after. Called before any image is read."""
    unknown = sorted(set(settings) - set(cls.settings))
    if unknown:
      known = ', '.join(cls.settings) or 'none'
      raise ValueError(f'the {cls.name} backend has no setting {unknown[0]!r} (its settings: '
                       f'{known})')
    del directory, new
    return dict(settings)

  @classmethod
  def create(cls, directory: str, dim: int, dtype: str, settings: dict) -> 'Backend':
    """A new, empty backend for the index being built in `directory`. `settings` are the
    backend's options (recorded in index.json as 'backend_settings'); `dtype` the index's
    vector type ('float16' or 'float32')."""
    raise NotImplementedError

  @classmethod
  def check_open(cls, index) -> None:
    """Raises a one-line ValueError when the backend of `index` (an existing index) cannot be
    reached now: a server down, storage another process holds. Called before a change reads
    any image (nothing to check by default)."""
    del index

  @classmethod
  def check(cls, dim: int, rows: int, settings: dict) -> None:
    """Raises a one-line ValueError for `settings` that cannot hold `rows` rows of `dim` dims.
    Called before any image of a new index is read, so that a mistake there costs no
    embedding (nothing to check by default)."""
    del dim, rows, settings

  @classmethod
  @abc.abstractmethod
  def open(cls, index, *, centroids: bool) -> 'Backend':
    """The backend of a loaded index (`search.index.SearchIndex`), ready to search: its image
    rows, or with `centroids` one row per product (row number = product number)."""

  @abc.abstractmethod
  def add(self, rows: np.ndarray, vectors: np.ndarray, products: np.ndarray,
          categories: np.ndarray) -> None:
    """Adds rows [N] int64 with vectors [N, D] (unit), product numbers [N] and categories [N]."""

  @abc.abstractmethod
  def remove(self, rows: np.ndarray) -> None:
    """Removes rows [N] int64; a removed row is never returned again."""

  @abc.abstractmethod
  def search(self, queries: np.ndarray, k: int,
             category: int = NO_CATEGORY) -> tuple[np.ndarray, np.ndarray]:
    """The k best products of each query [Q, D] float32 (unit), best first.

    A product scores the best inner product of its rows. With `category` >= 0 only rows of
    that category take part, inside the search. Returns (scores [Q, k] float32, -inf where
    fewer products qualify; products [Q, k] int64, -1 there). Equal scores rank the lower
    product number first.
    """

  def save(self, directory: str) -> None:
    """Writes what the backend needs besides the index's own files (nothing by default)."""
    del directory

  @abc.abstractmethod
  def __len__(self) -> int:
    """The number of rows held."""


_BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
  """Class decorator: makes `cls` selectable as `--backend <cls.name>`."""
  if cls.name in _BACKENDS:
    raise ValueError(f'search backend {cls.name!r} is already registered')
  _BACKENDS[cls.name] = cls
  return cls


def backend_names() -> list[str]:
  return list(_BACKENDS)


def get(name: str) -> type[Backend]:
  if name not in _BACKENDS:
    raise ValueError(f'unknown search backend {name!r}; choose one of {", ".join(_BACKENDS)}')
  return _BACKENDS[name]
