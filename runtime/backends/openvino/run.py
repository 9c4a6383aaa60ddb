"""OpenVINO's run side: one compiled model per graph, state fed and returned as arrays.

Every graph is compiled with f32 inference precision set explicitly: OpenVINO's CPU plugin
runs bf16 by default on CPUs with bf16 units (AMX, AVX-512 BF16), which would break parity
with the reference model. The device is the manifest's (``partitions``, from the target's
``openvino:<DEVICE>``) where this machine has it, else the CPU; ``EDGESEQ_OPENVINO_DEVICE``
overrides both.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bundle import BundleError, GraphEntry, Manifest, path_problem, shared_state_specs
from edgeseq.runtime.backends.base import LoadedModel, check_io, fed_length, static_traces
from edgeseq.runtime.backends.openvino import WEIGHTS_FILE, OpenVinoBackend

DEVICE_ENV = "EDGESEQ_OPENVINO_DEVICE"
#: OpenVINO element types as the manifest names dtypes
_DTYPES = {"f32": "float32", "f16": "float16", "i64": "int64", "i32": "int32",
           "boolean": "bool"}
#: operators that hold or pass data, not compute (every device "runs" them)
_NOT_COMPUTE = ("Parameter", "Result", "Constant")


def core() -> Any:
    import openvino as ov

    return ov.Core()


def device_for(manifest: Manifest | None, available: list[str]) -> str:
    """The device a load compiles for: ``EDGESEQ_OPENVINO_DEVICE``, else the bundle's target
    device if this machine has it, else the CPU."""
    env = os.environ.get(DEVICE_ENV, "").strip()
    if env:
        return env
    rec = manifest.partition(OpenVinoBackend.format) if manifest is not None else None
    want = rec.device if rec is not None else "CPU"
    return want if any(d.split(".")[0] == want for d in available) else "CPU"


def compile_config(device: str, threads: int | None) -> dict[str, Any]:
    """The properties every graph is compiled with on ``device``."""
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if device == "CPU":
        from edgeseq.runtime.backends.onnxruntime.run import default_threads

        cfg["INFERENCE_NUM_THREADS"] = threads or default_threads()
        # as ONNX Runtime's set_denormal_as_zero: decayed recurrent states carry no signal
        # and slow the CPU many times over
        cfg["CPU_DENORMALS_OPTIMIZATION"] = True
        # The CPU plugin fuses attention's scale -> Softmax -> MatMul into a JIT "snippet";
        # over a growing KV cache (a new shape each call) the fused kernel returns wrong
        # values from the 16th distinct shape on (openvino 2026.4.1: the zoo Whisper's
        # decoder_step, logits off by ~10 from step 15; fresh requests at the same shape are
        # right). Without snippets the ops run as separate kernels, ~10% slower on that
        # decoder (docs/targets.md). Disabling the shape cache (CPU_RUNTIME_CACHE_CAPACITY 0)
        # also avoids it, at 1.7x the time.
        cfg["SNIPPETS_MODE"] = "DISABLE"
    return cfg


def load(root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
         threads: int | None = None) -> LoadedModel:
    ov_core = core()
    device = device_for(manifest, ov_core.available_devices)
    cfg = compile_config(device, threads)
    weights = _weights(root)
    runners = {}
    for name, e in entries.items():
        path = root / e.files[OpenVinoBackend.format]
        model = read_ir(ov_core, path, weights)
        try:
            compiled = ov_core.compile_model(model, device, cfg)
        except Exception as err:  # OpenVINO's own error types name no file
            raise BundleError(f"{path}: OpenVINO cannot compile it for {device} "
                              f"({error_line(err)})") from None
        check_io(path, e, {p.get_any_name(): (_dtype(p.get_element_type()),
                                              _dims(p.get_partial_shape()))
                           for p in compiled.inputs})
        runners[name] = _OvRunner(e, compiled)
    model = _OvModel(runners, shared_state_specs(entries))
    model.device = device
    return model


def _weights(root: Path) -> Path:
    why = path_problem(root, WEIGHTS_FILE)
    if why:
        raise BundleError(f"{root / WEIGHTS_FILE} {why}")
    return root / WEIGHTS_FILE


def read_ir(ov_core: Any, xml: Path, weights: Path) -> Any:
    """The IR at ``xml`` with its constants from ``weights``; the graph file is untrusted, so
    every constant must lie inside the weights file before OpenVINO reads it."""
    size = weights.stat().st_size
    try:
        layers = ET.parse(xml).getroot().iter("layer")
        for layer in layers:
            data = layer.find("data")
            if layer.get("type") != "Const" or data is None or "offset" not in data.attrib:
                continue
            start, length = int(data.get("offset", "")), int(data.get("size", ""))
            if start < 0 or length < 0 or start + length > size:
                raise BundleError(f"{xml}: constant {layer.get('name')!r} reads {length} bytes "
                                  f"at {start}, outside {weights.name} ({size} bytes)")
    except (ET.ParseError, ValueError) as e:
        raise BundleError(f"{xml}: not an OpenVINO IR ({error_line(e)})") from None
    try:
        return ov_core.read_model(str(xml), str(weights))
    except Exception as e:
        # either file may be at fault (a damaged constant fails shape inference): name both
        raise BundleError(f"{xml}: OpenVINO cannot read it with {weights.name} "
                          f"({error_line(e)})") from None


class _OvRunner:
    def __init__(self, entry: GraphEntry, compiled: Any):
        self.entry = entry
        self.request = compiled.create_infer_request()
        self.static = static_traces(entry)
        # output names to the compiled model's output positions (a port may carry several)
        port = {n: i for i, o in enumerate(compiled.outputs) for n in o.get_names()}
        self.outputs = [(s.name, port[s.name]) for s in entry.outputs]
        self.states = [port[s.output_name] for s in entry.state]

    def run(self, inputs: dict[str, np.ndarray], state: list[np.ndarray]
            ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        feeds = {s.name: np.ascontiguousarray(inputs[s.name]) for s in self.entry.inputs}
        if self.entry.state:    # a stateless graph (an encoder) is handed no state
            feeds.update({s.input_name: a for s, a in zip(self.entry.state, state)})
        # inputs shared (no copy: they live through the call), outputs copied out of the
        # request's buffers, which the next call overwrites
        res = self.request.infer(feeds, share_inputs=True, share_outputs=False).to_tuple()
        fed = fed_length(self.entry, inputs) if self.static else 0
        out = {name: res[i][:, :fed] if name in self.static else res[i]
               for name, i in self.outputs}
        return out, [res[i] for i in self.states] if self.entry.state else state


class _OvModel(LoadedModel):
    device = "CPU"

    def from_numpy(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [np.array(a, copy=True, order="C") for a in arrays]

    def to_numpy(self, state: list[np.ndarray]) -> list[np.ndarray]:
        return [np.array(a, copy=True) for a in state]

    def view_numpy(self, state: list[np.ndarray]) -> list[np.ndarray]:
        return list(state)


def partition(root: Path, files: dict[str, str], device: str) -> dict[str, Any]:
    """Which device runs each operator of each graph (the manifest's ``partitions`` record):
    OpenVINO's ``query_model`` names the operators ``device``'s plugin supports; the others
    would run on the CPU (a ``HETERO:<device>,CPU`` compile places them so). Where this machine
    lacks ``device``, the CPU plugin answers and the record says so (``checked_on``)."""
    ov_core = core()
    available = {d.split(".")[0] for d in ov_core.available_devices}
    checked = device if device in available else "CPU"
    weights = _weights(root)
    graphs: dict[str, dict[str, dict[str, int]]] = {}
    for name, f in files.items():
        model = read_ir(ov_core, root / f, weights)
        supported = ov_core.query_model(model, checked)
        counts: dict[str, dict[str, int]] = {}
        for op in model.get_ordered_ops():
            kind = op.get_type_name()
            if kind in _NOT_COMPUTE:
                continue
            where = supported.get(op.get_friendly_name(), "CPU")
            by_type = counts.setdefault(where, {})
            by_type[kind] = by_type.get(kind, 0) + 1
        graphs[name] = {d: dict(sorted(t.items())) for d, t in sorted(counts.items())}
    return {"device": device, "checked_on": checked, "precision": "f32", "graphs": graphs}


def _dtype(t: Any) -> str:
    name = t.get_type_name()
    return _DTYPES.get(name, name)


def _dims(shape: Any) -> list[Any]:
    return [d.get_length() if d.is_static else "?" for d in shape]


def error_line(err: BaseException) -> str:
    """The line of an OpenVINO error that says what is wrong: its messages open with the
    source location ("Exception from src/...") and end with the reason."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return (said or lines or [type(err).__name__])[-1][:200]
