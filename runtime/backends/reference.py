"""PyTorch reference backend: the graphs as ``torch.export`` programs (``.pt2``).

It needs no family code at load time (the exported program carries the graph and weights), so a
bundle is self-contained on every backend. It is the baseline the other backends are checked
against and the way to debug a bundle in Python.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bundle import GraphEntry, StreamingGraph
from edgeseq.registry import register_backend
from edgeseq.runtime.backends.base import Backend, LoadedModel, shared_state_specs


@register_backend("torch")
class TorchBackend(Backend):
    format = "pt2"

    def lower(self, graphs: dict[str, StreamingGraph], out: Path, dtype: str) -> dict[str, str]:
        import torch

        from edgeseq.convert.export import export_graph, half_precision

        if dtype == "fp16":
            graphs = half_precision(graphs)
        files = {}
        for name, g in graphs.items():
            ep = export_graph(g, dynamic_batch=True)
            fname = f"{name}.pt2"
            torch.export.save(ep, str(out / fname))
            files[name] = fname
        return files

    def load(self, root: Path, entries: dict[str, GraphEntry], threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> LoadedModel:
        import torch

        if threads:
            torch.set_num_threads(threads)
        runners = {}
        for name, e in entries.items():
            ep = torch.export.load(str(root / e.files[self.format]))
            runners[name] = _TorchRunner(e, ep.module())
        return _TorchModel(runners, shared_state_specs(entries))


class _TorchRunner:
    def __init__(self, entry: GraphEntry, module: Any):
        self.entry = entry
        self.module = module

    def run(self, inputs: dict[str, np.ndarray], state: list) -> tuple[dict[str, np.ndarray], list]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self.entry.inputs]
        with torch.no_grad():
            out = self.module(*args, *state)
        n = len(self.entry.outputs)
        return ({s.name: o.numpy() for s, o in zip(self.entry.outputs, out[:n])}, list(out[n:]))


class _TorchModel(LoadedModel):
    def from_numpy(self, arrays: list[np.ndarray]) -> list:
        import torch

        return [torch.from_numpy(np.array(a, copy=True)) for a in arrays]

    def to_numpy(self, state: list) -> list[np.ndarray]:
        return [t.detach().numpy().copy() for t in state]
