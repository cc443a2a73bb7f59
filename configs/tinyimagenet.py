"""Tiny-ImageNet-200, VGG16, 1-bit hidden weights, MFP neurons, T = 4 (paper Table I: 55.6%).

Data: the standard folder layout (`wnids.txt`, `train/<wnid>/images/*.JPEG`, `val/images`,
`val/val_annotations.txt`) under `data_dir` (default ~/data, which holds tiny-imagenet-200/). Get it once:

  wget http://cs231n.stanford.edu/tiny-imagenet-200.zip && unzip -d ~/data tiny-imagenet-200.zip

Train:

  python train.py --config configs/tinyimagenet.py --workdir runs/tinyimagenet

The optimizer settings are the Q-SNN script defaults (paper_recipe.py); the paper does not give
separate Tiny-ImageNet settings.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_recipe  # noqa: E402


def get_config():
  c = paper_recipe.recipe_config()
  c.model.name = 'vgg16'
  c.model.T = 4
  c.data.name = 'tinyimagenet'
  c.data.data_dir = '~/data'  # holds tiny-imagenet-200/
  return c
