"""Per-parameter learning-rate multipliers (config.optim.lr_mults): by hand, in a step, in
the config checks, and in the resume fingerprint."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_digits_config
from mfp_jax import config_lib
from mfp_jax import data as data_lib
from mfp_jax import optim
from mfp_jax import train_lib

PARAMS = {'Stem_0': {'QConv_0': {'kernel': jnp.ones(3)}},
          'Block_0': {'QConv_0': {'kernel': jnp.ones(2)}, 'BatchNorm_0': {'scale': jnp.ones(2)}}}


def test_labels_take_the_first_matching_rule():
  rules = ((r'Block_\d+/QConv', 1.0), ('Stem', 0.25), ('', 0.1))
  labels = optim.lr_mult_labels(PARAMS, rules)
  assert labels == {'Stem_0': {'QConv_0': {'kernel': '0.25'}},
                    'Block_0': {'QConv_0': {'kernel': '1.0'}, 'BatchNorm_0': {'scale': '0.1'}}}
  assert optim.unmatched_lr_mults(PARAMS, (('Stem', 1.0), ('Stme', 2.0))) == ['Stme']


def test_each_listed_name_is_the_path_one_leaf_is_labelled_by():
  # param_names (the typo check, the error's example) and the labels must see one spelling.
  names = optim.param_names(PARAMS)
  assert sorted(names) == ['Block_0/BatchNorm_0/scale', 'Block_0/QConv_0/kernel',
                           'Stem_0/QConv_0/kernel']
  for name in names:
    labels = jax.tree.leaves(optim.lr_mult_labels(PARAMS, ((f'^{name}$', 2.0),)))
    assert sorted(labels) == ['1.0', '1.0', '2.0']


def test_plain_sgd_steps_scale_by_hand():
  # SGD, lr 1, no momentum: the update is -mult * g exactly.
  tx = optax.chain(optax.sgd(1.0), optim.scale_by_lr_mults((('Stem', 0.25), ('BatchNorm', 0.0))))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_array_equal(updates['Stem_0']['QConv_0']['kernel'], [-0.5] * 3)
  np.testing.assert_array_equal(updates['Block_0']['QConv_0']['kernel'], [-2.0] * 2)
  np.testing.assert_array_equal(updates['Block_0']['BatchNorm_0']['scale'], [0.0] * 2)


def test_a_zero_multiplier_freezes_those_parameters_in_a_train_step():
  # AdamW with weight decay: the multiplier scales the whole update, decay included.
  config = tiny_digits_config(**{'optim.name': 'adamw', 'optim.learning_rate': 1e-2,
                                 'optim.lr_mults': (('Stem_0/', 0.0),)})
  s = train_lib.setup(config, train_lib.create_mesh())
  state = s.init(jax.random.key(0))
  batch = next(data_lib.iterate_batches(s.dataset, 'train', batch_size=64))
  step = jax.jit(functools.partial(train_lib.train_step, model=s.model, tx=s.tx,
                                   loss_cfg=config.loss, skip_nonfinite=False))
  new = step(step(state, batch, jnp.float32(1.0))[0], batch, jnp.float32(1.0))[0]
  for name in state.params:
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                        state.params[name], new.params[name]))
    assert all(same) if name.startswith('Stem') else not any(same), name


@pytest.mark.parametrize('rules, match', [
    ((('St(em', 0.1),), r'config\.optim\.lr_mults = .*regex, multiplier >= 0'),
    ((('Stem', -1.0),), r'config\.optim\.lr_mults = .*regex, multiplier >= 0'),
    ((('Stem',),), r'config\.optim\.lr_mults = .*regex, multiplier >= 0'),
    ((('Stme', 0.1),), r"config\.optim\.lr_mults: \['Stme'\] match no parameter of DigitsNet"),
])
def test_bad_rules_are_one_line_config_errors(rules, match):
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    train_lib.setup(tiny_digits_config(**{'optim.lr_mults': rules}), train_lib.create_mesh())
  assert len(str(e.value).strip().splitlines()) <= 2  # 'invalid config:' + the one problem


def _fingerprint(config):
  s = train_lib.setup(config, train_lib.create_mesh())
  return s.fingerprint


def test_old_fingerprints_without_the_new_fields_still_match():
  new = _fingerprint(tiny_digits_config())
  old = {**new, 'optim': {k: v for k, v in new['optim'].items()
                          if k not in ('lr_mults', 'ema_decay')},
         'model': {k: v for k, v in new['model'].items() if k != 'pool_padding'}}
  assert train_lib.fingerprint_changes(old, new) == []
  same = _fingerprint(tiny_digits_config(**{'model.pool_padding': 'SAME'}))
  assert train_lib.fingerprint_changes(old, same) == ["model.pool_padding: 'VALID' -> 'SAME'"]
  changed = _fingerprint(tiny_digits_config(**{'optim.lr_mults': (('Stem', 0.5),)}))
  assert train_lib.fingerprint_changes(old, changed) == [
      "optim.lr_mults: [] -> [['Stem', 0.5]]"]
