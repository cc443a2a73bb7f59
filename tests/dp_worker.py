"""Subprocess worker: trains the tiny digits config for a few steps, dumps params and loss.

  python tests/dp_worker.py OUT.npz WORKDIR [key=value ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from helpers import tiny_digits_config  # noqa: E402


def main(out, workdir, *overrides):
  from mfp_jax import train_lib
  kw = {}
  for o in overrides:
    k, v = o.split('=')
    kw[k] = int(v) if v.lstrip('-').isdigit() else v
  result = train_lib.train_and_evaluate(tiny_digits_config(**kw), workdir)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(result.state.params))[0]
  arrays = {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}
  np.savez(out, loss=result.metrics['loss'], devices=jax.device_count(), **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
