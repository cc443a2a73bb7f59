"""Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) from its four original IDX files.

The folder holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each gzipped (``.gz``, as in
Zalando's ``data/fashion`` and the Debian package ``dataset-fashion-mnist``, which installs them
into :data:`DEFAULT_DIR`) or plain (as a tfds/keras download extracts them). Nothing here
downloads. Every problem with a file -- missing, truncated, corrupt, the wrong format -- raises a
one-line :class:`~mfp_jax.data.DataNotFoundError` naming the file and the fix; a loader that
returns garbage would train on it silently.

Two data sets over the same files:

* ``fashion_mnist``: static images, raw uint8 ``[B, 28, 28, 1]``, normalized, pad-2 random crop
  plus horizontal flip on the train split.
* ``seq_fashion_mnist``: each image read one 28-pixel row per time step, ``[B, T=28, F=28]``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import zlib

import numpy as np

from mfp_jax.data import ArraySource, Dataset, DataNotFoundError, DataSpec, register_dataset
from mfp_jax.transforms import normalize_images, random_crop_flip

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
           'Bag', 'Ankle boot')

FILES = {  # split -> (images, labels) base names, without the optional '.gz'
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}

# IDX magic: two zero bytes, the element type (0x08 = uint8), the number of dimensions.
IMAGES_MAGIC = 0x00000803  # 2051
LABELS_MAGIC = 0x00000801  # 2049
IMAGE_SIZE = (28, 28)

# Pixel mean / std of the 60000 training images on [0, 1] pixels, over all 47,040,000 pixels
# (one channel), computed once in float64 from train-images-idx3-ubyte.gz of
# dataset-fashion-mnist: x = pixels / 255; x.mean() = 0.286041, x.std() = 0.353024.
MEAN = 0.2860
STD = 0.3530

_REINSTALL = 'fix: apt-get install --reinstall dataset-fashion-mnist'
_INSTALL = ('fix: apt-get install -y dataset-fashion-mnist (or give '
            '--config.data.data_dir=<folder with the four IDX files>)')


def _one_line(text: str) -> str:
  # Exception texts and odd paths may hold newlines; the error contract is one line.
  return str(text).replace('\r', ' ').replace('\n', ' ')


def _bad_file(path: str, problem: str) -> DataNotFoundError:
  return DataNotFoundError(_one_line(f'fashion_mnist: {path}: {problem}; {_REINSTALL}'))


def _read_bytes(path: str) -> bytes:
  """The whole (decompressed) file; gzip and I/O errors become :class:`DataNotFoundError`."""
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        return f.read()  # checks the CRC and length at the end of the stream
    with open(path, 'rb') as f:
      return f.read()
  # BadGzipFile (not gzip, CRC or length mismatch) is an OSError; EOFError: a truncated
  # stream; zlib.error: a corrupt deflate block.
  except (OSError, EOFError, zlib.error) as e:
    kind = 'corrupt gzip stream' if path.endswith('.gz') else 'unreadable'
    raise _bad_file(path, f'{kind} ({type(e).__name__}: {e})') from e


def read_idx(path: str, *, magic: int, dims: tuple[int, ...] | None = None) -> np.ndarray:
  """Reads one IDX file of unsigned bytes, checking its header against what it must be.

  Format (big-endian): uint32 magic ``0x000008NN`` (``NN`` = number of dimensions), ``NN``
  uint32 sizes, then ``prod(sizes)`` uint8 values and nothing else.

  Args:
    path: the file; gzip-decompressed when the name ends in ``.gz``.
    magic: the expected magic number, e.g. :data:`IMAGES_MAGIC` (2051) or :data:`LABELS_MAGIC`.
    dims: the expected sizes of all but the first (example) dimension, e.g. ``(28, 28)`` for
      images, ``()`` for labels; ``None`` accepts any.

  Returns:
    uint8 ``[N, *dims]``, the header's shape (read-only, a view of the file's bytes).

  Raises:
    ValueError: ``magic`` is not a uint8 IDX magic, or ``dims`` does not fit the number of
      dimensions it encodes.
    DataNotFoundError: unreadable file, corrupt gzip, wrong magic (which also fixes the
      number of dimensions), wrong sizes, or a payload shorter or longer than the header says.
  """
  ndim = magic & 0xff
  if magic >> 8 != 0x08:  # the element-type byte
    raise ValueError(f'read_idx reads uint8 IDX files (magic 0x000008NN), got 0x{magic:08x}')
  if dims is not None and len(dims) != ndim - 1:
    raise ValueError(f'read_idx: magic 0x{magic:08x} means {ndim} dims, so dims needs '
                     f'{ndim - 1} sizes, got {tuple(dims)}')
  data = _read_bytes(path)
  if len(data) < 4:
    raise _bad_file(path, f'{len(data)} bytes, too short for an IDX header')
  found = int.from_bytes(data[:4], 'big')
  if found != magic:
    hint = ''
    if data[:2] == b'\x1f\x8b':
      hint = ' (gzip data: name the file .gz)'
    elif found >> 8 == magic >> 8:
      hint = f' ({found & 0xff} dims, expected {ndim})'
    raise _bad_file(path, f'magic number 0x{found:08x} ({found}), expected 0x{magic:08x} '
                          f'({magic}){hint}')
  header = 4 + 4 * ndim
  if len(data) < header:
    raise _bad_file(path, f'{len(data)} bytes, too short for the {header}-byte header of '
                          f'{ndim} dims')
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  if dims is not None and shape[1:] != tuple(dims):
    raise _bad_file(path, f'example shape {shape[1:]}, expected {tuple(dims)} (header shape '
                          f'{shape})')
  want, got = math.prod(shape), len(data) - header
  if got != want:
    what = 'truncated' if got < want else 'trailing bytes'
    raise _bad_file(path, f'{what}: {got} data bytes after the header, the header shape '
                          f'{shape} needs {want}')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def find_files(data_dir: str) -> dict[str, tuple[str, str]]:
  """The four IDX files in ``data_dir``, each as ``<name>.gz`` or ``<name>`` (``.gz`` first).

  Only checks that the files exist (no reading, no network).

  Returns:
    ``{'train': (images_path, labels_path), 'test': (images_path, labels_path)}``.

  Raises:
    DataNotFoundError: the folder or a file is missing; one line naming the folder, the
      missing names and the fix.
  """
  folder = os.path.expanduser(data_dir)
  found, missing = {}, []
  for split, names in FILES.items():
    paths = []
    for name in names:
      path = next((p for p in (os.path.join(folder, name + '.gz'), os.path.join(folder, name))
                   if os.path.isfile(p)), None)
      if path is None:
        missing.append(name + '[.gz]')
      paths.append(path)
    found[split] = tuple(paths)
  if missing:
    where = (f'{folder} has no {", ".join(missing)}' if os.path.isdir(folder) else
             f'no folder {folder} (expected {", ".join(missing)})')
    raise DataNotFoundError(_one_line(f'fashion_mnist: {where}; {_INSTALL}'))
  return found


def load_arrays(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """All of Fashion-MNIST in memory, checked (60000 train and 10000 test examples if real).

  Returns:
    ``{split: (images uint8 [N, 28, 28], labels int32 [N])}`` for ``'train'`` and ``'test'``.

  Raises:
    DataNotFoundError: a file is missing or bad (see :func:`read_idx`), a split's image and
      label counts differ, or a label is outside ``0..9``.
  """
  out = {}
  for split, (images_path, labels_path) in find_files(data_dir).items():
    images = read_idx(images_path, magic=IMAGES_MAGIC, dims=IMAGE_SIZE)
    labels = read_idx(labels_path, magic=LABELS_MAGIC, dims=())
    if len(images) != len(labels):
      raise _bad_file(labels_path, f'{len(labels)} labels but {len(images)} images in '
                                   f'{images_path}')
    bad = np.flatnonzero(labels >= len(CLASSES))
    if bad.size:
      raise _bad_file(labels_path, f'{bad.size} labels outside 0..{len(CLASSES) - 1}, '
                                   f'first: {labels[bad[0]]} at index {bad[0]}')
    out[split] = (images, labels.astype(np.int32))
  return out


def load_fashion_mnist(data_dir: str = DEFAULT_DIR, *, augment: bool = True) -> Dataset:
  """Fashion-MNIST as static images.

  Args:
    data_dir: folder with the four IDX files.
    augment: pad-2 random crop plus horizontal flip (probability 1/2) on the train split;
      ``False``: none. Flips suit the data: its garments are photographed facing the camera,
      so a mirrored one is still the same class.

  Returns:
    A :class:`Dataset` named ``'fashion_mnist'``, 10 classes: raw uint8 ``[B, 28, 28, 1]``, int32
    labels; ``preprocess`` gives float32 ``(x / 255 - MEAN) / STD``, ``[B, 28, 28, 1]``; input
    shape ``(28, 28, 1)``.

  Raises:
    DataNotFoundError: see :func:`load_arrays`.
  """
  arrays = load_arrays(data_dir)
  # The channel axis is a view: no copy of the 47 MB of training pixels.
  train, test = (ArraySource(x[..., None], y) for x, y in (arrays['train'], arrays['test']))
  ds = Dataset(
      name='fashion_mnist', num_classes=len(CLASSES), train=train, test=test,
      input_shape=IMAGE_SIZE + (1,),
      preprocess=functools.partial(normalize_images, mean=(MEAN,), std=(STD,)))
  if not augment:
    return ds
  # The batcher augments after preprocess, so the crop's zero padding is the mean pixel.
  return dataclasses.replace(ds, augment=functools.partial(random_crop_flip, pad=2))


def _scale(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) / 255.0


def load_seq_fashion_mnist(data_dir: str = DEFAULT_DIR) -> Dataset:
  """Row-sequential Fashion-MNIST: time step ``t`` shows row ``t`` of the image.

  No augmentation: a crop would shift the rows in time (padding the sequence with blank steps)
  and a flip would reverse every step's features, so both change the very sequence the task
  asks a model to read; the sequential-MNIST benchmarks this follows use none either.

  Args:
    data_dir: folder with the four IDX files.

  Returns:
    A :class:`Dataset` named ``'seq_fashion_mnist'``, 10 classes: raw uint8 ``[B, 28, 28]``,
    int32 labels; ``preprocess`` gives float32 ``x / 255`` as ``[B, T=28, F=28]``; input shape
    ``(28, 28)``, one example ``[T, F]``.

  Raises:
    DataNotFoundError: see :func:`load_arrays`.
  """
  arrays = load_arrays(data_dir)
  return Dataset(
      name='seq_fashion_mnist', num_classes=len(CLASSES),
      train=ArraySource(*arrays['train']), test=ArraySource(*arrays['test']),
      input_shape=IMAGE_SIZE, preprocess=_scale)


register_dataset('fashion_mnist', load_fashion_mnist,
                 spec=DataSpec(IMAGE_SIZE + (1,), len(CLASSES)))
register_dataset('seq_fashion_mnist', load_seq_fashion_mnist,
                 spec=DataSpec(IMAGE_SIZE, len(CLASSES)))
