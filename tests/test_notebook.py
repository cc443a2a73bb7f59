"""notebooks/colab_tpu.ipynb is a valid notebook and everything it uses exists here.

It cannot run on CI (it needs a TPU and the network), so this checks what can rot: the JSON,
the scripts, modules and configs its commands name, the flags and config fields they pass,
the pip extras it installs, and that its Python cells parse.
"""

import ast
import json
import os
import re
import tomllib

import pytest

from helpers import ROOT

NOTEBOOK = os.path.join(ROOT, 'notebooks', 'colab_tpu.ipynb')


@pytest.fixture(scope='module')
def cells():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb['nbformat'] == 4 and nb['cells']
  for c in nb['cells']:
    assert c['cell_type'] in ('code', 'markdown') and isinstance(c['source'], list)
  return [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']


def _shell_lines(cells):
  return [line.strip()[1:] for cell in cells for line in cell.splitlines()
          if line.strip().startswith('!')]


def test_scripts_modules_and_configs_exist(cells):
  shell = _shell_lines(cells)
  scripts = [s for line in shell for s in re.findall(r'python (\S+\.py)', line)]
  modules = [m for line in shell for m in re.findall(r'python -m ([\w.]+)', line)]
  configs = [c for line in shell for c in re.findall(r'--config[= ](\S+\.py)', line)]
  assert {'train.py', 'eval.py'} <= set(scripts) and 'configs/cifar10.py' in configs
  for path in scripts + configs:
    assert os.path.isfile(os.path.join(ROOT, path)), path
  for mod in modules:
    assert os.path.isfile(os.path.join(ROOT, *mod.split('.')) + '.py'), mod


def _config_fields(path):
  """Every field of the config file at ``path`` (dotted names)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('nb_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return _flat(module.get_config())


def _flat(cfg, prefix=''):
  out = set()
  for k, v in cfg.items():
    out |= _flat(v, f'{prefix}{k}.') if hasattr(v, 'items') else {prefix + k}
  return out


def test_flags_and_config_fields_exist(cells):
  cli_src = open(os.path.join(ROOT, 'mfp_jax', 'cli.py')).read()
  for line in _shell_lines(cells):
    script = re.search(r'python (\S+\.py)', line)
    if not script:
      continue
    src = open(os.path.join(ROOT, script.group(1))).read() + cli_src
    config = re.search(r'--config[= ](\S+\.py)', line)
    fields = _config_fields(config.group(1)) if config else set()
    for field in re.findall(r'--config\.([\w.]+)=', line):
      assert field in fields, f'{script.group(1)}: unknown config field {field}'
    for flag in re.findall(r'--(\w+)', line):
      if flag != 'config':
        assert f"'{flag}'" in src, f'{script.group(1)} defines no flag --{flag}'


def test_data_prepare_command_matches_the_cli(cells):
  line = next(x for x in _shell_lines(cells) if 'mfp_jax.data_sources' in x)
  src = open(os.path.join(ROOT, 'mfp_jax', 'data_sources.py')).read()
  assert 'prepare cifar10 --data_dir' in line
  assert "argv[1] != 'prepare'" in src and "DEFINE_string('data_dir'" in src


def test_pip_extras_exist(cells):
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    extras = tomllib.load(f)['project'].get('optional-dependencies', {})
  used = [e for line in _shell_lines(cells) for e in re.findall(r'-e "\.\[(\w+)\]"', line)]
  assert used and all(e in extras for e in used), (used, sorted(extras))


def test_python_cells_parse(cells):
  for cell in cells:
    # Drop IPython shell and magic lines; what is left must be Python.
    py = '\n'.join('' if line.strip().startswith(('!', '%')) else line
                   for line in cell.splitlines())
    ast.parse(py)
