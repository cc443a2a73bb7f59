"""Shared by the eval/inference/accounting tests: one tiny trained digits run per session,
and random but nontrivial variables for untrained models."""

import atexit
import functools
import shutil
import tempfile

import jax
import numpy as np


@functools.lru_cache(maxsize=None)
def trained_digits():
  """``(config, workdir, variables)`` of a tiny digits net trained for 2 epochs (~5-15 s).

  Cached for the whole pytest process, so every test module reuses the same run.
  """
  from helpers import tiny_digits_config
  from mfp_jax import train_lib
  workdir = tempfile.mkdtemp(prefix='mfp_eval_test_')
  atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  config = tiny_digits_config()
  state = train_lib.train_and_evaluate(config, workdir).state
  return config, workdir, {'params': state.params, 'batch_stats': state.batch_stats}


def random_variables(model, input_shape, seed=0):
  """Variables of ``model`` drawn with numpy: nontrivial norm statistics and affine, ``M``
  near its decaying init with noise (negative diagonals possible). A fresh init has mean 0,
  var 1, scale 1, bias 0 -- too easy a test of the folding -- and compiling a Flax init takes
  seconds on a busy CPU; shapes come from ``jax.eval_shape`` instead."""
  from mfp_jax import models
  abstract = jax.eval_shape(lambda: models.init_variables(model, input_shape,
                                                          jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name, shape = path[-1].key, a.shape
    noise = rng.standard_normal(shape).astype(np.float32)
    if name == 'kernel':
      return noise * np.sqrt(2.0 / np.prod(shape[:-1]))
    if name == 'var':
      return (0.5 + rng.uniform(size=shape)).astype(np.float32)
    if name == 'mean':
      return 0.3 * noise
    if name == 'scale':
      return 1.0 + 0.3 * noise
    if name == 'bias':
      return 0.5 + 0.3 * noise
    if name == 'M':
      lag = np.arange(shape[0])[:, None] - np.arange(shape[0])[None, :]
      return np.tril(0.5 ** np.maximum(lag, 0) + 0.2 * noise).astype(np.float32)
    if name == 'tau':
      return 1.0 + 0.2 * noise
    raise ValueError(f'no rule for variable {name}')

  return jax.tree_util.tree_map_with_path(draw, abstract)
