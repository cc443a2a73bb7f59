"""Experiment configs: one ``get_config()`` per file, for ``train.py --config configs/<name>.py``.

A package so that a config can import a shared recipe (``from configs import paper_recipe``);
``train.py`` and ``eval.py`` live in the repository root, which is on ``sys.path`` when they run.
"""
