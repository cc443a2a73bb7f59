"""Files a deployment ships: bit-packed weights (``.npz``) and a ``jax.export`` artifact.

* :func:`save_packed` / :func:`load_packed` -- the folded :class:`~mfp_jax.inference.Program`
  as an uncompressed ``.npz``: 1-bit signs packed 8 per byte, per-channel folded scales and
  shifts, ``M``, and the first/last layers as ``int8`` levels + one scale (or float32). Read
  with ``np.load(allow_pickle=False)``; a SHA-256 over every array detects corrupted or edited
  arrays (an integrity check, not a signature: whoever rewrites the file can rewrite it too).
* :func:`export_serial` / :func:`load_exported` -- the serial inference function serialized
  with ``jax.export`` (symbolic batch dimension) followed by its packed weights, behind a small
  header with the input spec and a SHA-256 of the rest.

Every damaged, truncated or tampered file raises :class:`ArtifactError` naming the file,
before any library parses the damaged bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from typing import Any, BinaryIO, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfp_jax import inference

PACKED_FORMAT = 'mfp_jax.packed/1'
EXPORT_MAGIC = b'MFPJAX-EXPORT/1\n'
_META_KEY = '__meta__'


class ArtifactError(ValueError):
  """A packed-weight or exported file is unreadable, truncated or altered; names the file."""


def _digest(arrays: dict[str, np.ndarray]) -> str:
  """SHA-256 over names, dtypes, shapes and bytes of every array, in name order."""
  h = hashlib.sha256()
  for k in sorted(arrays):
    a = np.ascontiguousarray(arrays[k])
    h.update(f'{k}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _write_npz(program: inference.Program, f: BinaryIO) -> None:
  meta = {'format': PACKED_FORMAT, 'ops': list(program.ops), 'meta': program.meta,
          'arrays': {k: [v.dtype.str, list(v.shape)] for k, v in program.arrays.items()},
          'sha256': _digest(program.arrays)}
  np.savez(f, **program.arrays, **{_META_KEY: np.asarray(json.dumps(meta))})


def save_packed(program: inference.Program, path: str) -> int:
  """Writes ``program`` to ``path`` (``.npz``, no pickles). Returns the bytes of array data."""
  with open(path, 'wb') as f:
    _write_npz(program, f)
  return sum(int(v.nbytes) for v in program.arrays.values())


def _read_npz(f: str | BinaryIO, name: str) -> inference.Program:
  try:
    with np.load(f, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile/numpy raise many types for damaged bytes
    # numpy takes whatever is neither a zip nor .npy for a pickle and suggests loading it
    # "unsafely": say what the file is instead, in one line.
    try:
      if isinstance(f, str):
        with open(f, 'rb') as g:
          head = g.read(len(EXPORT_MAGIC))
      else:
        f.seek(0)
        head = f.read(len(EXPORT_MAGIC))
    except OSError as read_error:
      raise ArtifactError(f'{name}: cannot read it ({read_error.strerror or read_error})') from e
    if head.startswith(EXPORT_MAGIC):
      why = 'it is an exported model (.mfpx): read it with deploy.load_exported'
    elif not head.startswith(b'PK'):
      why = f'not an .npz (zip) file; it starts with {head[:8]!r}'
    else:
      why = f'a damaged .npz ({type(e).__name__}: {(str(e).strip().splitlines() or [""])[0]})'
    raise ArtifactError(f'{name}: not a packed weight file: {why}') from e
  try:
    meta = json.loads(str(data.pop(_META_KEY)))
    if meta.get('format') != PACKED_FORMAT:
      raise ValueError(f'format {meta.get("format")!r}, expected {PACKED_FORMAT!r}')
    spec = meta['arrays']
    if set(spec) != set(data):
      raise ValueError(f'arrays {sorted(set(data) ^ set(spec))} missing or unexpected')
    for k, (dtype, shape) in spec.items():
      if data[k].dtype.str != dtype or list(data[k].shape) != shape:
        raise ValueError(f'array {k} is {data[k].dtype.str} {list(data[k].shape)}, '
                         f'expected {dtype} {shape}')
    if _digest(data) != meta['sha256']:
      raise ValueError('SHA-256 of the arrays does not match (altered after saving)')
    return inference.Program(tuple(meta['ops']), data, meta['meta'])
  except (KeyError, TypeError, ValueError) as e:
    raise ArtifactError(f'{name}: invalid packed weight file: {e}') from e


def load_packed(path: str) -> inference.Program:
  """Reads a file written by :func:`save_packed`.

  Raises:
    ArtifactError: not an ``.npz`` of this format, truncated, or its arrays altered.
  """
  return _read_npz(path, path)


def packed_infer_fn(path: str, *, chunk_size: int = inference.DEFAULT_CHUNK,
                    check_finite: bool = True) -> Callable[[Any], jax.Array]:
  """``x [B, *input_shape] float32 -> logits [B, K]`` from a packed file (serial form), in
  chunks of ``chunk_size`` rows; NaN/inf inputs raise ``ValueError`` unless
  ``check_finite=False``."""
  program = load_packed(path)
  fn, arrays = inference.program_fn(program), inference.program_arrays(program)
  shape = program.meta['input_shape']

  def infer(x):
    inference.check_input(x, shape, check_finite=check_finite)
    return inference.run_chunked(lambda part: fn(arrays, part), x, chunk_size)

  return infer


def export_serial(program: inference.Program, path: str, *,
                  platforms: Sequence[str] | None = None) -> int:
  """Serializes the serial inference of ``program`` with ``jax.export`` to ``path``.

  The file holds the exported function ``(weights, x) -> logits`` (batch dimension symbolic:
  any ``B >= 1``) followed by its bit-packed weights, so the file alone runs the network. The
  weights stay arguments rather than constants: XLA would otherwise fold them at compile time
  with a different rounding from the jitted path, and large constants slow compilation.

  Args:
    program: from :func:`mfp_jax.inference.build_program` or :func:`load_packed`.
    path: output file.
    platforms: lowering targets (default: the current backend), e.g. ``('cpu', 'cuda')``.

  Returns:
    the file size in bytes.
  """
  fn = inference.program_fn(program)
  (b,) = jax.export.symbolic_shape('b')
  arrays = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), program.arrays)
  x = jax.ShapeDtypeStruct((b, *program.meta['input_shape']), jnp.float32)
  payload = bytes(jax.export.export(fn, platforms=platforms)(arrays, x).serialize())
  buf = io.BytesIO()
  _write_npz(program, buf)
  weights = buf.getvalue()
  header = json.dumps({'input_shape': program.meta['input_shape'], 'dtype': 'float32',
                       'num_classes': program.meta['num_classes'], 'T': program.meta['T'],
                       'payload_bytes': len(payload), 'weights_bytes': len(weights),
                       'sha256': hashlib.sha256(payload + weights).hexdigest()}).encode()
  blob = EXPORT_MAGIC + struct.pack('<Q', len(header)) + header + payload + weights
  with open(path, 'wb') as f:
    f.write(blob)
  return len(blob)


class ExportedModel:
  """A loaded :func:`export_serial` artifact; call it on ``float32 [B, *input_shape]``."""

  def __init__(self, exported: jax.export.Exported, program: inference.Program, *,
               chunk_size: int = inference.DEFAULT_CHUNK, check_finite: bool = True):
    self.exported, self.program = exported, program
    self.input_shape = tuple(program.meta['input_shape'])
    self.chunk_size, self.check_finite = chunk_size, check_finite
    self._arrays = inference.program_arrays(program)

  def __call__(self, x: Any) -> jax.Array:
    """``float32 [B, *input_shape] -> logits [B, K]`` in chunks of ``chunk_size`` rows;
    ``ValueError`` on a wrong shape or dtype, or (``check_finite``) a NaN/inf value."""
    inference.check_input(x, self.input_shape, check_finite=self.check_finite)
    return inference.run_chunked(lambda part: self.exported.call(self._arrays, part), x,
                                 self.chunk_size)


def load_exported(path: str, *, chunk_size: int = inference.DEFAULT_CHUNK,
                  check_finite: bool = True) -> ExportedModel:
  """Reads and checks a file written by :func:`export_serial` (calls run in chunks of
  ``chunk_size`` rows and refuse NaN/inf unless ``check_finite=False``).

  Raises:
    ArtifactError: not such a file, truncated, or altered.
  """
  try:
    with open(path, 'rb') as f:
      blob = f.read()
  except OSError as e:
    raise ArtifactError(f'{path}: cannot read exported model ({e})') from e
  n = len(EXPORT_MAGIC)
  if blob[:n] != EXPORT_MAGIC or len(blob) < n + 8:
    raise ArtifactError(f'{path}: not an mfp_jax exported model (bad header)')
  (hlen,) = struct.unpack('<Q', blob[n:n + 8])
  try:
    info = json.loads(blob[n + 8:n + 8 + hlen].decode())
    body = blob[n + 8 + hlen:]
    want = info['payload_bytes'] + info['weights_bytes']
    if len(body) != want:
      raise ValueError(f'{len(body)} bytes after the header, expected {want} (truncated?)')
    if hashlib.sha256(body).hexdigest() != info['sha256']:
      raise ValueError('SHA-256 does not match (altered after export)')
  except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
    raise ArtifactError(f'{path}: invalid exported model: {e}') from e
  program = _read_npz(io.BytesIO(body[info['payload_bytes']:]), path)
  try:
    exported = jax.export.deserialize(bytearray(body[:info['payload_bytes']]))
  except Exception as e:  # a payload that passes the checksum but not the deserializer
    raise ArtifactError(f'{path}: cannot deserialize the exported function: {e}') from e
  return ExportedModel(exported, program, chunk_size=chunk_size, check_finite=check_finite)
