"""Data sets as random-access sources plus one numpy batcher.

A data set is a :class:`Dataset`: two :class:`Source` objects (train, test), each giving raw
examples by index, and two pure numpy functions -- ``preprocess`` (raw batch -> float32 model
input) and ``augment`` (train split only). The batcher shuffles with a seed that depends only
on ``(seed, epoch)``, reads only this process's shard, and pads the last eval batch with a
mask so every test example is counted exactly once.

Model input layout: static images ``[B, H, W, C]`` (the model repeats them over ``T``);
event frames ``[B, T, H, W, C]`` (the model moves ``T`` to the front).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Protocol

import numpy as np


class DataNotFoundError(RuntimeError):
  """A data set is missing or incomplete; the message says where and how to prepare it."""


class Source(Protocol):
  """Random access to raw examples."""

  def __len__(self) -> int:
    ...

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw examples ``[len(indices), ...]`` and integer labels ``[len(indices)]``."""
    ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A :class:`Source` over in-memory arrays."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


def _identity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  del rng
  return x


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A data set ready for the batcher.

  Attributes:
    name: registry name.
    num_classes: label range ``[0, num_classes)``.
    train, test: sources of raw examples.
    input_shape: one preprocessed example, ``(H, W, C)`` or ``(T, H, W, C)``.
    preprocess: raw batch -> float32 batch with ``input_shape`` per example.
    augment: preprocessed train batch + generator -> augmented batch (train split only).
  """
  name: str
  num_classes: int
  train: Source
  test: Source
  input_shape: tuple[int, ...]
  preprocess: Callable[[np.ndarray], np.ndarray]
  augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] = _identity

  @property
  def is_sequence(self) -> bool:
    """True for event frames ``[T, H, W, C]`` (no repetition over time needed)."""
    return len(self.input_shape) == 4


def shard_indices(n: int, process_index: int, process_count: int) -> np.ndarray:
  """This process's deterministic share of ``range(n)``: every ``process_count``-th index."""
  return np.arange(process_index, n, process_count)


def num_batches(n: int, batch_size: int, *, drop_remainder: bool) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


def iterate_batches(dataset: Dataset,
                    split: str,
                    *,
                    batch_size: int,
                    seed: int = 0,
                    epoch: int = 0,
                    process_index: int = 0,
                    process_count: int = 1,
                    start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's batches of one epoch of ``split`` (``'train'`` or ``'test'``).

  Train: shuffled by ``(seed, epoch)`` over the *global* index set, then sharded, so every
  process sees a disjoint slice of the same permutation; the last incomplete batch is dropped;
  ``augment`` is applied. Test: in order, no augmentation, the last batch padded with
  ``mask = 0`` rows.

  Args:
    batch_size: per-process batch size.
    start_batch: skip this many batches (resuming inside an epoch).

  Yields:
    ``{'image': float32 [B, ...], 'label': int32 [B], 'mask': float32 [B]}``.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  train = split == 'train'
  source = dataset.train if train else dataset.test
  n = len(source)
  order = np.arange(n)
  if train:
    order = np.random.default_rng([seed, epoch]).permutation(n)
  # Shard the (global) order so process p gets positions p, p + P, ...: with the same
  # global batch every process reads its own rows of it.
  order = order[shard_indices(n, process_index, process_count)]
  # Every process must yield the same number of batches (each batch is one collective step),
  # though shards differ by a row when process_count does not divide n: train counts the
  # smallest shard, test the largest (the others get a padded, possibly all-padding, batch).
  shard = n // process_count if train else -(-n // process_count)
  nb = num_batches(shard, batch_size, drop_remainder=train)
  for b in range(start_batch, nb):
    idx = order[b * batch_size:(b + 1) * batch_size]
    if not len(idx):  # test only: this shard is one row short and has run out
      yield {'image': np.zeros((batch_size,) + dataset.input_shape, np.float32),
             'label': np.zeros(batch_size, np.int32), 'mask': np.zeros(batch_size, np.float32)}
      continue
    x, y = source.get_batch(np.sort(idx) if not train else idx)
    x = dataset.preprocess(x)
    if train:
      x = dataset.augment(x, np.random.default_rng([seed, epoch, b, process_index]))
    mask = np.ones(len(idx), np.float32)
    if len(idx) < batch_size:
      pad = batch_size - len(idx)
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    yield {'image': np.asarray(x, np.float32), 'label': np.asarray(y, np.int32), 'mask': mask}


# --- The embedded data set: scikit-learn's 8x8 digits --------------------------------------


def load_digits(*, test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), no download.

  A stratified, seeded train/test split (``test_fraction`` of each class held out). Pixels
  ``0..16`` are scaled to ``[0, 1]``; input shape ``(8, 8, 1)``.
  """
  from sklearn import datasets as sk_datasets  # Deferred: only this data set needs sklearn.
  from sklearn import model_selection

  digits = sk_datasets.load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # values 0..16
  labels = digits.target.astype(np.int32)
  tr, te = model_selection.train_test_split(
      np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=split_seed)
  return Dataset(
      name='digits',
      num_classes=10,
      train=ArraySource(images[np.sort(tr)], labels[np.sort(tr)]),
      test=ArraySource(images[np.sort(te)], labels[np.sort(te)]),
      input_shape=(8, 8, 1),
      preprocess=lambda x: x.astype(np.float32) / 16.0,
  )


DATASETS = ('digits', 'cifar10', 'cifar100', 'tinyimagenet', 'cifar10dvs')


def create_dataset(cfg, *, T: int) -> Dataset:
  """Builds the data set named ``cfg.name`` from a config's ``data`` section.

  Args:
    cfg: ``ml_collections.ConfigDict`` with at least ``name`` (one of ``DATASETS``) and, for
      the real data sets, ``data_dir``.
    T: time steps of the model (event data sets bin their events into ``T`` frames).

  Raises:
    ValueError: unknown name.
    DataNotFoundError: the files are missing; the message names the place and the fix.
  """
  dataset = _create(cfg, T)
  for split in ('train', 'test'):
    if len(getattr(dataset, split)) == 0:
      raise DataNotFoundError(f'{dataset.name}: the {split} split under '
                              f'{cfg.data_dir or "(embedded)"} is empty')
  return dataset


def _create(cfg, T: int) -> Dataset:
  name = cfg.name
  if name == 'digits':
    return load_digits(test_fraction=cfg.get('test_fraction', 0.25),
                       split_seed=cfg.get('split_seed', 0))
  # Deferred imports: the real loaders pull in tensorflow-datasets, PIL and tonic.
  from mfp_jax import data_sources
  data_dir = os.path.expanduser(cfg.data_dir)
  if name in ('cifar10', 'cifar100'):
    return data_sources.load_cifar(name, data_dir, cutout=cfg.get('cutout', 0))
  if name == 'tinyimagenet':
    return data_sources.load_tinyimagenet(data_dir)
  if name == 'cifar10dvs':
    return data_sources.load_cifar10dvs(data_dir, T=T, size=cfg.get('size', 48),
                                        split_seed=cfg.get('split_seed', 0))
  raise ValueError(f'unknown data set {name!r}; allowed: {list(DATASETS)}')
