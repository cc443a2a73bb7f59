"""Data sets as random-access sources plus one numpy batcher.

A data set is a :class:`Dataset`: two :class:`Source` objects (train, test), each giving raw
examples by index, and two pure numpy functions -- ``preprocess`` (raw batch -> float32 model
input) and ``augment`` (train split only). The batcher (:class:`EpochBatches`, one epoch by
batch index; :func:`iterate_batches`, in order) shuffles with a seed that depends only on
``(seed, epoch)``, reads only this process's shard, and pads the last eval batch with a mask
so every test example is counted exactly once. :mod:`mfp_jax.pipeline` builds the same
batches ahead, in background threads or worker processes.

Model input layout: static images ``[B, H, W, C]`` (the model repeats them over ``T``);
event frames ``[B, T, H, W, C]`` and sequences ``[B, T, F]`` (the model moves ``T`` to the
front).

Data sets are registered by name (:func:`register_dataset`) with a loader and a
:class:`DataSpec` (one example's shape and the class count, known without reading any data,
so a cost report needs no data on disk). A config's ``data`` section holds ``name``,
``batch_size``, ``eval_batch_size`` and the loader's keyword arguments; a loader that takes
``T`` gets the model's. Or skip the registry: ``train_lib.train_and_evaluate(config, workdir,
dataset=Dataset(...))`` trains on any :class:`Dataset`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from mfp_jax import registry


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
    input_shape: one preprocessed example: ``(H, W, C)`` images, ``(T, H, W, C)`` event
      frames or ``(T, F)`` sequences.
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
    """True when an example has its own time axis first (event frames ``(T, H, W, C)``,
    sequences ``(T, F)``): the model's ``T`` must match it (no repetition over time)."""
    return len(self.input_shape) in (2, 4)

  @property
  def spec(self) -> DataSpec:
    return DataSpec(tuple(self.input_shape), int(self.num_classes))


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a model needs to know of a data set before any data is read."""
  input_shape: tuple[int, ...]  # one preprocessed example
  num_classes: int


def shard_indices(n: int, process_index: int, process_count: int) -> np.ndarray:
  """This process's deterministic share of ``range(n)``: every ``process_count``-th index."""
  return np.arange(process_index, n, process_count)


def num_batches(n: int, batch_size: int, *, drop_remainder: bool) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


class EpochBatches:
  """One epoch of this process's batches of a split, by batch index (random access).

  ``batches[b]`` builds batch ``b`` from scratch (read, preprocess, augment), so batches can be
  built in any order, in threads or in other processes (:mod:`mfp_jax.pipeline`), and are
  the same wherever they are built. Train: shuffled by ``(seed, epoch)`` over the *global*
  index set, then sharded, so every process sees a disjoint slice of the same permutation;
  the last incomplete batch is dropped; ``augment`` gets the generator seeded
  ``(seed, epoch, b, process_index)``. Test: in order, no augmentation, the last batch padded
  with ``mask = 0`` rows.

  Args:
    split: ``'train'`` or ``'test'``.
    batch_size: per-process batch size.
  """

  def __init__(self, dataset: Dataset, split: str, *, batch_size: int, seed: int = 0,
               epoch: int = 0, process_index: int = 0, process_count: int = 1):
    if split not in ('train', 'test'):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    self.dataset, self.split, self.batch_size = dataset, split, batch_size
    self.seed, self.epoch, self.process_index = seed, epoch, process_index
    train = split == 'train'
    n = len(dataset.train if train else dataset.test)
    order = np.arange(n)
    if train:
      order = np.random.default_rng([seed, epoch]).permutation(n)
    # Shard the (global) order so process p gets positions p, p + P, ...: with the same
    # global batch every process reads its own rows of it.
    self.order = order[shard_indices(n, process_index, process_count)]
    # Every process must yield the same number of batches (each batch is one collective
    # step), though shards differ by a row when process_count does not divide n: train counts
    # the smallest shard, test the largest (the others get a padded, possibly all-padding,
    # batch).
    shard = n // process_count if train else -(-n // process_count)
    self.num_batches = num_batches(shard, batch_size, drop_remainder=train)

  def __len__(self) -> int:
    return self.num_batches

  def __getitem__(self, b: int) -> dict[str, np.ndarray]:
    """Batch ``b``: ``{'image': float32 [B, ...], 'label': int32 [B], 'mask': float32 [B]}``."""
    if not 0 <= b < self.num_batches:
      raise IndexError(f'batch {b} out of range for an epoch of {self.num_batches} batches')
    ds, bs = self.dataset, self.batch_size
    idx = self.order[b * bs:(b + 1) * bs]
    if not len(idx):  # test only: this shard is one row short and has run out
      return {'image': np.zeros((bs,) + ds.input_shape, np.float32),
              'label': np.zeros(bs, np.int32), 'mask': np.zeros(bs, np.float32)}
    train = self.split == 'train'
    x, y = (ds.train if train else ds.test).get_batch(idx if train else np.sort(idx))
    x = ds.preprocess(x)
    if train:
      x = ds.augment(x, np.random.default_rng([self.seed, self.epoch, b, self.process_index]))
    mask = np.ones(len(idx), np.float32)
    if len(idx) < bs:
      pad = bs - len(idx)
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    return {'image': np.asarray(x, np.float32), 'label': np.asarray(y, np.int32), 'mask': mask}


def iterate_batches(dataset: Dataset,
                    split: str,
                    *,
                    batch_size: int,
                    seed: int = 0,
                    epoch: int = 0,
                    process_index: int = 0,
                    process_count: int = 1,
                    start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's batches of one epoch of ``split``, built in this thread.

  The reference order (see :class:`EpochBatches`); :func:`mfp_jax.pipeline.load_batches`
  yields the same batches, built ahead in background threads or worker processes.

  Args:
    split: ``'train'`` or ``'test'``.
    batch_size: per-process batch size.
    start_batch: skip this many batches (resuming inside an epoch).

  Yields:
    ``{'image': float32 [B, ...], 'label': int32 [B], 'mask': float32 [B]}``.
  """
  batches = EpochBatches(dataset, split, batch_size=batch_size, seed=seed, epoch=epoch,
                         process_index=process_index, process_count=process_count)
  for b in range(start_batch, len(batches)):
    yield batches[b]


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


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """A registered data set: ``load(**kwargs) -> Dataset`` and ``spec``, a :class:`DataSpec`
  or ``spec(**kwargs) -> DataSpec`` taking (a subset of) the same keyword arguments."""
  load: Callable[..., Dataset]
  spec: DataSpec | Callable[..., DataSpec]


DATASETS: registry.Registry[DatasetEntry] = registry.Registry('data set')


def register_dataset(name: str, load: Callable[..., Dataset] | None = None, *,
                     spec: DataSpec | Callable[..., DataSpec]):
  """Registers a data set (direct call or decorator on ``load``); refuses a taken name.

  Args:
    name: the ``config.data.name`` that selects it.
    load: ``load(**kwargs) -> Dataset``; its keyword arguments are the config's data fields
      (a ``T`` argument receives ``config.model.T``).
    spec: the :class:`DataSpec`, or a function of (some of) ``load``'s keyword arguments.
  """
  if load is None:
    return lambda fn: register_dataset(name, fn, spec=spec)
  DATASETS.register(name, DatasetEntry(load, spec))
  return load


def _call_with(fn: Callable, kwargs: dict[str, Any]) -> Any:
  """``fn(**kwargs)`` with only the keyword arguments ``fn`` names."""
  names = inspect.signature(fn).parameters
  return fn(**{k: v for k, v in kwargs.items() if k in names})


def loader_kwargs(cfg, T: int | None) -> dict[str, Any]:
  """The loader's keyword arguments from a config's ``data`` section (``~`` expanded)."""
  from mfp_jax import config_lib  # Deferred: config_lib reads this module's registry.
  entry = DATASETS.get(cfg.name)
  # The shared fields (batch sizes, how batches are loaded) are not the loader's.
  kwargs = config_lib.builder_kwargs(entry, cfg, skip=tuple(config_lib.DATA_FIELDS),
                                     kind='data')
  if isinstance(kwargs.get('data_dir'), str):
    kwargs['data_dir'] = os.path.expanduser(kwargs['data_dir'])
  if T is not None and 'T' in inspect.signature(entry.load).parameters:
    kwargs['T'] = T
  return kwargs


def data_spec(cfg, *, T: int | None = None) -> DataSpec:
  """One example's shape and the class count of ``cfg.name`` without reading any data."""
  spec = DATASETS.get(cfg.name).spec
  return spec if isinstance(spec, DataSpec) else _call_with(spec, loader_kwargs(cfg, T))


def create_dataset(cfg, *, T: int | None = None) -> Dataset:
  """Builds the registered data set ``cfg.name`` from a config's ``data`` section.

  Args:
    cfg: ``name`` (a registered data set) and the loader's keyword arguments; the shared
      ``batch_size`` / ``eval_batch_size`` fields are ignored here.
    T: time steps of the model (event data sets bin their events into ``T`` frames).

  Raises:
    ValueError: unknown name.
    DataNotFoundError: the files are missing or an (empty) split has no examples; the message
      names the place and the fix.
  """
  entry = DATASETS.get(cfg.name)
  dataset = entry.load(**loader_kwargs(cfg, T))
  for split in ('train', 'test'):
    if len(getattr(dataset, split)) == 0:
      raise DataNotFoundError(f'{dataset.name}: the {split} split under '
                              f'{cfg.get("data_dir") or "(embedded)"} is empty')
  return dataset


register_dataset('digits', load_digits, spec=DataSpec((8, 8, 1), 10))
