"""The Fashion-MNIST loader on tiny IDX files written in the real format (gzip and plain).

Every bad file must give a one-line DataNotFoundError naming the file and the problem, never an
array. One test reads the real files when the Debian package dataset-fashion-mnist is installed.
"""

import gzip
import os
import time

import numpy as np
import pytest

import datagen
from mfp_jax import data as data_lib
from mfp_jax import fashion_mnist as fm

N_TRAIN, N_TEST = 24, 12


@pytest.fixture
def folder(tmp_path):
  """Gzipped tiny files; returns (folder, {split: (images, labels)} as written)."""
  written = datagen.write_fashion_mnist(tmp_path / 'fm', N_TRAIN, N_TEST, seed=1)
  return tmp_path / 'fm', written


def _error(fn, *needles):
  """Runs ``fn``, expecting a fast one-line DataNotFoundError containing every needle."""
  t0 = time.perf_counter()
  with pytest.raises(data_lib.DataNotFoundError) as e:
    fn()
  assert time.perf_counter() - t0 < 1
  msg = str(e.value)
  assert '\n' not in msg, msg
  for needle in needles:
    assert str(needle) in msg, (needle, msg)
  return msg


# --- Round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize('gz', [True, False])
def test_load_arrays_round_trip(tmp_path, gz):
  written = datagen.write_fashion_mnist(tmp_path, N_TRAIN, N_TEST, seed=0, gz=gz)
  arrays = fm.load_arrays(str(tmp_path))
  assert sorted(arrays) == ['test', 'train']
  for split, n in (('train', N_TRAIN), ('test', N_TEST)):
    images, labels = arrays[split]
    assert images.dtype == np.uint8 and images.shape == (n, 28, 28)
    assert labels.dtype == np.int32 and labels.shape == (n,)
    np.testing.assert_array_equal(images, written[split][0])
    np.testing.assert_array_equal(labels, written[split][1])


def test_find_files_prefers_gz_and_takes_plain(folder):
  path, written = folder
  # One file plain, the rest gzipped: each is found under its own name.
  os.remove(path / 't10k-labels-idx1-ubyte.gz')
  datagen.write_idx(path / 't10k-labels-idx1-ubyte', written['test'][1], gz=False)
  files = fm.find_files(str(path))
  assert files['train'] == (str(path / 'train-images-idx3-ubyte.gz'),
                            str(path / 'train-labels-idx1-ubyte.gz'))
  assert files['test'] == (str(path / 't10k-images-idx3-ubyte.gz'),
                           str(path / 't10k-labels-idx1-ubyte'))
  np.testing.assert_array_equal(fm.load_arrays(str(path))['test'][1], written['test'][1])


def test_read_idx_header_and_shape(tmp_path):
  x = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  path = datagen.write_idx(tmp_path / 'x.gz', x)
  got = fm.read_idx(str(path), magic=fm.IMAGES_MAGIC)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, x)
  np.testing.assert_array_equal(fm.read_idx(str(path), magic=2051, dims=(3, 5)), x)
  with pytest.raises(ValueError, match='2 sizes'):
    fm.read_idx(str(path), magic=fm.IMAGES_MAGIC, dims=(3,))


def test_load_fashion_mnist(folder):
  path, written = folder
  ds = fm.load_fashion_mnist(str(path))
  assert ds.name == 'fashion_mnist' and ds.num_classes == 10 == len(fm.CLASSES)
  assert ds.input_shape == (28, 28, 1) and not ds.is_sequence
  assert len(ds.train) == N_TRAIN and len(ds.test) == N_TEST
  raw, y = ds.test.get_batch(np.arange(N_TEST))
  assert raw.dtype == np.uint8 and raw.shape == (N_TEST, 28, 28, 1)
  np.testing.assert_array_equal(raw[..., 0], written['test'][0])
  assert y.dtype == np.int32
  x = ds.preprocess(raw)
  assert x.dtype == np.float32 and x.shape == (N_TEST, 28, 28, 1)
  want = (written['test'][0][..., None] / 255.0 - fm.MEAN) / fm.STD
  np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
  # Through the batcher: test batches padded and masked, train batches augmented.
  batches = list(data_lib.iterate_batches(ds, 'test', batch_size=5))
  assert [b['image'].shape for b in batches] == [(5, 28, 28, 1)] * 3
  assert sum(b['mask'].sum() for b in batches) == N_TEST
  train = next(data_lib.iterate_batches(ds, 'train', batch_size=8, seed=2))
  assert train['image'].shape == (8, 28, 28, 1) and train['image'].dtype == np.float32


def test_augment_deterministic_and_really_crops_and_flips(folder):
  ds = fm.load_fashion_mnist(str(folder[0]))
  x = ds.preprocess(ds.train.get_batch(np.arange(N_TRAIN))[0])
  a = ds.augment(x, np.random.default_rng(7))
  assert a.shape == x.shape and a.dtype == np.float32
  np.testing.assert_array_equal(a, ds.augment(x, np.random.default_rng(7)))
  assert not np.array_equal(a, ds.augment(x, np.random.default_rng(8)))
  # Replay the generator's draws (row offsets, column offsets, flips) and rebuild every image.
  rng = np.random.default_rng(7)
  oy, ox = rng.integers(0, 5, N_TRAIN), rng.integers(0, 5, N_TRAIN)
  flip = rng.random(N_TRAIN) < 0.5
  assert flip.any() and (~flip).any()
  xp = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(N_TRAIN):
    want = xp[i, oy[i]:oy[i] + 28, ox[i]:ox[i] + 28]
    np.testing.assert_array_equal(a[i], want[:, ::-1] if flip[i] else want)


def test_no_augment_is_identity(folder):
  ds = fm.load_fashion_mnist(str(folder[0]), augment=False)
  x = ds.preprocess(ds.train.get_batch(np.arange(4))[0])
  np.testing.assert_array_equal(ds.augment(x, np.random.default_rng(0)), x)


def test_load_seq_fashion_mnist(folder):
  path, written = folder
  ds = fm.load_seq_fashion_mnist(str(path))
  assert ds.name == 'seq_fashion_mnist' and ds.num_classes == 10
  assert ds.input_shape == (28, 28)
  raw, y = ds.train.get_batch(np.arange(N_TRAIN))
  assert raw.shape == (N_TRAIN, 28, 28) and y.dtype == np.int32
  batch = next(data_lib.iterate_batches(ds, 'train', batch_size=6, seed=0))
  assert batch['image'].shape == (6, 28, 28) and batch['image'].dtype == np.float32
  # No augmentation: step t of example i is row t of its image, scaled.
  idx = np.random.default_rng([0, 0]).permutation(N_TRAIN)[:6]
  np.testing.assert_array_equal(batch['image'],
                                written['train'][0][idx].astype(np.float32) / 255.0)
  np.testing.assert_array_equal(batch['label'], written['train'][1][idx])


# --- Errors: one line, naming the file and the fix --------------------------------------------


def test_missing_folder(tmp_path):
  msg = _error(lambda: fm.load_fashion_mnist(str(tmp_path / 'nope')), tmp_path / 'nope',
               'apt-get install -y dataset-fashion-mnist', '--config.data.data_dir')
  for split in fm.FILES.values():
    for name in split:
      assert name in msg


def test_missing_one_file(folder):
  path, _ = folder
  os.remove(path / 'train-labels-idx1-ubyte.gz')
  msg = _error(lambda: fm.find_files(str(path)), path, 'train-labels-idx1-ubyte',
               'apt-get install')
  assert 'train-images' not in msg


def _rewrite(path, fn):
  """Replaces the decompressed bytes of the gzipped ``path`` by ``fn(bytes)``."""
  data = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(fn(data)))


@pytest.mark.parametrize('edit, needles', [
    (lambda b: b'\x00\x00\x08\x01' + b[4:], ['0x00000801', '0x00000803', '3']),  # label magic
    (lambda b: b'\x12\x34' + b[2:], ['magic number 0x1234']),
    (lambda b: b[:3], ['too short']),
    (lambda b: b[:14], ['too short for the 16-byte header']),
    (lambda b: b[:8] + np.asarray([27, 28], '>u4').tobytes() + b[16:], ['(27, 28)', '(28, 28)']),
    (lambda b: b[:-1], ['truncated', str(N_TRAIN * 784)]),
    (lambda b: b + b'\x00\x00', ['trailing bytes', str(N_TRAIN * 784 + 2)]),
])
def test_bad_image_file(folder, edit, needles):
  path, _ = folder
  images = path / 'train-images-idx3-ubyte.gz'
  _rewrite(images, edit)
  _error(lambda: fm.load_fashion_mnist(str(path)), images, *needles,
         'apt-get install --reinstall dataset-fashion-mnist')


def test_wrong_number_of_dims(tmp_path):
  path = datagen.write_idx(tmp_path / 'x', np.zeros((2, 28, 28, 1), np.uint8), gz=False)
  _error(lambda: fm.read_idx(str(path), magic=fm.IMAGES_MAGIC, dims=(28, 28)),
         path, '4 dims, expected 3')


def test_plain_file_that_is_gzip(tmp_path):
  path = datagen.write_idx(tmp_path / 'x', np.zeros((2, 28, 28), np.uint8), gz=True)
  _error(lambda: fm.read_idx(str(path), magic=fm.IMAGES_MAGIC), path, 'name the file .gz')


@pytest.mark.parametrize('corrupt, error', [
    ('flip_stored', 'BadGzipFile: CRC'),  # random pixels: stored blocks, the CRC catches it
    ('flip_deflated', 'error: Error -3'),  # smooth pixels: Huffman blocks, zlib catches it
    ('cut', 'EOFError'),
    ('not_gzip', 'BadGzipFile'),
])
def test_corrupt_gzip(folder, corrupt, error):
  path, _ = folder
  images = path / 't10k-images-idx3-ubyte.gz'
  if corrupt == 'flip_deflated':
    smooth = (np.arange(N_TEST * 784) % 7 * 30).astype(np.uint8).reshape(N_TEST, 28, 28)
    datagen.write_idx(images, smooth)
  data = bytearray(images.read_bytes())
  if corrupt.startswith('flip'):  # bytes in the middle of the deflate stream
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(v ^ 0xff for v in data[mid:mid + 8])
  elif corrupt == 'cut':
    data = data[:len(data) // 2]
  else:
    data = b'plain text, not gzip'
  images.write_bytes(bytes(data))
  _error(lambda: fm.load_arrays(str(path)), images, 'corrupt gzip stream', error, '--reinstall')


def test_gzip_crc_mismatch(folder):
  path, _ = folder
  labels = path / 'train-labels-idx1-ubyte.gz'
  data = bytearray(labels.read_bytes())
  data[-8] ^= 0x01  # the CRC32 in the gzip trailer: the stream itself decodes fine
  labels.write_bytes(bytes(data))
  _error(lambda: fm.load_arrays(str(path)), labels, 'CRC')


def test_count_mismatch(folder):
  path, written = folder
  labels = path / 'train-labels-idx1-ubyte.gz'
  datagen.write_idx(labels, written['train'][1][:-1])
  _error(lambda: fm.load_arrays(str(path)), labels, f'{N_TRAIN - 1} labels',
         f'{N_TRAIN} images')


def test_label_out_of_range(folder):
  path, written = folder
  labels = path / 't10k-labels-idx1-ubyte.gz'
  bad = written['test'][1].copy()
  bad[5] = 10
  datagen.write_idx(labels, bad)
  _error(lambda: fm.load_arrays(str(path)), labels, 'outside 0..9', 'first: 10 at index 5')


# --- The real files ---------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir(fm.DEFAULT_DIR),
                    reason='dataset-fashion-mnist is not installed')
def test_real_files():
  arrays = fm.load_arrays(fm.DEFAULT_DIR)
  for split, n in (('train', 60000), ('test', 10000)):
    images, labels = arrays[split]
    assert images.shape == (n, 28, 28) and labels.shape == (n,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
  # The published order (a header read at the wrong offset would shift it).
  np.testing.assert_array_equal(arrays['train'][1][:5], [9, 0, 0, 3, 0])
  np.testing.assert_array_equal(arrays['test'][1][:5], [9, 2, 1, 1, 6])
  # The module constants are the train pixel statistics, rounded to 4 digits (from the pixel
  # histogram: no 376 MB float64 copy).
  counts = np.bincount(arrays['train'][0].ravel(), minlength=256)
  v = np.arange(256) / 255.0
  mean = counts @ v / counts.sum()
  std = np.sqrt(counts @ (v - mean) ** 2 / counts.sum())
  assert abs(mean - fm.MEAN) < 1e-4 and abs(std - fm.STD) < 1e-4
