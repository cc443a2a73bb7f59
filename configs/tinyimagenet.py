"""Tiny-ImageNet-200, VGG16, 1-bit hidden weights, MFP neurons, T = 4 (paper Table I: 55.6%).

Data: the standard folder layout (`wnids.txt`, `train/<wnid>/images/*.JPEG`, `val/images`,
`val/val_annotations.txt`) under `data_dir` (default ~/data, which holds tiny-imagenet-200/). Get it once:

  wget http://cs231n.stanford.edu/tiny-imagenet-200.zip && unzip -d ~/data tiny-imagenet-200.zip

Train:

  python train.py --config configs/tinyimagenet.py --workdir runs/tinyimagenet

The optimizer settings are the Q-SNN script defaults (paper_recipe.py); the paper does not give
separate Tiny-ImageNet settings.
"""

from configs import paper_recipe


def get_config():
  return paper_recipe.recipe_config(
      'vgg16', 4, 'tinyimagenet',
      data_dir='~/data')  # holds tiny-imagenet-200/
