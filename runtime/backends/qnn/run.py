"""ONNX Runtime's QNN execution provider on the HTP: its set-up for a target SoC, the runners
(the ONNX Runtime backend's, through the provider) and what the provider took of each graph.

The HTP compiles each graph for fixed shapes, so every named dimension the runner can fix is
fixed at load: ``batch`` to 1 (the NPU serves one stream). Graphs with a dimension that moves
from call to call (a prompt chunk's length, a growing cache) keep those parts on the CPU, or
are refused by the provider; ``partition`` reports which.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgeseq.bundle import BundleError, GraphEntry, Manifest
from edgeseq.runtime.backends.base import LoadedModel

EP_NAME = "QNNExecutionProvider"

#: QNN's SoC enumeration (``QnnTypes.h``'s ``QNN_SOC_MODEL_*``) and the HTP generation of each
#: part a device profile may name (``soc`` in ``devices/data/*.toml``); the provider compiles
#: for that HTP. Facts of the QNN SDK, listed for the parts our profiles use and their kin.
SOCS: dict[str, tuple[int, int]] = {
    "SM8550": (43, 73),     # Snapdragon 8 Gen 2
    "SM8650": (57, 75),     # Snapdragon 8 Gen 3
    "SC8380XP": (60, 73),   # Snapdragon X Elite
    "SM7550": (64, 73),     # Snapdragon 7 Gen 3
}
#: the SoC compiled for when the bundle's target names none: a 2024 flagship phone's
DEFAULT_SOC = "SM8650"

_registered = False


def missing() -> str | None:
    """None when the provider can be used here, else what is missing."""
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        return "onnxruntime-qnn is not installed (pip install onnxruntime-qnn)"
    try:
        _register()
    except Exception as e:  # the provider library's own errors
        return f"onnxruntime-qnn cannot be registered with ONNX Runtime ({e})"
    return None


def _register() -> None:
    """Register the provider's library with ONNX Runtime once per process."""
    global _registered
    if _registered:
        return
    import onnxruntime as ort
    import onnxruntime_qnn

    ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
    _registered = True


def soc_for(manifest: Manifest) -> str:
    """The SoC to compile for: the bundle's target device's, else ``DEFAULT_SOC``."""
    return soc_of(manifest.target)


def soc_of(device_id: str | None) -> str:
    """The SoC of a device profile (by id or file) that QNN knows, else ``DEFAULT_SOC``."""
    from edgeseq.devices.catalog import get_profile

    try:
        soc = get_profile(device_id).soc if device_id else ""
    except Exception:  # an unknown or host target names no SoC
        soc = ""
    return soc if soc in SOCS else DEFAULT_SOC


def static_dims(where: str, task: Any, cfg: dict[str, Any]) -> dict[str, int]:
    """The named dimensions fixed for the HTP: ``batch`` (one stream), and for speech the
    window (``frames``) and the encoder's output length (``source``), which the runner always
    pads to. Text encoder-decoders take a source of any length, and a decoder with a growing
    cache a ``past`` that moves every step: the HTP cannot compile them (refused, one line)."""
    from edgeseq.runtime.backends.qnn import QnnBackend

    dims = {"batch": QnnBackend.max_batch}
    if not task.encoder:
        return dims
    if not task.audio:
        raise BundleError(f"{where}: the QNN backend runs speech encoder-decoders, causal LMs "
                          f"and classifiers; this {task.name} bundle's encoder takes a "
                          f"source of any length, which the HTP cannot compile")
    if cfg.get("cache_layout") != "fixed":
        raise BundleError(f"{where}: the QNN backend needs a fixed-capacity decoder cache (the "
                          f"HTP compiles fixed shapes): convert with --max-target-len N")
    dims["frames"] = int(cfg["audio"]["window_frames"])
    dims["source"] = int(cfg["max_source_positions"])
    return dims


@dataclass
class QnnHtp:
    """The provider on the HTP of one SoC (``configure`` is ``run.load``'s ``ep`` hook),
    with the named dimensions fixed for it (``static_dims``)."""

    soc: str = DEFAULT_SOC
    dims: dict[str, int] = field(default_factory=dict)
    name: str = EP_NAME

    def options(self) -> dict[str, str]:
        import onnxruntime_qnn

        model, arch = SOCS[self.soc]
        # float operators run in fp16 on the HTP (it has no fp32 units); integer QDQ
        # operators in int8/uint8 as quantized
        return {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": str(model),
                "htp_arch": str(arch), "enable_htp_fp16_precision": "1"}

    @contextmanager
    def creating(self) -> Iterator[None]:
        """The HTP library prints a notice to the process's stdout when it loads (" # LIBNATIVE:
        No alternate configuration present ..."), which would corrupt ``run --json``: the
        file descriptor is pointed at /dev/null while a session is created (errors still
        reach stderr and the exception)."""
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)

    def configure(self, opts: Any) -> None:
        import onnxruntime as ort

        _register()
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
        if not devices:
            raise BundleError(f"{EP_NAME}: onnxruntime-qnn is registered but offers no device")
        opts.add_provider_for_devices(devices, self.options())
        for dim, size in self.dims.items():
            opts.add_free_dimension_override_by_name(dim, size)


def load(root: Path, manifest: Manifest, entries: dict[str, GraphEntry],
         threads: int | None = None) -> LoadedModel:
    from edgeseq.runtime.backends.onnxruntime.run import load as ort_load

    from edgeseq.registry import get_task

    why = missing()
    if why:
        raise BundleError(why)
    dims = static_dims(str(root), get_task(manifest.task), manifest.config)
    model = ort_load(root, manifest, entries, threads, ep=QnnHtp(soc_for(manifest), dims=dims))
    model.partition = {name: r.assigned for name, r in model.runners.items()}
    return model


def partition(assigned: dict[str, dict[str, int]]) -> dict[str, Any]:
    """One graph's report: nodes on the NPU and on the CPU, the NPU's share, and the operator
    types left on the CPU (what a user reads before shipping)."""
    npu = sum(assigned.get(EP_NAME, {}).values())
    cpu = sum(n for ep, ops in assigned.items() if ep != EP_NAME for n in ops.values())
    fallback: dict[str, int] = {}
    for ep, ops in assigned.items():
        if ep != EP_NAME:
            for op, n in ops.items():
                fallback[op] = fallback.get(op, 0) + n
    return {"npu_nodes": npu, "cpu_nodes": cpu,
            "npu_share": round(npu / (npu + cpu), 4) if npu + cpu else 0.0,
            "cpu_ops": dict(sorted(fallback.items(), key=lambda kv: -kv[1]))}


#: the names the partition record gives the provider's and ONNX Runtime's own processors
NPU, CPU = "NPU", "CPU"


def placement(root: Path, files: dict[str, str], task: Any, config: dict[str, Any],
              device: str | None = None) -> dict[str, Any]:
    """The partition record (``edgeseq.bundle.Partition``) of the ONNX ``files`` under ``root``
    on the HTP: per graph, the operator types the provider takes (``NPU``) and those left to
    ONNX Runtime's CPU provider (``CPU``). The provider decides per node from the graph alone
    (the simulator's answer is the device's, for the same SoC), so ``checked_on`` is the NPU.
    ``device``: the target device profile, whose SoC it compiles for."""
    import onnxruntime as ort

    from edgeseq.runtime.backends.onnxruntime.run import assigned_nodes

    ep = QnnHtp(soc_of(device), dims=static_dims(str(root), task, config))
    graphs = {}
    for name, f in files.items():
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        ep.configure(opts)
        opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        try:
            with ep.creating():
                sess = ort.InferenceSession(str(root / f), sess_options=opts)
        except Exception as e:  # the provider's own error types
            raise BundleError(f"{f}: the QNN provider cannot compile graph {name} "
                              f"({str(e).splitlines()[0][:300]})") from None
        by_ep = assigned_nodes(sess)
        graphs[name] = {NPU if p == EP_NAME else CPU: ops for p, ops in by_ep.items()}
        del sess
    return {"device": NPU, "checked_on": NPU, "precision": "fp16 (float operators), int8 (QDQ operators)",
            "graphs": graphs}
