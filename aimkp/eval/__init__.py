"""Evaluation: prediction decoding (``predict``) and robustness reports (``robustness``).

Submodules are imported on use: ``from aimkp.eval.robustness import run_robustness`` needs
neither torch nor transformers.
"""
