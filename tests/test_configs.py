"""Every shipped config builds, validates, and runs train.py for two steps on tiny data written
in its real on-disk format (so the paper configs stay runnable without the real data)."""

import importlib.util
import os

import pytest

import datagen
from helpers import ROOT, run_script
from mfp_jax import config_lib

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs'))
                 if f.endswith('.py') and f not in ('paper_recipe.py', '__init__.py'))


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_all_expected_configs_exist():
  assert set(CONFIGS) == {'digits', 'cifar10', 'cifar100', 'tinyimagenet', 'cifar10dvs',
                          'fashion_mnist', 'seq_fashion_mnist'}


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates_and_documents_its_data(name):
  c = load_config(name)
  config_lib.validate(c)
  if name != 'digits':
    assert c.data.data_dir
    doc = open(os.path.join(ROOT, 'configs', f'{name}.py')).read()
    assert 'train.py --config configs/' in doc and c.data.name in doc.lower().replace('-', '')


PAPER = {'cifar10': ('resnet19', 4), 'cifar100': ('resnet19', 4),
         'tinyimagenet': ('vgg16', 4), 'cifar10dvs': ('vggsnn', 10)}


@pytest.mark.parametrize('name', sorted(PAPER))
def test_paper_configs_follow_table_one_and_the_recipe(name):
  c = load_config(name)
  assert (c.model.name, c.model.T) == PAPER[name]
  assert c.model.quant.bits == 1 and c.model.edge_quant.bits == 8
  assert c.model.neuron.kind == 'mfp' and c.model.quant.estimator == 'annealed'
  assert (c.optim.name, c.optim.learning_rate, c.optim.momentum, c.optim.weight_decay) == (
      'sgd', 0.1, 0.9, 1e-4)
  assert (c.num_epochs, c.data.batch_size, c.loss.name, c.loss.fr_lambda) == (
      300, 64, 'per_step_ce', 5e-3)


def _write_data(name, root):
  if name in ('cifar10', 'cifar100'):
    datagen.write_tfds_cifar(root, name, n_train=8, n_test=4)
  elif name == 'tinyimagenet':
    datagen.write_tinyimagenet(root / 'tiny-imagenet-200', n_train=2, n_val=3)
  elif name in ('fashion_mnist', 'seq_fashion_mnist'):
    datagen.write_fashion_mnist(root, n_train=8, n_test=4)
  elif name == 'cifar10dvs':
    pytest.importorskip('dv_processing')
    datagen.write_cifar10dvs(root, per_class=10, n_events=200)  # 9:1 split per class


@pytest.mark.parametrize('name', CONFIGS)
def test_train_py_runs_two_steps(name, tmp_path):
  data = tmp_path / 'data'
  _write_data(name, data)
  args = ['train.py', '--config', f'configs/{name}.py', '--workdir', str(tmp_path / 'run'),
          '--config.stop_at_step=2', '--config.data.batch_size=2',
          '--config.data.eval_batch_size=2']
  if name != 'digits':
    args.append(f'--config.data.data_dir={data}')
  r = run_script(args, timeout=240)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'final test accuracy' in r.stdout
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '2')


@pytest.mark.parametrize('name', sorted(PAPER))
def test_missing_data_is_a_one_line_error(name, tmp_path):
  # Before any compilation, and without trying the network.
  r = run_script(['train.py', '--config', f'configs/{name}.py', '--workdir', str(tmp_path),
                  f'--config.data.data_dir={tmp_path / "nothing"}'], timeout=120)
  assert r.returncode == 2 and 'Traceback' not in r.stderr
  assert str(tmp_path / 'nothing') in r.stderr
