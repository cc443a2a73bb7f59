"""Tiny data sets in the real on-disk formats, for tests (no network)."""

import os

import numpy as np

from mfp_jax import data_sources as ds_lib


def write_tfds_cifar(data_dir, name, n_train, n_test, seed=0):
  """A genuine prepared tfds folder, as download_and_prepare(file_format='array_record') writes.

  Returns {split: (images uint8 [N, 32, 32, 3], labels [N])}.
  """
  import tensorflow_datasets as tfds
  from PIL import Image

  builder = tfds.builder(name, data_dir=str(data_dir), file_format='array_record')
  features = builder.info.features
  num_classes = features['label'].num_classes
  os.makedirs(builder.data_dir)
  rng = np.random.default_rng(seed)
  written, splits = {}, []
  for split, n in (('train', n_train), ('test', n_test)):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    records = []
    for i in range(n):
      ex = {'id': f'{split}_{i:05d}', 'image': Image.fromarray(images[i]), 'label': labels[i]}
      if 'coarse_label' in features:
        ex['coarse_label'] = labels[i] % 20
      records.append((i, features.serialize_example(ex)))  # PIL in: PNG bytes, no TF needed
    path = os.path.join(builder.data_dir, f'{name}-{split}.array_record-00000-of-00001')
    tfds.core.file_adapters.ArrayRecordFileAdapter.write_examples(path, records)
    splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[n],
                                      num_bytes=os.path.getsize(path), filename_template=None))
    written[split] = (images, labels)
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(builder.data_dir)
  return written


def write_tinyimagenet(root, wnids=('n03', 'n01', 'n02'), n_train=4, n_val=6):
  from PIL import Image

  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  (root / 'wnids.txt').write_text('\n'.join(wnids) + '\n')  # unsorted on purpose
  for w in wnids:
    (root / 'train' / w / 'images').mkdir(parents=True)
    for i in range(n_train):
      img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
      Image.fromarray(img).save(root / 'train' / w / 'images' / f'{w}_{i}.JPEG')
  (root / 'val' / 'images').mkdir(parents=True)
  lines = []
  for i in range(n_val):
    img = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # greyscale, as some real ones are
    Image.fromarray(img).save(root / 'val' / 'images' / f'val_{i}.JPEG')
    lines.append(f'val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t63\t63')
  (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines[::-1]) + '\n')


def write_aedat4(path, n_events, seed):
  import dv_processing as dv
  rng = np.random.default_rng(seed)
  t = np.sort(rng.integers(0, 200_000, n_events)) + 1_700_000_000_000_000
  x, y = rng.integers(0, 128, n_events), rng.integers(0, 128, n_events)
  p = rng.integers(0, 2, n_events).astype(bool)
  store = dv.EventStore()
  for i in range(n_events):
    store.push_back(int(t[i]), int(x[i]), int(y[i]), bool(p[i]))
  writer = dv.io.MonoCameraWriter(
      str(path), dv.io.MonoCameraWriter.EventOnlyConfig('DVS128', (128, 128)))
  writer.writeEvents(store)
  del writer  # closes the file




def write_cifar10dvs(root, per_class, n_events):
  """``root/CIFAR10DVS/<class>/*.aedat4``: ``per_class`` recordings of ``n_events`` each."""
  for c, name in enumerate(ds_lib.DVS_CLASSES):
    os.makedirs(os.path.join(root, 'CIFAR10DVS', name))
    for i in range(per_class):
      write_aedat4(os.path.join(root, 'CIFAR10DVS', name, f'cifar10_{name}_{i}.aedat4'),
                   n_events, seed=100 * c + i)
  return root


def write_idx(path, array, *, gz=True, magic=None):
  """An IDX file as Fashion-MNIST ships it: big-endian uint32 magic and sizes, then uint8 data.

  Args:
    path: file to write (no suffix is added: name it ``.gz`` when ``gz``).
    array: uint8 ``[N, ...]``.
    gz: gzip-compress it.
    magic: header magic; default ``0x0800 + array.ndim`` (2051 for images, 2049 for labels).

  Returns:
    ``path``.
  """
  array = np.asarray(array, np.uint8)
  magic = 0x0800 + array.ndim if magic is None else magic
  header = np.asarray((magic,) + array.shape, '>u4').tobytes()
  data = header + array.tobytes()
  if gz:
    import gzip
    data = gzip.compress(data, mtime=0)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def write_fashion_mnist(folder, n_train, n_test, seed=0, *, gz=True):
  """The four Fashion-MNIST IDX files with random images, labels cycling over 0..9.

  Returns:
    ``{split: (images uint8 [N, 28, 28], labels uint8 [N])}`` as written.
  """
  names = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
           'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  written = {}
  for split, n in (('train', n_train), ('test', n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = ((np.arange(n) + rng.integers(0, 10)) % 10).astype(np.uint8)
    suffix = '.gz' if gz else ''
    write_idx(os.path.join(folder, names[split][0] + suffix), images, gz=gz)
    write_idx(os.path.join(folder, names[split][1] + suffix), labels, gz=gz)
    written[split] = (images, labels)
  return written
