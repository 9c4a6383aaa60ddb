"""PyTorch reference backend: the graphs as ``torch.export`` programs (``.pt2``).

It needs no family code at load time (the exported program carries the graph and weights), so a
bundle is self-contained on every backend. It is the baseline the other backends are checked
against and the way to debug a bundle in Python.

``torch.export.load`` unpickles (the archive's weights and constants go through ``torch.load``,
which falls back to ``weights_only=False``), and the program's JSON can name any ``torch.*``
callable and sympy expressions that are ``eval``-ed: no format of a ``torch.export`` program is
safe to load from someone else. So this backend loads only ``.pt2`` files that this machine's
own ``edgeseq convert`` wrote (their hashes are in the manifest that convert recorded, see
``edgeseq.bundle.check_integrity``); any other bundle is refused before a byte is unpickled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bundle import (BundleError, GraphEntry, Manifest, StreamingGraph,
                            trusted_to_unpickle)
from edgeseq.registry import register_backend
from edgeseq.runtime.backends.base import (MB, Backend, LoadedModel, RuntimeMemory,
                                           shared_state_specs)


@register_backend("torch")
class TorchBackend(Backend):
    format = "pt2"
    aliases = ("reference", "pytorch")
    memory = RuntimeMemory(base=40 * MB, per_graph=8 * MB, activation_factor=2.0)

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

    def load(self, root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
             threads: int | None = None,
             prepack: frozenset[str] = frozenset()) -> LoadedModel:
        why = trusted_to_unpickle(root, manifest)
        if why:
            raise BundleError(
                f"{root}: --backend torch refused: its .pt2 programs load through pickle, which "
                f"can run code, and {why}; use --backend ort or executorch, or convert the "
                f"checkpoint on this machine with --format pt2")
        import torch

        if threads:
            torch.set_num_threads(threads)
        runners = {}
        for name, e in entries.items():
            path = root / e.files[self.format]
            try:
                ep = torch.export.load(str(path))
            except Exception as err:  # a torch archive raises many types, none names the file
                raise BundleError(f"{path}: not a loadable torch.export program "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
                                  ) from None
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
