"""The benchmarks of a source checkout (``python -m benchmarks``, ``aimkp bench``). Each script
runs as a module from the repository root (``python -m benchmarks.bench_train_step``) and imports
its siblings absolutely (``from benchmarks.common import ...``).

A regular package (this file), not a namespace one: opacus installs a top-level ``benchmarks``
package of its own into site-packages, which would otherwise shadow this folder for
``python -m benchmarks``.
"""
