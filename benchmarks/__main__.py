"""``python -m benchmarks [NAME] [--quick] [--device cpu|cuda] [--output DIR]`` from the
repository root: the same entry point as ``aimkp bench`` (:mod:`runner`)."""

from benchmarks.runner import main

raise SystemExit(main())
