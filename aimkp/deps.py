"""Optional dependencies, checked before any work: a command that would need one at its end
(a plot after hours of decoding, a reporter after the first epoch) names it at its start.

>>> require("matplotlib", "--no-plot", purpose="the robustness plot")   # before decoding

:func:`require` raises :class:`~aimkp.errors.UsageError` (one line, exit 2) naming the package,
what needs it, how to install it and the flag that does without it. Only the presence of the
package is checked (``importlib.util.find_spec``): importing matplotlib or wandb costs seconds
that a command which fails early should not spend.
"""

from __future__ import annotations

import importlib.util

from aimkp.errors import UsageError

#: the pip extra of aimkp that installs each optional package (None: no extra of its own)
EXTRAS: dict[str, str | None] = {
    "matplotlib": "bench",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
}

__all__ = ["EXTRAS", "installed", "require"]


def installed(module: str) -> bool:
    """True when ``module`` can be imported (its top-level package is installed)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or ``module.__spec__`` unset
        return False


def require(module: str, without: str | None, *, purpose: str) -> None:
    """UsageError unless ``module`` is installed; ``without``: the option that does not need it
    (``--no-plot``), named in the message; ``purpose``: what needs it."""
    if installed(module):
        return
    extra = EXTRAS.get(module)
    how = f"pip install {module}" + (f" (or pip install 'aimkp[{extra}]')" if extra else "")
    alt = f"; or pass {without}" if without else ""
    raise UsageError(f"{purpose} needs the {module} package, which is not installed: {how}{alt}")
