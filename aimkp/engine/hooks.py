"""Hook registration of the engine: what each hooked module keeps per forward call.

A forward hook on every module that owns trainable parameters keeps the call's input ``a`` (its
rule's ``capture``) and puts a tensor hook on the output that receives ``g = dloss/doutput`` in
the backward; a post-accumulate-grad hook on each trainable parameter notes that the module's
parameters got a gradient (so a parameter used outside its module's forward is caught).

Activation checkpointing: non-reentrant (``use_reentrant=False``, transformers' default) works:
forwards re-run inside the backward are ignored, the first forward's inputs are used (they are
kept alive, so the hooked layers' inputs are not freed by checkpointing). Reentrant checkpointing
runs the first forward without grad, so the hooked layers' parameters get gradients without a
recorded call: that is reported as an error, never silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aimkp.engine.registry import Rule, get_rule

__all__ = ["Call", "HookSet", "ModState", "hooked_states"]


@dataclass
class Call:
    """One forward call of a hooked module: input ``a`` (what the rule captured), token shape
    ``lead``, and the output gradient ``g`` once the backward delivered it."""

    a: torch.Tensor
    lead: tuple[int, ...]
    g: torch.Tensor | None = None


@dataclass
class ModState:
    """A hooked module, its rule and its calls in the current forward / backward."""

    name: str
    module: nn.Module
    rule: Rule
    calls: list[Call] = field(default_factory=list)
    received: int = 0
    processed: bool = False
    touched: bool = False
    #: (index into the tied groups, parameter name) for each tied parameter the module owns
    tied: list[tuple[int, str]] = field(default_factory=list)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The module's own parameters that require grad."""
        return [(n, p) for n, p in self.module.named_parameters(recurse=False) if p.requires_grad]


def hooked_states(model: nn.Module) -> list[ModState]:
    """One :class:`ModState` per module owning trainable parameters (ValueError when a module
    has no rule or its rule does not cover one of them)."""
    states: list[ModState] = []
    for name, mod in model.named_modules():
        own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule = get_rule(mod)
        if rule is None:
            raise ValueError(
                f"module '{name}' ({type(mod).__name__}) owns trainable parameter(s) {own} "
                "but no per-sample gradient rule is registered for its type; register one "
                "with aimkp.engine.register_rule or freeze these parameters"
            )
        missing = [n for n in own if n not in rule.param_names]
        if missing:
            raise ValueError(
                f"module '{name}' ({type(mod).__name__}): rule {type(rule).__name__} covers "
                f"{list(rule.param_names)} but parameter(s) {missing} are trainable"
            )
        states.append(ModState(name or type(mod).__name__, mod, rule))
    if not states:
        raise ValueError("model has no trainable parameters (nothing requires grad)")
    return states


OnGrad = Callable[[ModState, Call, torch.Tensor], None]


class HookSet:
    """The hooks of one context: ``attach`` on entering, ``detach`` on leaving.

    ``on_grad(state, call, g)`` runs for each call's output gradient; ``backward_started()``
    tells whether the backward has begun (a forward after that is an error).
    """

    def __init__(
        self, states: list[ModState], on_grad: OnGrad, backward_started: Callable[[], bool]
    ) -> None:
        self.states = states
        self.on_grad = on_grad
        self.backward_started = backward_started
        self.handles: list[Any] = []

    def attach(self) -> None:
        for st in self.states:
            h = st.module.register_forward_hook(self._forward_hook(st), with_kwargs=True)
            self.handles.append(h)
            for _, p in st.trainable():
                self.handles.append(p.register_post_accumulate_grad_hook(_toucher(st)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _forward_hook(self, st: ModState):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            output = st.rule.output_tensor(module, output)
            if not isinstance(output, torch.Tensor):
                raise ValueError(
                    f"module '{st.name}' ({type(module).__name__}) returned "
                    f"{type(output).__name__}, not a tensor: its rule cannot see the output "
                    "gradient"
                )
            if not output.requires_grad:
                return
            if torch._C._current_graph_task_id() != -1:
                # a forward re-run inside the backward: non-reentrant activation checkpointing
                # recomputing saved tensors. The first forward's call (same input, same RNG
                # state) already holds what the rule needs and its output gets the gradient.
                return
            if self.backward_started():
                raise ValueError(
                    f"module '{st.name}' ran a forward after the backward started: run exactly one "
                    "forward + backward inside per_sample_grad_gram"
                )
            a = st.rule.capture(module, st.rule.bind(module, args, kwargs), output)
            nf = st.rule.out_feature_dims(module)
            call = Call(a, tuple(output.shape[: output.dim() - nf]))
            st.calls.append(call)
            output.register_hook(lambda g, st=st, call=call: self.on_grad(st, call, g))

        return hook


def _toucher(st: ModState) -> Callable[[torch.Tensor], None]:
    def touch(_p: torch.Tensor) -> None:
        st.touched = True

    return touch
