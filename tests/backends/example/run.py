"""The example backend's runners: one ``ReferenceEvaluator`` per graph, state as numpy arrays."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bundle import GraphEntry, shared_state_specs
from edgeseq.runtime.backends.base import LoadedModel, fed_length, static_traces


def load(root: Path, entries: dict[str, GraphEntry], fmt: str) -> LoadedModel:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnx.reference import ReferenceEvaluator

    runners = {}
    for name, e in entries.items():
        model = onnx.load(str(root / e.files[fmt]), load_external_data=False)
        # onnx refuses external-data paths that leave ``root``
        load_external_data_for_model(model, str(root))
        runners[name] = _Runner(e, ReferenceEvaluator(model))
    return _Model(runners, shared_state_specs(entries))


class _Runner:
    def __init__(self, entry: GraphEntry, session: Any):
        self.entry = entry
        self.session = session
        self.static = static_traces(entry)

    def run(self, inputs: dict[str, np.ndarray], state: list[np.ndarray]
            ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        feeds = {s.name: np.ascontiguousarray(inputs[s.name]) for s in self.entry.inputs}
        feeds.update({s.input_name: a for s, a in zip(self.entry.state, state)})
        out = dict(zip(self.session.output_names, self.session.run(None, feeds)))
        # a graph of static length returns every position; the caller wants the fed ones
        fed = fed_length(self.entry, inputs) if self.static else 0
        result = {s.name: out[s.name][:, :fed] if s.name in self.static else out[s.name]
                  for s in self.entry.outputs}
        return result, [out[s.output_name] for s in self.entry.state]


class _Model(LoadedModel):
    def from_numpy(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [np.array(a, copy=True) for a in arrays]

    def to_numpy(self, state: list[np.ndarray]) -> list[np.ndarray]:
        return [np.array(a, copy=True) for a in state]
