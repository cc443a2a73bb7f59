"""Numpy augmentations and normalization shared by the data sets (train split only).

Every augmentation is vectorized numpy driven by the ``np.random.Generator`` it is given, so
a batch is reproducible from ``(seed, epoch, batch, process)`` (see :mod:`mfp_jax.data`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Per-channel pixel mean / std of the training sets, on [0, 1] pixels. CIFAR: the per-channel
# statistics of the 50k training images (note: the often-copied CIFAR10 std 0.2023/0.1994/0.2010
# is the mean of per-image stds, not the pixel std). ImageNet: the torchvision constants, used
# for Tiny-ImageNet as is customary.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 ``[B, H, W, C]`` -> float32 ``[B, H, W, C]``: ``(x / 255 - mean) / std`` per channel."""
  x = x.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_crop_flip(x: np.ndarray, rng: np.random.Generator, *, pad: int = 4) -> np.ndarray:
  """Zero-padded random crop back to ``H x W`` plus a horizontal flip with probability 1/2.

  Applied after normalization, so the zero padding is the data set's mean colour.

  Args:
    x: ``[B, H, W, C]``.
    rng: draws ``B`` row offsets, ``B`` column offsets, ``B`` flips, in that order.
    pad: padding on every side (the largest shift).

  Returns:
    ``[B, H, W, C]``, dtype of ``x``.
  """
  b, h, w = x.shape[:3]
  oy = rng.integers(0, 2 * pad + 1, b)
  ox = rng.integers(0, 2 * pad + 1, b)
  flip = rng.random(b) < 0.5
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = oy[:, None] + np.arange(h)  # [B, H]
  cols = ox[:, None] + np.arange(w)  # [B, W]
  # A flip is a reversed column index list, so crop and flip are one gather.
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  out = np.take_along_axis(xp, rows[:, :, None, None], axis=1)
  return np.take_along_axis(out, cols[:, None, :, None], axis=2)


def cutout(x: np.ndarray, rng: np.random.Generator, *, size: int) -> np.ndarray:
  """Cutout (DeVries & Taylor 2017, arXiv:1708.04552): one ``size x size`` hole per image.

  ``x: [B, H, W, C]`` -> same shape and dtype. The centre is uniform over the image, so the hole
  may be clipped at the border (as in the paper); it is set to 0, the mean of normalized data.
  ``rng`` draws ``B`` centre rows, then ``B`` centre columns.
  """
  b, h, w = x.shape[:3]
  cy = rng.integers(0, h, b)[:, None]
  cx = rng.integers(0, w, b)[:, None]
  ys, xs = np.arange(h)[None], np.arange(w)[None]
  in_y = (ys >= cy - size // 2) & (ys < cy - size // 2 + size)  # [B, H]
  in_x = (xs >= cx - size // 2) & (xs < cx - size // 2 + size)  # [B, W]
  hole = in_y[:, :, None] & in_x[:, None, :]
  return np.where(hole[..., None], np.zeros((), x.dtype), x)


def augment_image(x: np.ndarray, rng: np.random.Generator, *, pad: int,
                   cutout_size: int) -> np.ndarray:
  x = random_crop_flip(x, rng, pad=pad)
  return cutout(x, rng, size=cutout_size) if cutout_size > 0 else x


def flip_roll(x: np.ndarray, rng: np.random.Generator, *, max_shift: int = 5) -> np.ndarray:
  """Horizontal flip (p = 1/2) and a cyclic roll by up to ``max_shift`` pixels in y and x.

  The TET / NDA recipe for CIFAR10-DVS; one shift and one flip per sample, shared by its ``T``
  frames so the motion in the recording stays intact.

  Args:
    x: ``[B, T, H, W, C]``.
    rng: draws ``B`` flips, ``B`` y shifts, ``B`` x shifts, in that order.

  Returns:
    ``[B, T, H, W, C]``, dtype of ``x``.
  """
  b, _, h, w = x.shape[:4]
  flip = rng.random(b) < 0.5
  dy = rng.integers(-max_shift, max_shift + 1, b)
  dx = rng.integers(-max_shift, max_shift + 1, b)
  rows = (np.arange(h)[None] - dy[:, None]) % h  # [B, H]: out[i] = in[i - dy]
  cols = (np.arange(w)[None] - dx[:, None]) % w
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  out = np.take_along_axis(x, rows[:, None, :, None, None], axis=2)
  return np.take_along_axis(out, cols[:, None, None, :, None], axis=3)
