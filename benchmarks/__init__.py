"""The benchmarks of a source checkout (``python -m benchmarks``, ``aimkp bench``): scripts that
import their siblings by plain name (``common``, ``workload``) with this folder on ``sys.path``.

A regular package (this file), not a namespace one: opacus installs a top-level ``benchmarks``
package of its own into site-packages, which would otherwise shadow this folder for
``python -m benchmarks``.
"""
