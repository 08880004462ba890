"""Tied weights: one trainable parameter owned by several hooked modules (an LM head sharing the
input embedding's table, the usual ``tie_word_embeddings=True``).

Each owner's rule gives the per-row gradient of the parameter as a sum of rank-1 token terms,
``G^m_r = sum_{t in r} u_t v_t^T`` (``Rule.factors``): for ``nn.Linear.weight`` ``u = g_t``
(``[d_out]``) and ``v = a_t``; for an embedding table ``u = e_{id_t}`` (a one-hot, given as the id)
and ``v = g_t``. The row's gradient is the sum over owners, so its squared norm is the owners' own
squared norms (what their rules already return) plus twice every cross term, and a pair's dot gains
both orientations::

    ||sum_m G^m_r||^2  = sum_m ||G^m_r||^2 + 2 sum_{m < n} <G^m_r, G^n_r>
    <G_i, G_j>         = sum_m <G^m_i, G^m_j> + sum_{m < n} (<G^m_i, G^n_j> + <G^n_i, G^m_j>)

with the cross term in ghost form, no gradient formed:
``<G^m_i, G^n_j> = sum_{t in i, s in j} (u_t . u_s)(v_t . v_s)``; ``u_t . u_s`` is a dot product
of two dense vectors, a gather ``u_s[id_t]`` when one side is an id, ``[id_t == id_s]`` when both.

Cost: the tokens of each owner (for a tied LM head its inputs and logit gradients ``[N, V]``) are
kept from the moment its gradient arrives until the last owner's does (the input embedding, at
the end of the backward); the cross term itself is batched fp32 matmuls / gathers per row, in
chunks of bounded size. Only the tied parameter pays this; every other layer is as before.

Tiny example (embedding table ``W [3, 2]`` tied to a head ``y = W a``; one row of one token)::

    embedding: id 2, output gradient h = [1, 1]          -> G^emb  = e_2 h^T
               (rows [0, 0], [0, 0], [1, 1]; ||G^emb||^2 = 2)
    head:      input a = [0, 1], output gradient g = [1, 0, 3] -> G^head = g a^T
               (rows [0, 1], [0, 0], [0, 3]; ||G^head||^2 = 10)
    cross:     (u_emb . u_head)(v_emb . v_head) = g[id] (h . a) = 3 * 1 = 3
    ||G||^2 = 2 + 10 + 2 * 3 = 18; the summed matrix (rows [0, 1], [0, 0], [1, 4]) gives
    1 + 1 + 16 = 18 as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from aimkp.engine.registry import Tokens

__all__ = ["TiedGroup", "cross_terms", "factor_cross", "tied_groups"]

# Bound on the fp32 elements of one chunk's [Q, T_x, T_y] / [Q, T_y, D] intermediates.
_TILE_ELEMS = 1 << 24


def _pad(tok: Tokens, x: torch.Tensor) -> torch.Tensor:
    """Per-token ``x`` to ``[B, T, ...]``: ids stay int64 (padding 0), vectors go to fp32 (0)."""
    return tok.padded(x, dtype=torch.int64 if x.dim() == 1 else torch.float32)


def factor_cross(
    tok_x: Tokens,
    fx: tuple[torch.Tensor, torch.Tensor],
    tok_y: Tokens,
    fy: tuple[torch.Tensor, torch.Tensor],
    q_pairs: torch.Tensor,
) -> torch.Tensor:
    """``<G^x_i, G^y_j>`` for every ``(i, j)`` in ``q_pairs [Q, 2]``, fp32 ``[Q]``.

    ``fx = (u [N_x] ids or [N_x, D0], v [N_x, D1])`` in ``tok_x``'s token order (and ``fy`` in
    ``tok_y``'s); tokens without a gradient carry ``v = 0``. The two modules may see different
    tokens of a row (e.g. an embedding over the kept positions, the head over all of them).
    """
    (ux, vx), (uy, vy) = fx, fy
    Q = q_pairs.shape[0]
    out = torch.zeros(Q, dtype=torch.float32, device=vx.device)
    if Q == 0 or vx.shape[0] == 0 or vy.shape[0] == 0:
        return out
    ux_p, vx_p = _pad(tok_x, ux), _pad(tok_x, vx.flatten(1))
    uy_p, vy_p = _pad(tok_y, uy), _pad(tok_y, vy.flatten(1))
    uy_p, vy_p = uy_p.to(vx_p.device), vy_p.to(vx_p.device)
    Tx, Ty = vx_p.shape[1], vy_p.shape[1]
    wide = max(ux_p.shape[-1] if ux.dim() > 1 else 0, uy_p.shape[-1] if uy.dim() > 1 else 0)
    per_q = Tx * Ty + max(Tx, Ty) * wide
    chunk = max(1, _TILE_ELEMS // max(1, per_q))
    for q0 in range(0, Q, chunk):
        i, j = q_pairs[q0 : q0 + chunk, 0], q_pairs[q0 : q0 + chunk, 1]
        kv = torch.bmm(vx_p[i], vy_p[j].transpose(1, 2))  # [q, Tx, Ty]
        if ux.dim() == 1 and uy.dim() == 1:
            ku = (ux_p[i][:, :, None] == uy_p[j][:, None, :]).to(torch.float32)
        elif ux.dim() == 1:  # u_y[s][id_t]
            idx = ux_p[i][:, None, :].expand(-1, Ty, -1)  # [q, Ty, Tx]
            ku = torch.gather(uy_p[j], 2, idx).transpose(1, 2)
        elif uy.dim() == 1:  # u_x[t][id_s]
            idx = uy_p[j][:, None, :].expand(-1, Tx, -1)  # [q, Tx, Ty]
            ku = torch.gather(ux_p[i], 2, idx)
        else:
            ku = torch.bmm(ux_p[i], uy_p[j].transpose(1, 2))
        out[q0 : q0 + chunk] = (ku * kv).sum((1, 2))
    return out


@dataclass
class TiedGroup:
    """One trainable parameter owned by several hooked modules.

    ``members``: ``(owner state, parameter name)`` per owner; ``factors`` collects, per owner
    processed in this backward, its tokens and ``Rule.factors`` until all owners are in."""

    label: str
    members: list[tuple[Any, str]]
    factors: dict[str, tuple[Tokens, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )


def tied_groups(states: list) -> list[TiedGroup]:
    """Group the trainable parameters owned by several hooked modules (``ModState`` list); each
    owner's rule must give the parameter's per-row ``factors``. Each owner's ``tied`` list gets
    ``(group index, parameter name)``."""
    owners: dict[int, list[tuple[Any, str]]] = {}
    for st in states:
        for n, p in st.module.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append((st, n))
    groups: list[TiedGroup] = []
    for members in owners.values():
        if len(members) < 2:
            continue
        names = [f"{st.name}.{n}" for st, n in members]
        for st, n in members:
            if n not in st.rule.factor_params:
                raise ValueError(
                    f"trainable parameter '{st.name}.{n}' is shared by {names} (tied "
                    f"weights) but rule {type(st.rule).__name__} cannot give its per-row "
                    "factors (Rule.factor_params); untie or freeze it"
                )
        for st, n in members:
            st.tied.append((len(groups), n))
        groups.append(TiedGroup(" = ".join(names), members))
    return groups


def cross_terms(
    grp: TiedGroup, num_rows: int, pairs: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the cross terms between the owners of ``grp`` add to ``(sq [B], dots [P])``."""
    rows = torch.arange(num_rows, device=device)
    q = [torch.stack([rows, rows], 1)]
    if pairs is not None:
        q += [pairs.to(device), pairs.to(device).flip(1)]
    q_pairs = torch.cat(q)
    owners = list(grp.factors.values())
    sq = torch.zeros(num_rows, dtype=torch.float32, device=device)
    P = 0 if pairs is None else pairs.shape[0]
    dots = None if pairs is None else torch.zeros(P, dtype=torch.float32, device=device)
    for m in range(len(owners)):
        for n in range(m + 1, len(owners)):
            (tx, fx), (ty, fy) = owners[m], owners[n]
            c = factor_cross(tx, fx, ty, fy, q_pairs.to(tx.g.device)).to(device)
            sq += 2 * c[:num_rows]
            if dots is not None:
                dots += c[num_rows : num_rows + P] + c[num_rows + P :]
    return sq, dots
