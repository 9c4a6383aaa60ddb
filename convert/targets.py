"""``edgeseq convert --target DEVICE_ID``: which bundle formats to lower for a device profile.

A profile lists its ``backends`` best first (``devices/data/*.toml``: ``openvino:GPU``,
``ort:CPUExecutionProvider``, ``executorch:xnnpack``, ``ort:QNNExecutionProvider``, ...). Each
registered backend names the entries it produces bundles for (``Backend.targets``); the plan
keeps the profile's order, lowers each format once, and skips an entry nothing here can
produce with a line saying exactly what is missing.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from edgeseq.bundle import BundleError
from edgeseq.registry import backends

#: the PyPI package that carries each ONNX Runtime execution provider a profile may name (the
#: ``onnxruntime`` wheel carries only the CPU provider on Linux and Windows)
EP_PACKAGES = {"QNN": "onnxruntime-qnn", "OpenVINO": "onnxruntime-openvino",
               "CUDA": "onnxruntime-gpu", "Tensorrt": "onnxruntime-gpu",
               "Dml": "onnxruntime-directml (Windows)", "CoreML": "onnxruntime on macOS",
               "Xnnpack": "an onnxruntime built with --use_xnnpack (no PyPI wheel)"}
#: what an ExecuTorch delegate needs besides edgeseq's lowering for it
DELEGATE_PACKAGES = {"coreml": "coremltools", "qnn": "Qualcomm's QNN SDK",
                     "mps": "macOS (Metal)", "vulkan": "a Vulkan runtime"}


@dataclass
class TargetPlan:
    """What ``convert`` lowers for one device profile."""

    device_id: str
    formats: list[str] = field(default_factory=list)     # in the profile's order
    #: the backends that run them, in the profile's order (``Manifest.backends``): QNN runs the
    #: ONNX files ONNX Runtime lowers, so a format may serve two
    backends: list[str] = field(default_factory=list)
    #: per format, the device its backend compiles for (``openvino``: ``GPU``)
    devices: dict[str, str] = field(default_factory=dict)
    #: "<entry>: <what is missing>", one per entry skipped
    skipped: list[str] = field(default_factory=list)


def plan(profile: Any) -> TargetPlan:
    """The formats to lower for ``profile`` (a ``DeviceProfile``), in its order of preference.

    Raises:
        BundleError: none of its backends can be produced here (one line, every reason)."""
    out = TargetPlan(profile.id)
    registered = backends()
    for entry in profile.backends:
        cls = next((c for c in registered.values() if entry in getattr(c, "targets", ())), None)
        if cls is None:
            out.skipped.append(f"{entry}: {missing(entry)}")
            continue
        why = cls().available()
        if why:
            out.skipped.append(f"{entry}: {why}")
            continue
        name = cls().name
        if name in out.backends:     # openvino:GPU then openvino:CPU: one bundle format
            continue
        out.backends.append(name)
        if cls.format not in out.formats:
            out.formats.append(cls.format)
        device = cls().target_device(entry)
        if device is not None:
            out.devices[cls.format] = device
    if not out.formats:
        raise BundleError(f"--target {profile.id}: none of its backends can be produced here ("
                          + "; ".join(out.skipped) + ")")
    return out


def missing(entry: str) -> str:
    """What this machine lacks to produce a bundle for a profile's backend ``entry`` that no
    registered backend serves."""
    runtime, _, part = entry.partition(":")
    if runtime == "ort":
        ep = part.removesuffix("ExecutionProvider")
        try:
            import onnxruntime

            here = onnxruntime.get_available_providers()
        except ImportError:
            here = []
        if part in here:
            return (f"this onnxruntime has {part}, but edgeseq's ort backend runs the CPU "
                    f"provider only (issue #25)")
        return f"{ep}: {EP_PACKAGES.get(ep, f'an onnxruntime build with {part}')} not installed"
    if runtime == "executorch":
        need = DELEGATE_PACKAGES.get(part)
        extra = ""
        if need and importlib.util.find_spec(need) is None and need.isidentifier():
            extra = f"; it also needs {need}, not installed"
        return f"edgeseq has no lowering to ExecuTorch's {part} delegate yet (issue #25){extra}"
    return f"no edgeseq backend produces {runtime} bundles"
