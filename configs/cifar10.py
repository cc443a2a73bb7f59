"""CIFAR10, ResNet19, 1-bit hidden weights, MFP neurons, T = 4 (paper Table I: 95.9%).

Data: tensorflow-datasets' prepared `cifar10` (array_record) under `data_dir`
(default ~/tensorflow_datasets). Prepare once (needs TensorFlow, ~170 MB download):

  pip install -e ".[prepare]"
  python -m mfp_jax.data_sources prepare cifar10 --data_dir ~/tensorflow_datasets

Train (300 epochs of 781 steps; a GPU/TPU job, not a CPU one):

  python train.py --config configs/cifar10.py --workdir runs/cifar10
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_recipe  # noqa: E402


def get_config():
  c = paper_recipe.recipe_config()
  c.model.name = 'resnet19'
  c.model.T = 4
  c.data.name = 'cifar10'
  c.data.data_dir = '~/tensorflow_datasets'
  c.data.cutout = 16  # Cutout (Q-SNN build_cifar(cutout=True)); 16 px is DeVries & Taylor's CIFAR10 size
  return c
