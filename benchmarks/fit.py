"""Power-law fits of benchmark series: ``y = c * x ** k`` by least squares in log-log space."""

from __future__ import annotations

import math
from collections.abc import Sequence


def loglog_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float | None]:
    """Fit ``log y = log c + k log x`` over the points with x, y > 0.

    Returns ``{"exponent": k, "coef": c, "r2": R^2}`` (R^2 of the log-log line; 1.0 when the
    points lie on it). With fewer than two distinct positive x values every field is None.
    """
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({lx for lx, _ in pts}) < 2:
        return {"exponent": None, "coef": None, "r2": None}
    n = len(pts)
    mx = sum(lx for lx, _ in pts) / n
    my = sum(ly for _, ly in pts) / n
    sxx = sum((lx - mx) ** 2 for lx, _ in pts)
    sxy = sum((lx - mx) * (ly - my) for lx, ly in pts)
    k = sxy / sxx
    b = my - k * mx
    ss_res = sum((ly - (b + k * lx)) ** 2 for lx, ly in pts)
    ss_tot = sum((ly - my) ** 2 for _, ly in pts)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"exponent": k, "coef": math.exp(b), "r2": r2}
