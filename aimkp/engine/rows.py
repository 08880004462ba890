"""Row layout of the engine: which row of the batch each token of a hooked call belongs to.

A hooked call sees tokens of shape ``lead`` (the output's shape without its feature dims). Rows are
found, in this order:

1. ``module_rows[name]`` (cu_seqlens over that module's flattened tokens; the entry whose key is
   the module's name or a dotted prefix of it), for modules whose tokens are neither padded nor
   packed rows (e.g. Qwen2-VL's vision merger sees all images' patches flattened);
2. packed: ``lead`` is ``[1, total_T]`` or ``[total_T]`` with ``total_T == cu_seqlens[-1]``;
3. padded: ``lead[0] == B`` (row = batch index; one image per row for a projector);

otherwise a ValueError names the module and its shapes.

Example (B = 2, packed rows of 2 and 3 tokens)::

    layout = RowLayout()
    layout.update(cu_seqlens=torch.tensor([0, 2, 5]))
    layout.start(leads=[(1, 5)])
    layout.of("lm_head", "Linear", (1, 5), "cpu")
    # -> rows [0, 0, 1, 1, 1], offsets [0, 2, 5], max_len 3
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

__all__ = ["RowLayout", "RowsOfCall", "as_cu_seqlens", "offsets_of"]


def as_cu_seqlens(x: Any, what: str) -> torch.Tensor:
    """``x`` as a CPU int64 ``[B + 1]`` tensor starting at 0, non-decreasing (ValueError if not)."""
    cu = torch.as_tensor(x).to(torch.int64).reshape(-1)
    if cu.numel() < 1 or int(cu[0]) != 0:
        raise ValueError(f"{what} must be a 1-D int tensor [B + 1] starting at 0, got {x!r}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{what} must be non-decreasing, got {cu.tolist()}")
    return cu.cpu()


def offsets_of(rows: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, int]:
    """``(offsets [B + 1] int64, longest row)`` of sorted row ids ``rows [n]``."""
    counts = torch.bincount(rows, minlength=num_rows)
    offsets = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, (int(counts.max()) if num_rows else 0)


class RowsOfCall(NamedTuple):
    """Rows of one call's tokens: ``rows [n]`` (sorted), ``offsets [B + 1]``, ``max_len``."""

    rows: torch.Tensor
    offsets: torch.Tensor
    max_len: int


class RowLayout:
    """Maps a module's token axis to the batch's rows (see the module docstring).

    ``update`` sets the layout and may change it until ``start`` fixes B (at the first output
    gradient); a layout without any setting is padded rows, B inferred from the shapes.
    """

    def __init__(self) -> None:
        self.cu: torch.Tensor | None = None
        self.requested_rows: int | None = None
        self.module_rows: dict[str, torch.Tensor] = {}
        #: B, fixed by ``start`` (None before)
        self.num_rows: int | None = None
        self._cache: dict[tuple, RowsOfCall] = {}

    @property
    def started(self) -> bool:
        return self.num_rows is not None

    def update(
        self,
        cu_seqlens: torch.Tensor | None = None,
        num_rows: int | None = None,
        module_rows: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Set what is given: ``cu_seqlens [B + 1]`` (row offsets of a packed ``[1, total_T, ...]``
        batch), ``num_rows`` (B, when neither given by ``cu_seqlens`` nor inferable from the
        shapes), ``module_rows`` entries (``{module name (or prefix): cu_seqlens}`` for modules
        with their own layout)."""
        if self.started:
            raise ValueError("set_rows must be called before the backward")
        if cu_seqlens is not None:
            self.cu = as_cu_seqlens(cu_seqlens, "cu_seqlens")
        if num_rows is not None:
            if int(num_rows) < 0:
                raise ValueError(f"num_rows must be >= 0, got {num_rows}")
            self.requested_rows = int(num_rows)
        if self.cu is not None and self.requested_rows is not None:
            if self.cu.numel() - 1 != self.requested_rows:
                raise ValueError(
                    f"cu_seqlens has {self.cu.numel() - 1} rows but num_rows={self.requested_rows}"
                )
        for k, v in (module_rows or {}).items():
            self.module_rows[k] = as_cu_seqlens(v, f"module_rows[{k!r}]")

    def start(self, leads: Iterable[tuple[int, ...]]) -> int:
        """Fix B from ``num_rows``, ``cu_seqlens`` or the calls' token shapes ``leads``."""
        B = self.requested_rows
        if B is None and self.cu is not None:
            B = self.cu.numel() - 1
        if B is None:
            leads = list(leads)
            leads3 = {lead[0] for lead in leads if len(lead) >= 2}
            leads2 = {lead[0] for lead in leads if len(lead) == 1}
            cands = leads3 or leads2
            if len(cands) != 1:
                raise ValueError(
                    "cannot infer the number of rows from the hooked layers' token shapes "
                    f"(leading dims seen: {sorted(leads3 | leads2)}); pass num_rows=B or cu_seqlens"
                )
            B = cands.pop()
        self.num_rows = B
        return B

    def module_key(self, name: str) -> str | None:
        """The ``module_rows`` key that applies to module ``name`` (itself or a dotted prefix)."""
        return next((k for k in self.module_rows if name == k or name.startswith(k + ".")), None)

    def of(self, name: str, kind: str, lead: tuple[int, ...], device: Any) -> RowsOfCall:
        """Rows of one call's ``lead`` tokens of module ``name`` (type name ``kind``); cached per
        token shape and ``module_rows`` entry, since most hooked layers share one layout."""
        key = (self.module_key(name), lead, str(device))
        hit = self._cache.get(key)
        if hit is None:
            rows = self._row_ids(name, kind, lead, torch.device(device))
            assert self.num_rows is not None  # start() fixed B before any call is hooked
            hit = self._cache[key] = RowsOfCall(rows, *offsets_of(rows, self.num_rows))
        return hit

    def _row_ids(
        self, name: str, kind: str, lead: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        B = self.num_rows
        n = math.prod(lead)
        cu = self._own_cu(name, lead, n)
        if cu is None and self.cu is not None and n == int(self.cu[-1]):
            if len(lead) == 1 or lead[0] == 1:
                cu = self.cu
        if cu is not None:
            assert B is not None  # start() fixed B before any call is hooked
            counts = (cu[1:] - cu[:-1]).to(device)
            return torch.repeat_interleave(torch.arange(B, device=device), counts, output_size=n)
        if len(lead) >= 1 and lead[0] == B:
            return (
                torch.arange(B, device=device).repeat_interleave(n // B)
                if B
                else torch.zeros(0, dtype=torch.int64, device=device)
            )
        layout = f"packed total_T={int(self.cu[-1])}" if self.cu is not None else "padded"
        raise ValueError(
            f"module '{name}' ({kind}) saw tokens of shape {list(lead)} "
            f"that map to no rows of the batch (B={B}, {layout}); pass "
            f"module_rows={{'{name}': cu_seqlens}} for it. (Tokens shared by several rows, "
            "e.g. one projector call per sample whose output several copies reuse, cannot be "
            "split by row: run such a module once per row.)"
        )

    def _own_cu(self, name: str, lead: tuple[int, ...], n: int) -> torch.Tensor | None:
        k = self.module_key(name)
        if k is None:
            return None
        v = self.module_rows[k]
        if int(v[-1]) != n:
            raise ValueError(
                f"module_rows[{k!r}] covers {int(v[-1])} tokens but module '{name}' "
                f"saw {n} (token shape {list(lead)})"
            )
        if v.numel() - 1 != self.num_rows:
            raise ValueError(
                f"module_rows[{k!r}] has {v.numel() - 1} rows, expected {self.num_rows}"
            )
        return v
