"""Train an MFP-QSNN on your own numpy arrays, with checkpoints, resume and serial inference.

  python examples/custom_data.py --workdir /tmp/bars

The data set is a toy one made here (8x8 images of a horizontal or a vertical bar, noisy);
swap in your own arrays. Registering it makes it selectable by name from any config
(``--config.data.name=bars``); ``train_and_evaluate(config, workdir, dataset=ds)`` takes a
``Dataset`` object directly instead.
"""

import argparse

import numpy as np

import mfp_jax as mj
from mfp_jax import config_lib, inference, models, train_lib


def load_bars(n_train: int = 512, n_test: int = 128, seed: int = 0) -> mj.Dataset:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n_train + n_test)
  images = rng.normal(0, 0.3, (n_train + n_test, 8, 8, 1)).astype(np.float32)
  pos = rng.integers(1, 7, n_train + n_test)
  for i, (y, p) in enumerate(zip(labels, pos)):
    images[i, p, :, 0] += y        # class 1: a horizontal bar
    images[i, :, p, 0] += 1 - y    # class 0: a vertical bar
  split = lambda a, b: mj.ArraySource(images[a:b], labels[a:b].astype(np.int32))
  return mj.Dataset('bars', 2, split(0, n_train), split(n_train, None), (8, 8, 1),
                    preprocess=lambda x: x)


mj.register_dataset('bars', load_bars, spec=mj.DataSpec((8, 8, 1), 2))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  args = p.parse_args()
  c = config_lib.base_config()
  c.num_epochs, c.progress = 3, False
  c.model = config_lib.model_config('digits_cnn', T=4, channels=(8, 16))
  c.data = config_lib.data_config('bars', batch_size=32, n_train=512)
  c.optim = config_lib.optim_config('adamw', learning_rate=1e-2)
  result = train_lib.train_and_evaluate(c, args.workdir)
  print(f'test accuracy {result.metrics["accuracy"]:.4f}')
  # The same network, run one time step at a time on integer spike counts.
  ds = load_bars()
  model = models.create_model(c.model, num_classes=ds.num_classes)
  variables = train_lib.eval_variables(result.state)  # the moving average, if kept
  x, _ = ds.test.get_batch(np.arange(len(ds.test)))
  parallel = inference.make_infer_fn(model, variables, input_shape=ds.input_shape)(x)
  serial = inference.make_infer_fn(model, variables, mode='serial', input_shape=ds.input_shape)(x)
  agree = float(np.mean(np.argmax(parallel, -1) == np.argmax(serial, -1)))
  print(f'serial predictions equal parallel on {agree:.2%} of {len(x)} test images')


if __name__ == '__main__':
  main()
