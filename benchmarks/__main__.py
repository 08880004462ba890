"""``python -m benchmarks [NAME] [--quick] [--device cpu|cuda] [--output DIR]`` from the
repository root: the same entry point as ``aimkp bench`` (:mod:`runner`)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from runner import main  # noqa: E402

raise SystemExit(main())
