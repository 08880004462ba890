"""Evaluation: prediction decoding (``predict``) and robustness reports."""
