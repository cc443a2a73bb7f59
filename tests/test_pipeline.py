"""mfp_jax.pipeline: grain yields exactly data.iterate_batches's batches, and stops cleanly.

The reference is the in-thread batcher (``data.iterate_batches``), which every determinism
and resume test already pins; a pipeline must match it array for array for any loading
settings, shard and start batch. Worker-process cases are few: each pipeline spawns its
workers (seconds each on 2 cores).
"""

import multiprocessing
import threading
import time

import numpy as np
import pytest

from mfp_jax import config_lib
from mfp_jax import data as data_lib
from mfp_jax import pipeline


def _noisy_flip(x, rng):
  """An augmentation that uses its generator (so a wrong seed per batch shows)."""
  flip = rng.random(len(x)) < 0.5
  x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return x + rng.normal(size=x.shape).astype(np.float32)


def _toy(train: np.ndarray, test: np.ndarray) -> data_lib.Dataset:
  """101 train and 53 test examples, 7 classes."""
  return data_lib.Dataset('toy', 7, data_lib.ArraySource(train, np.arange(len(train)) % 7),
                          data_lib.ArraySource(test, np.arange(len(test)) % 7),
                          train.shape[1:], lambda x: x.astype(np.float32) / 255, _noisy_flip)


def _images(n, seed, shape=(4, 3, 2)):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.fixture(scope='module')
def toy():
  return _toy(_images(101, 0), _images(53, 1))


@pytest.fixture(scope='module')
def memmapped(tmp_path_factory):
  """The toy data set memory-mapped from .npy files (as CIFAR10-DVS's frame cache is)."""
  d = tmp_path_factory.mktemp('mm')
  for name, n in (('train', 101), ('test', 53)):
    np.save(d / f'{name}.npy', _images(n, n, (16, 12, 2)))
  return _toy(*(np.load(d / f'{name}.npy', mmap_mode='r') for name in ('train', 'test')))


def _assert_same(got, want):
  got, want = list(got), list(want)
  assert len(got) == len(want) > 0
  for g, w in zip(got, want):
    assert g.keys() == w.keys() == {'image', 'label', 'mask'}
    for k in w:
      assert g[k].dtype == w[k].dtype
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


KW = dict(batch_size=8, seed=3, epoch=2)


@pytest.mark.parametrize('split', ['train', 'test'])
@pytest.mark.parametrize('process_index,process_count,start_batch',
                         [(0, 1, 0), (0, 1, 4), (2, 3, 1), (1, 2, 2)])
@pytest.mark.parametrize('num_threads,prefetch', [(0, 0), (1, 2), (3, 5)])
def test_threads_yield_the_same_batches(toy, split, process_index, process_count, start_batch,
                                        num_threads, prefetch):
  kw = dict(KW, process_index=process_index, process_count=process_count,
            start_batch=start_batch)
  with pipeline.load_batches(toy, split, num_threads=num_threads, prefetch=prefetch,
                             **kw) as got:
    _assert_same(got, data_lib.iterate_batches(toy, split, **kw))


def test_every_loading_setting_is_the_same_epoch(toy):
  # An epoch (and a resumed one) is the same for any setting: the loader can change on resume.
  full = list(data_lib.iterate_batches(toy, 'train', **KW))
  assert len(pipeline.load_batches(toy, 'train', **KW)) == len(full) == 101 // 8
  resumed = pipeline.load_batches(toy, 'train', start_batch=5, num_threads=2, prefetch=3, **KW)
  assert len(resumed) == len(full) - 5
  _assert_same(resumed, full[5:])
  assert list(pipeline.load_batches(toy, 'train', start_batch=len(full), **KW)) == []


def test_a_shard_that_runs_out_gets_an_all_padding_batch():
  # 7 test examples over 4 processes, batch 1: process 3 has one row but steps twice.
  ds = _toy(_images(7, 0), _images(7, 1))
  kw = dict(batch_size=1, process_index=3, process_count=4)
  got = list(pipeline.load_batches(ds, 'test', num_threads=2, prefetch=2, **kw))
  _assert_same(got, data_lib.iterate_batches(ds, 'test', **kw))
  assert [float(b['mask'][0]) for b in got] == [1.0, 0.0]


@pytest.mark.parametrize('split,start_batch', [('train', 1), ('test', 0)])
def test_worker_processes_yield_the_same_batches(memmapped, split, start_batch):
  # Two workers, process 1 of 2: train has 50 // 8 = 6 batches, 5 left from batch 1 (one
  # worker builds one more than the other); test has 26 rows here, its last batch padded.
  kw = dict(KW, process_index=1, process_count=2, start_batch=start_batch)
  with pipeline.load_batches(memmapped, split, num_workers=2, num_threads=1, prefetch=2,
                             **kw) as got:
    _assert_same(got, data_lib.iterate_batches(memmapped, split, **kw))
  assert not multiprocessing.active_children()


def test_a_stop_mid_epoch_ends_the_workers(toy):
  # Like a preemption: the loop takes a few batches and leaves; dropping the iterator stops
  # the worker processes (no hang, none left), as train_loop.Run.train_epoch relies on.
  batches = pipeline.load_batches(toy, 'train', num_workers=2, num_threads=1, prefetch=2,
                                  **KW)
  for i, _ in enumerate(batches):
    if i == 2:
      break
  assert len(multiprocessing.active_children()) == 2
  t0 = time.perf_counter()
  del batches
  assert not multiprocessing.active_children()
  assert time.perf_counter() - t0 < 20


def test_a_stop_mid_epoch_ends_the_threads(toy):
  before = threading.active_count()
  with pipeline.load_batches(toy, 'train', num_threads=3, prefetch=4, **KW) as batches:
    next(batches)
    assert threading.active_count() > before
  deadline = time.time() + 10
  while threading.active_count() > before and time.time() < deadline:
    time.sleep(0.01)
  assert threading.active_count() == before


def test_a_memmap_travels_to_workers_as_its_file(memmapped):
  batches = data_lib.EpochBatches(memmapped, 'train', **KW)
  payload = pipeline.dumps(batches)
  images = memmapped.train.images.nbytes + memmapped.test.images.nbytes  # 58 kB
  assert len(payload) < images // 10
  copy = pipeline._loads(payload)
  assert isinstance(copy.dataset.train.images, np.memmap)
  _assert_same((copy[b] for b in range(len(copy))), (batches[b] for b in range(len(batches))))


@pytest.mark.slow
def test_a_tfds_array_record_source_works_in_a_worker(tmp_path):
  # CIFAR's tfds data source pickles (its files are opened again in the worker); the worker
  # imports tfds, hence slow.
  import datagen
  from mfp_jax import data_sources
  datagen.write_tfds_cifar(tmp_path, 'cifar10', n_train=40, n_test=4)
  ds = data_sources.load_cifar('cifar10', str(tmp_path), cutout=8)
  with pipeline.load_batches(ds, 'train', num_workers=1, num_threads=2, prefetch=2,
                             **KW) as got:
    _assert_same(got, data_lib.iterate_batches(ds, 'train', **KW))


class _LockedSource(data_lib.ArraySource):
  """A source holding a lock: it cannot be pickled."""

  def __init__(self, images, labels):
    super().__init__(images, labels)
    object.__setattr__(self, 'lock', threading.Lock())


def test_a_data_set_that_cannot_be_pickled_is_refused_for_workers(toy):
  src = _LockedSource(toy.train.images, toy.train.labels)
  ds = data_lib.Dataset('locked', 7, src, src, toy.input_shape, toy.preprocess)
  with pytest.raises(config_lib.ConfigError, match=r"data set 'locked' cannot be sent to "
                     r"worker processes .*lock.*config.data.num_workers=0"):
    pipeline.load_batches(ds, 'train', num_workers=2, **KW)
  assert not multiprocessing.active_children()
  _assert_same(pipeline.load_batches(ds, 'train', **KW),
               data_lib.iterate_batches(ds, 'train', **KW))


def test_loading_fields_are_checked():
  c = config_lib.base_config()
  assert (c.data.num_workers, c.data.num_threads, c.data.prefetch) == (
      config_lib.DATA_FIELDS['num_workers'].default, config_lib.DATA_FIELDS['num_threads'].default,
      config_lib.DATA_FIELDS['prefetch'].default)
  c.data.num_workers, c.data.prefetch = -1, -2
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert 'config.data.num_workers = -1: must be an integer >= 0: worker processes' in str(e.value)
  assert 'config.data.prefetch = -2: must be an integer >= 0: batches' in str(e.value)
  # They are not the loader's arguments.
  assert 'num_workers' not in data_lib.loader_kwargs(config_lib.base_config().data, T=4)
