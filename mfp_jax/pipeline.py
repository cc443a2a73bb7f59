"""An epoch's batches built ahead of the step: grain threads and worker processes.

:func:`load_batches` yields exactly the batches of :func:`mfp_jax.data.iterate_batches` (same
shuffle by ``(seed, epoch)``, same process shard, same augmentation generator per batch), so
a resumed run and a run with other loading settings see the same data in the same order.
Batch ``b`` of an epoch is ``data.EpochBatches(...)[b]``; grain maps the batch indices
``start_batch .. num_batches - 1`` through it:

* ``num_threads`` / ``prefetch``: a grain ``ReadOptions`` thread pool builds up to ``prefetch``
  batches ahead in each process. In the training process this overlaps reading, decoding and
  augmenting with the jitted step (numpy, PIL and file reads release the GIL for most of
  their work).
* ``num_workers``: grain's ``mp_prefetch`` -- ``num_workers`` spawned processes, worker ``i``
  building batches ``i, i + W, ...`` and the training process taking them round-robin (the
  order does not depend on ``W``). For loaders whose Python-side decode holds the GIL.

Worker processes receive the :class:`~mfp_jax.data.Dataset` pickled once (cloudpickle, as
grain does): a read-only ``np.memmap`` travels as its file name, offset, shape and dtype and
is mapped again in the worker (CIFAR10-DVS's ~1 GB frame cache is not copied); tfds
array_record sources and in-memory arrays pickle as they are. A data set that cannot be
pickled is refused with a :class:`~mfp_jax.config_lib.ConfigError` naming it, before any
process starts. Workers ignore SIGINT/SIGTERM (the training process finishes its step,
saves, and stops them) and exit if the training process dies.
"""

from __future__ import annotations

import io
import mmap
import os
import signal
import threading
import time
from typing import Any, Iterator

from absl import flags
import cloudpickle  # grain's own pickler for worker processes (a grain dependency)
import grain
import numpy as np

from mfp_jax import data as data_lib


def _open_memmap(filename: str, dtype: np.dtype, shape: tuple[int, ...], offset: int,
                 order: str) -> np.memmap:
  return np.memmap(filename, dtype=dtype, mode='r', offset=offset, shape=shape, order=order)


class _Pickler(cloudpickle.Pickler):
  """cloudpickle, with a whole read-only memmap sent as its file (mapped again on load)."""

  def reducer_override(self, obj: Any) -> Any:
    # A view of a memmap is also an np.memmap but its ``offset`` is the parent's: only the
    # array that owns the mapping (``base`` is the mmap) goes by file name.
    if isinstance(obj, np.memmap) and obj.mode == 'r' and isinstance(obj.base, mmap.mmap):
      order = 'F' if obj.flags.f_contiguous and not obj.flags.c_contiguous else 'C'
      return _open_memmap, (obj.filename, obj.dtype, obj.shape, obj.offset, order)
    return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
  """``obj`` pickled for a worker process (read-only memmaps by file name)."""
  buf = io.BytesIO()
  _Pickler(buf).dump(obj)
  return buf.getvalue()


def _loads(payload: bytes) -> Any:
  return cloudpickle.loads(payload)


class _Shipped:
  """A sequence of batches pickled once here, unpickled in each worker (grain pickles the
  pipeline once per worker; this pickles the data set once and checks it can be)."""

  def __init__(self, batches: data_lib.EpochBatches):
    self.batches = batches
    try:
      self.payload = dumps(batches)
    except Exception as e:  # pylint: disable=broad-except  (any pickling failure)
      from mfp_jax import config_lib  # Deferred: config_lib imports the registries.
      raise config_lib.ConfigError(
          f'data set {batches.dataset.name!r} cannot be sent to worker processes '
          f'({type(e).__name__}: {e}); set config.data.num_workers=0 to build its batches '
          f'in threads of the training process') from e

  def __len__(self) -> int:
    return len(self.batches)

  def __getitem__(self, b: int) -> dict[str, np.ndarray]:
    return self.batches[b]

  def __reduce__(self):
    return _loads, (self.payload,)


def _exit_with_parent(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(1.0)
  os._exit(1)  # The training process is gone (killed): nobody will read or stop us.


def _init_worker(parent: int, index: int, count: int) -> None:
  """In each worker: leave stop signals to the training process (it saves, then closes the
  pipeline) and exit if it dies without closing it (SIGKILL)."""
  del index, count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


class Batches:
  """An epoch's batches being built ahead: an iterator of ``{'image', 'label', 'mask'}``.

  :meth:`close` (or leaving a ``with`` block, or dropping the last reference, as a loop that
  stops mid-epoch does) stops its threads and worker processes and waits for them. After the
  last batch they are stopped in a background thread instead: a worker takes about a second
  to exit, and the caller has its evaluation to run.
  """

  def __init__(self, it: grain.DatasetIterator, num_batches: int, *, from_workers: bool):
    self._it, self.num_batches, self._from_workers = it, num_batches, from_workers
    self._taken, self._closed = 0, False
    self._closer: threading.Thread | None = None

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._taken == self.num_batches:  # known: no need to wait for grain to say so
      if self._closer is None and not self._closed:
        self._closer = threading.Thread(target=self._it.close, daemon=True,
                                        name='mfp_jax-close-batches')
        self._closer.start()
      raise StopIteration
    batch = next(self._it)
    self._taken += 1
    if self._from_workers:
      # Out of grain's shared memory into plain arrays: the block is freed now, not when
      # the caller (or a device array aliasing it) lets go.
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  def __len__(self) -> int:
    return self.num_batches

  def close(self) -> None:
    """Stops the threads and worker processes and waits until they have ended."""
    if self._closer is not None:
      self._closer.join()
    elif not self._closed:
      self._it.close()
    self._closed = True

  def __enter__(self) -> Batches:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if self._closer is None:  # else they are being stopped already; nothing to wait for
      self.close()


def load_batches(dataset: data_lib.Dataset,
                 split: str,
                 *,
                 batch_size: int,
                 seed: int = 0,
                 epoch: int = 0,
                 process_index: int = 0,
                 process_count: int = 1,
                 start_batch: int = 0,
                 num_workers: int = 0,
                 num_threads: int = 0,
                 prefetch: int = 0) -> Batches:
  """This process's batches of one epoch of ``split``, built ahead of the caller.

  The same batches, in the same order, as :func:`mfp_jax.data.iterate_batches` with the same
  arguments, for any ``num_workers`` / ``num_threads`` / ``prefetch``. Left at 0 they build
  nothing ahead (as ``iterate_batches``); train.py passes ``config.data``'s (defaults in
  ``config_lib.DATA_FIELDS``).

  Args:
    split: ``'train'`` or ``'test'``.
    batch_size: per-process batch size.
    start_batch: skip this many batches (resuming inside an epoch); they are not built.
    num_workers: worker processes building batches (0: none, threads of this process).
    num_threads: threads building batches in each process (0: each batch is built in the
      caller's thread when it asks for it); at most ``prefetch`` of them are busy. Above 1,
      the source's ``get_batch`` runs in several threads at once (the built-in sources
      allow it).
    prefetch: batches each process builds ahead (0: none, as ``num_threads = 0``).

  Returns:
    A :class:`Batches` iterator of ``{'image', 'label', 'mask'}`` dicts; close it when
    stopping before the end of the epoch (its ``__del__`` does too).

  Raises:
    ValueError: bad ``split`` or a negative count.
    mfp_jax.config_lib.ConfigError: ``num_workers > 0`` and the data set cannot be pickled.
  """
  for name, v in (('num_workers', num_workers), ('num_threads', num_threads),
                  ('prefetch', prefetch), ('start_batch', start_batch)):
    if v < 0:
      raise ValueError(f'load_batches: {name} must be >= 0, got {v}')
  batches = data_lib.EpochBatches(dataset, split, batch_size=batch_size, seed=seed,
                                  epoch=epoch, process_index=process_index,
                                  process_count=process_count)
  source = _Shipped(batches) if num_workers else batches
  ds = grain.MapDataset.source(source)[start_batch:]
  # A thread beyond the buffer would have nothing to build (and grain warns about it).
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(num_threads, prefetch),
                                            prefetch_buffer_size=prefetch))
  if num_workers:
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when it starts workers; outside an absl app (tests, a
      # notebook) they keep their defaults. A later app.run still parses the command line.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers,
                                     per_worker_buffer_size=max(prefetch, 1)),
        worker_init_fn=lambda i, n, parent=os.getpid(): _init_worker(parent, i, n))
  return Batches(iter(it), max(len(batches) - start_batch, 0), from_workers=num_workers > 0)
