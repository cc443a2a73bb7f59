"""Readers for the real data sets: CIFAR10/100 (tfds), Tiny-ImageNet (JPEGs), CIFAR10-DVS.

Each ``load_*`` checks its files *before* touching a library that could try to download, and
raises :class:`~mfp_jax.data.DataNotFoundError` naming the expected location and the one-time
command that puts the data there. Nothing here downloads, except :func:`prepare_cifar`
(``python -m mfp_jax.data_sources prepare cifar10 --data_dir D``, needs TensorFlow once).

Raw examples are uint8 images ``[B, H, W, 3]`` or float16 event frames ``[B, T, S, S, 2]``;
``preprocess`` gives float32 model input; ``augment`` (train only) is vectorized numpy driven
by the ``np.random.Generator`` it is given, so batches are reproducible.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import json
import logging
import os
import re
from typing import Sequence

import numpy as np

from mfp_jax import transforms
from mfp_jax.data import Dataset, DataNotFoundError, DataSpec, register_dataset
# Re-exported: the transforms lived here first.
from mfp_jax.tinyimagenet import ImageFileSource, load_tinyimagenet
from mfp_jax.transforms import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                IMAGENET_MEAN, IMAGENET_STD, cutout, flip_roll,
                                normalize_images, random_crop_flip)

_log = logging.getLogger(__name__)
# The transforms and the Tiny-ImageNet loader lived here first; their names stay importable.
__all__ = ['CIFAR10_MEAN', 'CIFAR10_STD', 'CIFAR100_MEAN', 'CIFAR100_STD', 'DVS_CLASSES',
           'FrameSource', 'IMAGENET_MEAN', 'IMAGENET_STD', 'ImageFileSource', 'TfdsSource',
           'area_resize_matrix', 'check_cifar_files', 'cutout', 'events_to_frames', 'flip_roll',
           'load_cifar', 'load_cifar10dvs', 'load_tinyimagenet', 'normalize_images',
           'prepare_cifar', 'random_crop_flip', 'split_per_class']

# --- CIFAR10 / CIFAR100 through tfds array_record files ---------------------------------------

_CIFAR = {  # name -> (classes, mean, std, archive tfds reads from downloads/manual/)
    'cifar10': (10, CIFAR10_MEAN, CIFAR10_STD, 'cifar-10-binary.tar.gz'),
    'cifar100': (100, CIFAR100_MEAN, CIFAR100_STD, 'cifar-100-binary.tar.gz'),
}


class TfdsSource:
  """A :class:`~mfp_jax.data.Source` over a tfds data source of ``{'image', 'label'}`` dicts."""

  def __init__(self, tfds_source):
    self._src = tfds_source

  def __len__(self) -> int:
    return len(self._src)

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[B, 32, 32, 3]`` and int32 labels ``[B]``."""
    idx = [int(i) for i in indices]
    # __getitems__ reads the records in one array_record call instead of B lookups.
    getitems = getattr(self._src, '__getitems__', None)
    records = getitems(idx) if getitems else [self._src[i] for i in idx]
    images = np.stack([np.asarray(r['image'], np.uint8) for r in records])
    labels = np.asarray([r['label'] for r in records], np.int32)
    return images, labels


def _check_cifar_name(name: str) -> None:
  if name not in _CIFAR:
    raise ValueError(f'CIFAR name must be one of {sorted(_CIFAR)}, got {name!r}')


def _cifar_missing_message(name: str, data_dir: str, version: str, problem: str) -> str:
  archive = _CIFAR[name][3]
  where = os.path.join(data_dir, name, version)
  return (
      f'{name}: {problem}\n'
      f'Expected prepared tfds files {where}/{name}-{{train,test}}.array_record-*-of-* and '
      f'dataset_info.json.\n'
      f'Prepare once (needs TensorFlow and network, ~170 MB):\n'
      f'  pip install -e ".[prepare]"\n'
      f'  python -m mfp_jax.data_sources prepare {name} --data_dir {data_dir}\n'
      f'  # same as: python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\', '
      f'data_dir=\'{data_dir}\').download_and_prepare(file_format=\'array_record\')"\n'
      f'Offline: first put {archive} into {os.path.join(data_dir, "downloads", "manual")}/.')


def check_cifar_files(name: str, data_dir: str) -> str:
  """Checks the prepared array_record files of ``name`` exist; returns their version folder.

  Looks for ``<data_dir>/<name>/<version>/dataset_info.json`` and every shard
  ``<name>-{train,test}.array_record-XXXXX-of-NNNNN`` (``version``: the tfds builder's
  default, which is what ``tfds.data_source`` reads).

  Raises:
    DataNotFoundError: a file is missing; the message says how to prepare the data.
  """
  import tensorflow_datasets as tfds  # Deferred: only the CIFAR loaders need tfds.

  version = str(tfds.builder_cls(name).VERSION)
  folder = os.path.join(data_dir, name, version)
  if not os.path.isfile(os.path.join(folder, 'dataset_info.json')):
    problem = f'no prepared version {version} in {os.path.join(data_dir, name)}'
    raise DataNotFoundError(_cifar_missing_message(name, data_dir, version, problem))
  for split in ('train', 'test'):
    shards = glob.glob(os.path.join(folder, f'{name}-{split}.array_record-*'))
    if not shards:
      problem = f'no {split} array_record files in {folder}'
      if glob.glob(os.path.join(folder, f'{name}-{split}.tfrecord-*')):
        problem += " (it was prepared as tfrecord: prepare again with file_format='array_record')"
      raise DataNotFoundError(_cifar_missing_message(name, data_dir, version, problem))
    m = re.search(r'-of-(\d+)$', shards[0])
    if m and len(shards) != int(m.group(1)):
      problem = f'{split} split incomplete: {len(shards)} of {int(m.group(1))} shards in {folder}'
      raise DataNotFoundError(_cifar_missing_message(name, data_dir, version, problem))
  return folder


def load_cifar(name: str, data_dir: str, *, cutout: int = 0) -> Dataset:
  """CIFAR10 or CIFAR100 from prepared tfds array_record files (no TensorFlow needed).

  Args:
    name: ``'cifar10'`` or ``'cifar100'`` (fine labels).
    data_dir: the tfds data dir (holds ``<name>/<version>/``).
    cutout: side in pixels of the Cutout hole added to the train augmentation; 0 = none.

  Returns:
    A :class:`Dataset`: raw uint8 ``[B, 32, 32, 3]``, int32 labels; ``preprocess`` gives float32
    per-channel normalized ``[B, 32, 32, 3]``; ``augment`` is pad-4 random crop + horizontal
    flip (+ Cutout); input shape ``(32, 32, 3)``.

  Raises:
    ValueError: unknown name or negative cutout.
    DataNotFoundError: the prepared files are missing (checked before tfds is asked).
  """
  _check_cifar_name(name)
  if cutout < 0:
    raise ValueError(f'load_cifar: cutout must be >= 0, got {cutout}')
  check_cifar_files(name, data_dir)
  import tensorflow_datasets as tfds  # Deferred: only the CIFAR loaders need tfds.

  num_classes, mean, std, _ = _CIFAR[name]
  # download=False: with download allowed and a problem on disk, tfds retries the network
  # for minutes before failing.
  train, test = (TfdsSource(tfds.data_source(name, split=s, data_dir=data_dir, download=False))
                 for s in ('train', 'test'))
  return Dataset(
      name=name, num_classes=num_classes, train=train, test=test, input_shape=(32, 32, 3),
      preprocess=functools.partial(normalize_images, mean=mean, std=std),
      augment=functools.partial(transforms.augment_image, pad=4, cutout_size=cutout))


def prepare_cifar(name: str, data_dir: str) -> str:
  """Downloads ``name`` and writes tfds array_record files under ``data_dir`` (one time).

  Needs TensorFlow (``pip install -e ".[prepare]"``) and network, unless the archive is in
  ``<data_dir>/downloads/manual/``. Returns the prepared version folder.

  Raises:
    ValueError: unknown name.
    ImportError: TensorFlow is not installed.
  """
  _check_cifar_name(name)
  try:
    import tensorflow  # noqa: F401  pylint: disable=unused-import
  except ImportError as e:
    raise ImportError('preparing CIFAR needs TensorFlow: pip install -e ".[prepare]"') from e
  import tensorflow_datasets as tfds

  tfds.builder(name, data_dir=data_dir).download_and_prepare(file_format='array_record')
  return check_cifar_files(name, data_dir)


# --- CIFAR10-DVS: AEDAT4 event recordings -> cached frames ------------------------------------

DVS_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
               'truck')  # labels 0..9, as in tonic.datasets.CIFAR10DVS
DVS_SENSOR_SIZE = (128, 128, 2)  # (W, H, polarities)
_CACHE_FORMAT = 1  # bump when the framing changes, so old caches are rebuilt


def _dvs_files(data_dir: str) -> list[str]:
  """Sorted ``<class>/<file>.aedat4`` paths relative to ``<data_dir>/CIFAR10DVS``."""
  root = os.path.join(data_dir, 'CIFAR10DVS')
  howto = (f'Get it once: download CIFAR10DVS.zip (https://figshare.com/ndownloader/files/'
           f'38023437), unzip it into {root}/ and unzip the ten per-class zips there '
           f'(airplane.zip ... truck.zip) so that {root}/<class>/*.aedat4 exist. '
           f"(Or run tonic.datasets.CIFAR10DVS(save_to='{data_dir}') once with network.)")
  if not os.path.isdir(root):
    raise DataNotFoundError(f'cifar10dvs: no folder {root}.\n{howto}')
  files = []
  for c in DVS_CLASSES:
    folder = os.path.join(root, c)
    names = sorted(f for f in os.listdir(folder) if f.endswith('.aedat4')) if os.path.isdir(
        folder) else []
    if not names:
      hint = f' ({c}.zip is there: unzip it)' if os.path.isfile(folder + '.zip') else ''
      raise DataNotFoundError(
          f'cifar10dvs: incomplete, no .aedat4 files in {folder}{hint}.\n{howto}')
    files += [f'{c}/{n}' for n in names]
  return files


def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` float32 weights of area (box) resampling along one axis.

  Row ``i`` averages the input interval ``[i, i + 1) * n_in / n_out`` with fractional weights at
  the borders (rows sum to 1), so no event is dropped or counted twice.
  """
  edges = np.arange(n_out + 1) * (n_in / n_out)
  lo, hi = edges[:-1, None], edges[1:, None]
  j = np.arange(n_in)[None]
  overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
  return (overlap / (n_in / n_out)).astype(np.float32)


def events_to_frames(events: np.ndarray, *, T: int, size: int) -> np.ndarray:
  """Bins one recording into ``T`` frames with tonic and area-resizes them.

  ``tonic.transforms.ToFrame(n_time_bins=T)`` counts events per (time bin, polarity, pixel) at
  the sensor's 128 x 128; the counts are then area-averaged to ``size x size``. Area resampling
  of the *frames* is used rather than ``tonic.transforms.Downsample`` of the *events*: with a
  non-integer ratio (128 / 48) Downsample floors the scaled coordinates, so output pixels
  collect 2 or 3 sensor columns in an uneven pattern; area weights treat every pixel alike.

  Args:
    events: structured array with fields ``t, x, y, p`` (tonic's AEDAT4 reader, renamed).

  Returns:
    float32 ``[T, size, size, 2]`` (time, y, x, polarity): mean events per pixel area.
  """
  import tonic  # Deferred: only the event data set needs tonic.

  frames = tonic.transforms.ToFrame(sensor_size=DVS_SENSOR_SIZE, n_time_bins=T)(events)
  if frames.shape != (T, 2, 128, 128):
    raise ValueError(f'ToFrame gave shape {frames.shape}, expected {(T, 2, 128, 128)}')
  a = area_resize_matrix(128, size)
  out = a @ frames.astype(np.float32) @ a.T  # [T, 2, size, size]
  return out.transpose(0, 2, 3, 1)


def _frame_file(path: str, T: int, size: int) -> np.ndarray:
  import tonic.io  # Deferred: only the event data set needs tonic.

  events = tonic.io.read_aedat4(path)
  events.dtype.names = ('t', 'x', 'y', 'p')  # the reader names polarity 'on'; ToFrame wants 'p'
  try:
    return events_to_frames(events, T=T, size=size)
  except Exception as e:
    raise ValueError(f'cannot frame {path}: {e}') from e


def _build_dvs_cache(data_dir: str, cache_dir: str, files: list[str], T: int, size: int,
                     workers: int) -> None:
  os.makedirs(cache_dir, exist_ok=True)
  manifest = os.path.join(cache_dir, 'manifest.json')
  if os.path.exists(manifest):
    os.remove(manifest)  # The manifest marks a complete cache: drop it before rewriting.
  frames_path = os.path.join(cache_dir, 'frames.npy')
  tmp = f'{frames_path}.tmp{os.getpid()}.npy'
  # Write straight into a memory-mapped .npy so the ~1 GB result never sits in RAM at once.
  out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float16,
                                  shape=(len(files), T, size, size, 2))
  paths = [os.path.join(data_dir, 'CIFAR10DVS', f) for f in files]
  _log.info('cifar10dvs: framing %d recordings into %s (one time)', len(files), cache_dir)
  try:
    # Threads: measured ~1.6x faster than a loop on 2 cores (decoding and binning release the
    # GIL for much of the work), without pickling events between processes.
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
      for i, fr in enumerate(ex.map(functools.partial(_frame_file, T=T, size=size), paths)):
        out[i] = fr
        if (i + 1) % 1000 == 0:
          _log.info('cifar10dvs: %d / %d', i + 1, len(files))
    out.flush()
    del out
    os.replace(tmp, frames_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  with open(manifest + f'.tmp{os.getpid()}', 'w') as f:
    json.dump({'format': _CACHE_FORMAT, 'T': T, 'size': size, 'files': files}, f)
  os.replace(manifest + f'.tmp{os.getpid()}', manifest)


def _cache_valid(cache_dir: str, files: list[str], T: int, size: int) -> bool:
  try:
    with open(os.path.join(cache_dir, 'manifest.json')) as f:
      m = json.load(f)
  except (OSError, ValueError):
    return False
  want = {'format': _CACHE_FORMAT, 'T': T, 'size': size, 'files': files}
  return m == want and os.path.isfile(os.path.join(cache_dir, 'frames.npy'))


def split_per_class(labels: np.ndarray, *, test_fraction: float = 0.1,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Seeded per-class split: ``floor(n_c * test_fraction)`` examples of each class held out.

  Args:
    labels: int ``[N]``, in the (sorted) order of the examples.

  Returns:
    Sorted train and test indices into ``labels``.
  """
  test = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    perm = np.random.default_rng([seed, int(c)]).permutation(len(idx))
    test.append(idx[perm[:int(len(idx) * test_fraction)]])
  test = np.sort(np.concatenate(test))
  return np.setdiff1d(np.arange(len(labels)), test), test


class FrameSource:
  """A :class:`~mfp_jax.data.Source` over rows of a (memory-mapped) frame array."""

  def __init__(self, frames: np.ndarray, labels: np.ndarray, rows: np.ndarray):
    self.frames, self.labels, self.rows = frames, labels, np.asarray(rows)

  def __len__(self) -> int:
    return len(self.rows)

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float16 frames ``[B, T, S, S, 2]`` and int32 labels ``[B]``."""
    r = self.rows[np.asarray(indices)]
    return np.asarray(self.frames[r]), np.asarray(self.labels[r], np.int32)


def load_cifar10dvs(data_dir: str, *, T: int, size: int = 48, split_seed: int = 0,
                    cache_dir: str | None = None, workers: int | None = None) -> Dataset:
  """CIFAR10-DVS from ``<data_dir>/CIFAR10DVS/<class>/*.aedat4`` as ``T`` event frames.

  Every recording is decoded with tonic's AEDAT4 reader (the one ``tonic.datasets.CIFAR10DVS``
  uses), binned by :func:`events_to_frames` and cached once in
  ``<cache_dir or data_dir>/cache_T{T}_s{size}/``: ``frames.npy`` (float16
  ``[N, T, size, size, 2]``, all recordings in sorted path order, ~0.9 GB for T=10, size=48)
  and ``manifest.json`` (T, size and the file list; written last, so a cache is used only if
  complete and built from the same files). Both are written to a temp name and renamed.
  Framing all 10k recordings is a one-time cost of minutes (measured: ~25 ms per 300k-event
  recording, 1.6x faster in 2 threads); later loads memory-map the cache. The split is applied
  on top of the cache, so changing ``split_seed`` needs no new cache.

  Only the class folders are checked (every class needs >= 1 file), not tonic's
  ``CIFAR10DVS.zip`` / >= 1000-file rule, under which tonic's class would try to download.

  Args:
    data_dir: folder holding ``CIFAR10DVS/``.
    T: time bins per recording.
    size: output side (area-resized from 128).
    split_seed: seed of the per-class 9:1 train/test split over sorted paths.
    cache_dir: where the frame cache goes (default ``data_dir``; e.g. if that is read-only).
    workers: threads used to build the cache (default: CPU count).

  Returns:
    A :class:`Dataset`: raw float16 ``[B, T, size, size, 2]``, int32 labels 0..9 (airplane ..
    truck); ``preprocess`` is a float32 cast (mean event counts; no scaling, the first
    normalization layer handles scale); ``augment`` is :func:`flip_roll`; input shape
    ``(T, size, size, 2)``.

  Raises:
    ValueError: bad ``T`` / ``size``, or a recording that cannot be framed.
    DataNotFoundError: the folder or a class is missing.
  """
  if T < 1:
    raise ValueError(f'load_cifar10dvs: T must be >= 1, got {T}')
  if not 1 <= size <= 128:
    raise ValueError(f'load_cifar10dvs: size must be in 1..128, got {size}')
  files = _dvs_files(data_dir)
  cache = os.path.join(cache_dir or data_dir, f'cache_T{T}_s{size}')
  if not _cache_valid(cache, files, T, size):
    _build_dvs_cache(data_dir, cache, files, T, size, workers or os.cpu_count() or 1)
  frames = np.load(os.path.join(cache, 'frames.npy'), mmap_mode='r')
  labels = np.asarray([DVS_CLASSES.index(f.split('/')[0]) for f in files], np.int32)
  train, test = split_per_class(labels, test_fraction=0.1, seed=split_seed)
  return Dataset(
      name='cifar10dvs', num_classes=10,
      train=FrameSource(frames, labels, train), test=FrameSource(frames, labels, test),
      input_shape=(T, size, size, 2), preprocess=functools.partial(np.asarray, dtype=np.float32),
      augment=functools.partial(flip_roll, max_shift=5))


# --- Registration ----------------------------------------------------------------------------


def _cifar_loader(name: str):
  def load(data_dir: str, *, cutout: int = 0) -> Dataset:
    return load_cifar(name, data_dir, cutout=cutout)

  load.__doc__ = f'{name} from prepared tfds files under ``data_dir``; see :func:`load_cifar`.'
  return load


for _name, (_classes, *_) in _CIFAR.items():
  register_dataset(_name, _cifar_loader(_name), spec=DataSpec((32, 32, 3), _classes))
register_dataset('tinyimagenet', load_tinyimagenet, spec=DataSpec((64, 64, 3), 200))
register_dataset('cifar10dvs', load_cifar10dvs,
                 spec=lambda T, size=48: DataSpec((T, size, size, 2), len(DVS_CLASSES)))


# --- CLI --------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
  """``python -m mfp_jax.data_sources prepare {cifar10,cifar100} --data_dir D``."""
  from absl import app, flags  # Deferred: the loaders above need no flags.
  if len(argv) != 3 or argv[1] != 'prepare' or argv[2] not in _CIFAR:
    raise app.UsageError(f'usage: python -m mfp_jax.data_sources prepare '
                         f'{{{",".join(sorted(_CIFAR))}}} --data_dir D')
  print(prepare_cifar(argv[2], flags.FLAGS.data_dir))


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('data_dir', None, 'where tfds writes the prepared data set')
  flags.mark_flag_as_required('data_dir')
  app.run(main)
