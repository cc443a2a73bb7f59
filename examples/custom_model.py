"""Bring your own model and neuron: register both, train, run exact serial inference, export.

  python examples/custom_model.py --workdir /tmp/custom

* ``AdaptiveThreshold`` is a new MFP-type neuron with a learnable threshold per time step. As a
  :class:`mfp_jax.LinearNeuron` it only says which parameters it has and how they make the
  effective ``M``: the parallel training form, the exact serial scan, Eq. 9 and the folded
  integer thresholds all follow.
* ``WideResNet`` is a new model assembled from the library's blocks; folding walks those blocks,
  so serial inference and export need no code of ours.
"""

import argparse

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import mfp_jax as mj
from mfp_jax import config_lib, deploy, inference, layers, models, train_lib


class AdaptiveThreshold(mj.LinearNeuron):
  """MFP neuron whose threshold ``vth * exp(g_t)`` is learned for every step ``t``."""

  def init(self, module, t, spec):
    return {'M': module.param('M', layers.decaying_m_init(spec.tau), (t, t)),
            'log_gain': module.param('log_gain', nn.initializers.zeros, (t,))}

  def mixing(self, params, spec):
    # (M X)[t] >= vth_t  <=>  (M X)[t] / vth_t >= 1: the thresholds fold into M's rows.
    return params['M'] / (spec.vth * jnp.exp(params['log_gain']))[:, None], 1.0


mj.register_neuron('adaptive', AdaptiveThreshold())


@mj.register_model('wide_resnet')
class WideResNet(nn.Module):
  """Stem, one residual block per width (stride 2 after the first), pool, classifier."""
  num_classes: int
  T: int = 4
  widths: tuple = (16, 32)
  neuron: layers.NeuronSpec = layers.NeuronSpec(kind='adaptive')

  @nn.compact
  def __call__(self, x, *, train=False, anneal_t=None):
    h = models.Stem(self.widths[0], self.T, neuron=self.neuron)(x, train=train)
    for i, w in enumerate(self.widths):
      h = models.BasicBlock(w, 1 if i == 0 else 2, neuron=self.neuron)(
          h, train=train, anneal_t=anneal_t)
    return models.Classifier(self.num_classes)(h, anneal_t)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  args = p.parse_args()
  c = config_lib.base_config()
  c.num_epochs, c.stop_at_step, c.progress = 1, 12, False
  c.model = config_lib.model_config('wide_resnet', T=3)
  c.optim = config_lib.optim_config('adamw', learning_rate=3e-3)
  state = train_lib.train_and_evaluate(c, args.workdir).state
  model = models.create_model(c.model, num_classes=10)
  variables = train_lib.eval_variables(state)  # the moving average, when the run keeps one
  ds = mj.data.create_dataset(c.data)
  x = ds.preprocess(ds.test.get_batch(np.arange(256))[0])
  infer = lambda mode: inference.make_infer_fn(model, variables, mode=mode, with_spikes=True,
                                               input_shape=ds.input_shape)(x)
  (_, sp), (ls, ss) = infer('parallel'), infer('serial')
  equal = sum(int(np.sum(sp[k] == ss[k])) for k in sp)
  total = sum(int(np.size(sp[k])) for k in sp)
  print(f'serial spikes equal parallel: {equal} of {total} in {len(sp)} layers')
  path = f'{args.workdir}/model.mfpx'
  deploy.export_serial(inference.build_program(model, variables, ds.input_shape), path)
  exported = deploy.load_exported(path)(x)
  print(f'exported model: max |logit difference| {float(np.max(np.abs(exported - ls))):.2e}')


if __name__ == '__main__':
  main()
