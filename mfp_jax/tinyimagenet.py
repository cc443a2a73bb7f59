"""Tiny-ImageNet-200 from its unzipped folder (JPEGs read on demand with PIL)."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from mfp_jax import transforms
from mfp_jax.data import Dataset, DataNotFoundError
from mfp_jax.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_images


class ImageFileSource:
  """A :class:`~mfp_jax.data.Source` over image files, decoded with PIL per batch."""

  def __init__(self, paths: Sequence[str], labels: np.ndarray, size: int):
    self.paths = list(paths)
    self.labels = np.asarray(labels, np.int32)
    self.size = size

  def __len__(self) -> int:
    return len(self.paths)

  def _read(self, path: str) -> np.ndarray:
    from PIL import Image  # Deferred: only the image-folder data sets need PIL.

    with Image.open(path) as im:
      im = im.convert('RGB')  # Tiny-ImageNet has some greyscale JPEGs.
      if im.size != (self.size, self.size):
        im = im.resize((self.size, self.size), Image.BILINEAR)
      return np.asarray(im, np.uint8)

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[B, size, size, 3]`` and int32 labels ``[B]``."""
    images = np.stack([self._read(self.paths[int(i)]) for i in indices])
    return images, self.labels[np.asarray(indices)]


def load_tinyimagenet(data_dir: str) -> Dataset:
  """Tiny-ImageNet-200 from the standard folder, ``data_dir`` or ``data_dir/tiny-imagenet-200``.

  Layout: ``wnids.txt``; ``train/<wnid>/images/*.JPEG``; ``val/images/*.JPEG`` with
  ``val/val_annotations.txt`` (tab separated: file, wnid, bbox). Label = index of the wnid in
  ``sorted(wnids)``. The test split is ``val`` (the official test split has no labels). File
  lists are sorted, so indices are deterministic.

  Args:
    data_dir: folder holding the unzipped data set.

  Returns:
    A :class:`Dataset`: raw uint8 ``[B, 64, 64, 3]``, int32 labels in ``[0, 200)`` (or the
    number of wnids); ``preprocess`` gives float32 ImageNet-normalized ``[B, 64, 64, 3]``;
    ``augment`` is pad-4 random crop + horizontal flip; input shape ``(64, 64, 3)``.

  Raises:
    DataNotFoundError: the folder is missing or incomplete.
  """
  root = next((r for r in (os.path.join(data_dir, 'tiny-imagenet-200'), data_dir)
               if os.path.isfile(os.path.join(r, 'wnids.txt'))), None)
  missing = lambda problem: _missing(data_dir, problem)
  if root is None:
    expected = f'{data_dir}/tiny-imagenet-200/wnids.txt or {data_dir}/wnids.txt'
    raise missing(f'no Tiny-ImageNet-200 folder: expected {expected}.')
  with open(os.path.join(root, 'wnids.txt')) as f:
    wnids = sorted({line.strip() for line in f if line.strip()})
  if not wnids:
    raise missing(f'{root}/wnids.txt is empty.')
  train_paths, train_labels = _train_files(root, wnids, missing)
  val_paths, val_labels = _val_files(root, wnids, missing)
  mean_std = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
  return Dataset(
      name='tinyimagenet', num_classes=len(wnids),
      train=ImageFileSource(train_paths, train_labels, 64),
      test=ImageFileSource(val_paths, val_labels, 64),
      input_shape=(64, 64, 3),
      preprocess=functools.partial(normalize_images, **mean_std),
      augment=functools.partial(transforms.augment_image, pad=4, cutout_size=0))


def _missing(data_dir: str, problem: str) -> DataNotFoundError:
  return DataNotFoundError(
      f'tinyimagenet: {problem}\nGet it once (~240 MB):\n  wget http://cs231n.stanford.edu/'
      f'tiny-imagenet-200.zip && unzip -q tiny-imagenet-200.zip -d {data_dir}')


def _train_files(root: str, wnids: list[str], missing) -> tuple[list[str], np.ndarray]:
  """Sorted JPEG paths of ``train/<wnid>/images`` and their labels (wnid index)."""
  paths, labels = [], []
  for i, w in enumerate(wnids):
    folder = os.path.join(root, 'train', w, 'images')
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.jpeg', '.jpg'))
                   ) if os.path.isdir(folder) else []
    if not files:
      raise missing(f'incomplete: no JPEGs in {folder}.')
    paths += [os.path.join(folder, f) for f in files]
    labels += [i] * len(files)
  return paths, np.asarray(labels)


def _val_files(root: str, wnids: list[str], missing) -> tuple[list[str], np.ndarray]:
  """The ``val`` split from ``val_annotations.txt``, sorted by file name."""
  ann = os.path.join(root, 'val', 'val_annotations.txt')
  val_dir = os.path.join(root, 'val', 'images')
  if not (os.path.isfile(ann) and os.path.isdir(val_dir)):
    raise missing(f'incomplete: need {ann} and {val_dir}/.')
  with open(ann) as f:
    rows = sorted(line.split('\t')[:2] for line in f if line.strip())
  present = set(os.listdir(val_dir))
  absent = [r[0] for r in rows if r[0] not in present]
  unknown = sorted({r[1] for r in rows} - set(wnids))
  if not rows or absent or unknown:
    raise missing(f'incomplete val split in {root}/val: {len(rows)} annotations, '
                  f'{len(absent)} image files missing, unknown wnids {unknown[:3]}.')
  label_of = {w: i for i, w in enumerate(wnids)}
  return ([os.path.join(val_dir, r[0]) for r in rows],
          np.asarray([label_of[r[1]] for r in rows]))
