"""The reference backend's run side: the ``.pt2`` programs as runners.

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

from edgeseq.bundle import BundleError, GraphEntry, Manifest, shared_state_specs
from edgeseq.trust import trusted_to_unpickle
from edgeseq.runtime.backends.base import LoadedModel
from edgeseq.runtime.backends.reference import TorchBackend


def load(root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
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
        path = root / e.files[TorchBackend.format]
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
