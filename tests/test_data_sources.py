"""The real-data loaders on tiny data sets written in the real on-disk formats (no network).

* CIFAR: a genuine prepared tfds folder (array_record shards + dataset_info.json) written with
  tfds's own feature serializer and array_record writer, no TensorFlow.
* Tiny-ImageNet: JPEGs written with PIL in the standard folder layout.
* CIFAR10-DVS: real AEDAT4 recordings written with dv-processing (test extra).
"""

import os
import time

import numpy as np
import pytest

import datagen
from mfp_jax import data as data_lib
from mfp_jax import data_sources as ds_lib

# --- Shared checks ----------------------------------------------------------------------------


def _check_dataset(ds: data_lib.Dataset, *, batch_size: int, seed: int = 3):
  """Shapes, dtypes, labels, determinism, augmentation on train only."""
  # Test split: in order, no augmentation -> exactly preprocess(raw), every example once.
  batches = list(data_lib.iterate_batches(ds, 'test', batch_size=batch_size))
  n_test = len(ds.test)
  raw_x, raw_y = ds.test.get_batch(np.arange(n_test))
  want = ds.preprocess(raw_x)
  assert want.dtype == np.float32 and want.shape == (n_test,) + ds.input_shape
  got_x = np.concatenate([b['image'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
  assert mask.sum() == n_test
  np.testing.assert_array_equal(got_x[mask], want)
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[mask], raw_y)
  assert raw_y.dtype == np.int32 and 0 <= raw_y.min() and raw_y.max() < ds.num_classes

  # Train split: same seed -> same batches; the augmentation changes the images.
  run = lambda: list(data_lib.iterate_batches(ds, 'train', batch_size=batch_size, seed=seed))
  first, second = run(), run()
  assert len(first) == len(ds.train) // batch_size > 0
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    assert a['image'].shape == (batch_size,) + ds.input_shape and a['image'].dtype == np.float32
  idx = np.random.default_rng([seed, 0]).permutation(len(ds.train))[:batch_size]
  x, y = ds.train.get_batch(idx)
  np.testing.assert_array_equal(first[0]['label'], y)
  assert not np.array_equal(first[0]['image'], ds.preprocess(x))
  other = next(data_lib.iterate_batches(ds, 'train', batch_size=batch_size, seed=seed + 1))
  assert not np.array_equal(other['image'], first[0]['image'])


def _assert_fast_not_found(fn, where):
  t0 = time.perf_counter()
  with pytest.raises(data_lib.DataNotFoundError) as e:
    fn()
  assert time.perf_counter() - t0 < 5
  assert str(where) in str(e.value)
  return str(e.value)


# --- CIFAR (tfds array_record) ----------------------------------------------------------------


@pytest.fixture(scope='module')
def cifar10_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('tfds')
  return d, datagen.write_tfds_cifar(d, 'cifar10', n_train=24, n_test=10)


def test_cifar10_reads_written_examples_and_batches(cifar10_dir):
  d, written = cifar10_dir
  ds = ds_lib.load_cifar('cifar10', str(d))
  assert (ds.name, ds.num_classes, ds.input_shape) == ('cifar10', 10, (32, 32, 3))
  assert (len(ds.train), len(ds.test)) == (24, 10)
  x, y = ds.train.get_batch(np.array([5, 0, 17]))
  assert x.dtype == np.uint8 and x.shape == (3, 32, 32, 3) and y.dtype == np.int32
  np.testing.assert_array_equal(x, written['train'][0][[5, 0, 17]])  # PNG is lossless
  np.testing.assert_array_equal(y, written['train'][1][[5, 0, 17]])
  np.testing.assert_allclose(ds.preprocess(x[:1])[0, 0, 0],
                             (x[0, 0, 0] / 255 - ds_lib.CIFAR10_MEAN) / ds_lib.CIFAR10_STD,
                             rtol=1e-5)
  _check_dataset(ds, batch_size=8)


def test_cifar_cutout_blanks_one_square(cifar10_dir):
  d, _ = cifar10_dir
  x = np.random.default_rng(0).random((16, 32, 32, 3)).astype(np.float32) + 1  # no zeros
  for z in (ds_lib.cutout(x, np.random.default_rng(0), size=8) == 0).all(-1):  # [H, W]
    rows, cols = np.flatnonzero(z.any(1)), np.flatnonzero(z.any(0))
    assert 4 <= len(rows) <= 8 and 4 <= len(cols) <= 8 and z.sum() == len(rows) * len(cols)
    assert np.ptp(rows) == len(rows) - 1 and np.ptp(cols) == len(cols) - 1  # contiguous
  # In the data set, Cutout comes after the crop and flip drawn from the same generator.
  plain = ds_lib.load_cifar('cifar10', str(d)).augment(x, np.random.default_rng(1))
  out = ds_lib.load_cifar('cifar10', str(d), cutout=8).augment(x, np.random.default_rng(1))
  changed = (out != plain).any(-1)
  assert changed.any() and (out[changed] == 0).all()


def test_cifar100(tmp_path):
  written = datagen.write_tfds_cifar(tmp_path, 'cifar100', n_train=6, n_test=4)
  ds = ds_lib.load_cifar('cifar100', str(tmp_path))
  assert ds.num_classes == 100 and (len(ds.train), len(ds.test)) == (6, 4)
  x, y = ds.test.get_batch(np.arange(4))
  np.testing.assert_array_equal(x, written['test'][0])
  np.testing.assert_array_equal(y, written['test'][1])


def test_cifar_missing_is_fast_and_says_how(tmp_path):
  msg = _assert_fast_not_found(lambda: ds_lib.load_cifar('cifar10', str(tmp_path)),
                               tmp_path / 'cifar10')
  assert "file_format='array_record'" in msg and 'downloads' in msg
  with pytest.raises(ValueError, match='cifar'):
    ds_lib.load_cifar('mnist', str(tmp_path))


def test_cifar_missing_split_shard(tmp_path):
  datagen.write_tfds_cifar(tmp_path, 'cifar10', n_train=4, n_test=2)
  (test_file,) = (tmp_path / 'cifar10').glob('*/cifar10-test.array_record-*')
  test_file.unlink()
  _assert_fast_not_found(lambda: ds_lib.load_cifar('cifar10', str(tmp_path)), tmp_path)


# --- Tiny-ImageNet (JPEG folders) -------------------------------------------------------------


def test_tinyimagenet(tmp_path):
  datagen.write_tinyimagenet(tmp_path / 'tiny-imagenet-200')
  ds = ds_lib.load_tinyimagenet(str(tmp_path))
  assert (ds.num_classes, ds.input_shape) == (3, (64, 64, 3))
  assert (len(ds.train), len(ds.test)) == (12, 6)
  # Labels follow sorted wnids: n01 -> 0, n02 -> 1, n03 -> 2.
  _, y = ds.train.get_batch(np.arange(12))
  np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 4))
  x, y = ds.test.get_batch(np.arange(6))  # val_0..val_5 -> n03, n01, n02, ...
  np.testing.assert_array_equal(y, [2, 0, 1, 2, 0, 1])
  assert x.dtype == np.uint8 and x.shape == (6, 64, 64, 3)
  np.testing.assert_array_equal(x[..., 0], x[..., 2])  # greyscale converted to RGB
  _check_dataset(ds, batch_size=4)
  # The folder itself is accepted too.
  ds2 = ds_lib.load_tinyimagenet(str(tmp_path / 'tiny-imagenet-200'))
  assert ds2.train.paths == ds.train.paths


def test_tinyimagenet_missing_or_incomplete(tmp_path):
  msg = _assert_fast_not_found(lambda: ds_lib.load_tinyimagenet(str(tmp_path)), tmp_path)
  assert 'tiny-imagenet-200.zip' in msg
  root = tmp_path / 'tiny-imagenet-200'
  datagen.write_tinyimagenet(root)
  (root / 'val' / 'images' / 'val_3.JPEG').unlink()
  _assert_fast_not_found(lambda: ds_lib.load_tinyimagenet(str(tmp_path)), root / 'val')


# --- CIFAR10-DVS (AEDAT4) ---------------------------------------------------------------------

DVS_PER_CLASS = 10
DVS_EVENTS = 300


@pytest.fixture(scope='module')
def dvs_dir(tmp_path_factory):
  pytest.importorskip('dv_processing')
  return datagen.write_cifar10dvs(tmp_path_factory.mktemp('dvs'), DVS_PER_CLASS, DVS_EVENTS)


def test_cifar10dvs(dvs_dir, monkeypatch):
  ds = ds_lib.load_cifar10dvs(str(dvs_dir), T=4, size=16, split_seed=0)
  assert (ds.num_classes, ds.input_shape) == (10, (4, 16, 16, 2))
  assert (len(ds.train), len(ds.test)) == (90, 10)
  _, y_train = ds.train.get_batch(np.arange(90))
  _, y_test = ds.test.get_batch(np.arange(10))
  np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [9] * 10)  # 9:1 per class
  np.testing.assert_array_equal(np.sort(y_test), np.arange(10))
  x, _ = ds.test.get_batch(np.arange(3))
  assert x.dtype == np.float16 and x.shape == (3, 4, 16, 16, 2)
  # Every event is counted once (area weights keep the mass), except those at the last
  # timestamp, which fall outside tonic's half-open last bin.
  mass = x.astype(np.float64).sum(axis=(1, 2, 3, 4)) * (128 / 16)**2
  assert np.all(mass <= DVS_EVENTS + 0.5) and np.all(mass >= DVS_EVENTS - 3)
  _check_dataset(ds, batch_size=16)

  # The cache is reused (no second framing) and the split follows split_seed.
  cache = dvs_dir / 'cache_T4_s16'
  assert sorted(os.listdir(cache)) == ['frames.npy', 'manifest.json']  # no temp files left
  monkeypatch.setattr(ds_lib, '_build_dvs_cache', lambda *a, **k: pytest.fail('rebuilt'))
  again = ds_lib.load_cifar10dvs(str(dvs_dir), T=4, size=16, split_seed=0)
  np.testing.assert_array_equal(again.test.rows, ds.test.rows)
  other = ds_lib.load_cifar10dvs(str(dvs_dir), T=4, size=16, split_seed=1)
  assert not np.array_equal(other.test.rows, ds.test.rows)


def test_cifar10dvs_frames_match_tonic(dvs_dir):
  import tonic

  ds = ds_lib.load_cifar10dvs(str(dvs_dir), T=4, size=16)
  path = dvs_dir / 'CIFAR10DVS' / 'bird' / 'cifar10_bird_3.aedat4'
  row = 2 * DVS_PER_CLASS + 3  # sorted order: class folders, then file names
  events = tonic.io.read_aedat4(str(path))
  events.dtype.names = ('t', 'x', 'y', 'p')
  full = tonic.transforms.ToFrame(sensor_size=(128, 128, 2), n_time_bins=4)(events)
  want = full.reshape(4, 2, 16, 8, 16, 8).mean(axis=(3, 5)).transpose(0, 2, 3, 1)  # 8x8 areas
  np.testing.assert_allclose(ds.train.frames[row].astype(np.float32), want, atol=1e-3)
  assert ds.train.labels[row] == 2  # bird


def test_area_resize_matrix():
  a = ds_lib.area_resize_matrix(128, 48)
  assert a.shape == (48, 128)
  np.testing.assert_allclose(a.sum(1), 1, rtol=1e-6)
  np.testing.assert_allclose(a.sum(0), 48 / 128, rtol=1e-6)  # each sensor pixel counted once


def test_flip_roll_shifts_all_frames_alike():
  x = np.random.default_rng(0).random((6, 3, 8, 8, 2)).astype(np.float32)
  out = ds_lib.flip_roll(x, np.random.default_rng(1), max_shift=2)
  for b in range(6):
    matches = [(f, dy, dx) for f in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(out[b], np.roll((x[b, :, :, ::-1] if f else x[b]), (dy, dx),
                                                 axis=(1, 2)))]
    assert len(matches) == 1


def test_cifar10dvs_missing_or_incomplete(tmp_path):
  msg = _assert_fast_not_found(lambda: ds_lib.load_cifar10dvs(str(tmp_path), T=4),
                               tmp_path / 'CIFAR10DVS')
  assert 'figshare' in msg
  (tmp_path / 'CIFAR10DVS' / 'airplane').mkdir(parents=True)
  (tmp_path / 'CIFAR10DVS' / 'airplane.zip').write_bytes(b'')
  msg = _assert_fast_not_found(lambda: ds_lib.load_cifar10dvs(str(tmp_path), T=4),
                               tmp_path / 'CIFAR10DVS' / 'airplane')
  assert 'unzip it' in msg
  with pytest.raises(ValueError, match='size'):
    ds_lib.load_cifar10dvs(str(tmp_path), T=4, size=0)


def test_create_dataset_dispatches(cifar10_dir):
  import ml_collections

  d, _ = cifar10_dir
  cfg = ml_collections.ConfigDict({'name': 'cifar10', 'data_dir': str(d), 'cutout': 4})
  ds = data_lib.create_dataset(cfg, T=4)
  assert ds.name == 'cifar10' and len(ds.test) == 10


def test_empty_split_is_a_clear_error(tmp_path):
  pytest.importorskip('dv_processing')
  import ml_collections
  datagen.write_cifar10dvs(tmp_path, per_class=1, n_events=50)  # 9:1 of one file: no test
  cfg = ml_collections.ConfigDict({'name': 'cifar10dvs', 'data_dir': str(tmp_path), 'size': 16,
                                   'split_seed': 0})
  with pytest.raises(data_lib.DataNotFoundError, match='test split .* is empty'):
    data_lib.create_dataset(cfg, T=2)
