"""A graph module as a pipeline of stages, so that repeated layers are exported once.

Exporting a graph costs CPU time in proportion to the operations traced with symbolic shapes
(docs/benchmarks.md: ~90% of ``edgeseq convert``'s lowering), and a Transformer is mostly the same
layer N times over other weights. A module that describes itself as stages (``stages()``) lets the
ONNX lowering trace the prologue, one layer and the epilogue, then stamp the layer's graph out
once per layer with that layer's weights (``runtime/backends/onnxruntime/stamp.py``) — what
CTranslate2's specs do by construction, reached here from the module's own code.

The module's ``forward`` runs the very same stages (``run_stages``), so the flat graph every other
backend exports, the PyTorch reference and the stamped ONNX graph compute one program.

Names in a stage list: ``arg{j}`` is the forward's j-th positional argument, ``out{j}`` its j-th
output; any other name is an intermediate value. Stages with the same ``template`` must be the
same code over modules with the same parameter names and shapes (a layer of a stack).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    template: str | None = None


def arg(j: int) -> str:
    return f"arg{j}"


def out(j: int) -> str:
    return f"out{j}"


def run_stages(stages: Sequence[Stage], args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Run the stages over the forward's arguments; the forward's outputs, in order."""
    env = stage_values(stages, args)
    return tuple(env[out(j)] for j in range(output_count(stages)))


def stage_values(stages: Sequence[Stage], args: Sequence[torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Every named value of a run of the stages (the exporter's examples for each stage)."""
    env: dict[str, torch.Tensor] = {arg(j): a for j, a in enumerate(args)}
    for st in stages:
        got = st.module(*[env[n] for n in st.inputs])
        if isinstance(got, torch.Tensor):
            got = (got,)
        if len(got) != len(st.outputs):
            raise ValueError(f"stage {type(st.module).__name__} gave {len(got)} outputs "
                             f"for {len(st.outputs)} names")
        env.update(zip(st.outputs, got))
    return env


def output_count(stages: Sequence[Stage]) -> int:
    names = {n for st in stages for n in st.outputs}
    n = 0
    while out(n) in names:
        n += 1
    return n


def stages_of(module: nn.Module) -> list[Stage] | None:
    """The module's stages, or None for a module exported whole."""
    fn = getattr(module, "stages", None)
    return fn() if callable(fn) else None


class Method(nn.Module):
    """A stage that runs ``owner.<name>(*inputs)``; the owner is a submodule, so the stage's
    weights carry the owner's parameter names."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self.owner = owner
        self.name = name

    def forward(self, *a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got = getattr(self.owner, self.name)(*a)
        return (got,) if isinstance(got, torch.Tensor) else tuple(got)


class LayerCall(nn.Module):
    """A stage for one layer of a stack: owns only that layer (the template's parameter names)
    and runs ``call(layer, *inputs)``, the stack's own way of calling a layer."""

    def __init__(self, layer: nn.Module, call: Callable[..., tuple[torch.Tensor, ...]]):
        super().__init__()
        self.layer = layer
        self.__dict__["call"] = call          # a bound method of the stack: not a submodule

    def forward(self, *a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got = self.call(self.layer, *a)
        return (got,) if isinstance(got, torch.Tensor) else tuple(got)


def stack_stages(owner: nn.Module, layers: Sequence[nn.Module], n_in: int, ctx: Sequence[str],
                 n_out: int, template: str) -> list[Stage]:
    """The common shape: ``owner.prologue(*args) -> (x, *ctx)``, then
    ``owner.layer_call(layer, x, *ctx) -> x`` per layer (one template), then
    ``owner.epilogue(x) -> outputs``."""
    ctx = tuple(ctx)
    stages = [Stage(Method(owner, "prologue"), tuple(arg(j) for j in range(n_in)), ("x0", *ctx))]
    for i, lay in enumerate(layers):
        stages.append(Stage(LayerCall(lay, owner.layer_call), (f"x{i}", *ctx), (f"x{i + 1}",),
                            template=template))
    stages.append(Stage(Method(owner, "epilogue"), (f"x{len(layers)}",),
                        tuple(out(j) for j in range(n_out))))
    return stages
