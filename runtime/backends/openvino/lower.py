"""OpenVINO's build side: the bundle's ONNX graphs converted to OpenVINO IR.

The graphs are not exported from PyTorch again: the ONNX files ONNX Runtime's lowering wrote in
this conversion are read (or, without ``--format onnx``, written to a staging folder first), so
every format of a bundle comes from one export. Each graph's IR is saved by OpenVINO, then its
constants are moved, deduplicated by content, into one ``weights.openvino.bin`` that every
``<graph>.xml`` reads (OpenVINO writes one ``.bin`` per model: the decoder graphs of an
encoder-decoder would otherwise carry the same weights two or three times).
"""
from __future__ import annotations

import hashlib
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from edgeseq.bundle import StreamingGraph
from edgeseq.runtime.backends.openvino import WEIGHTS_FILE
from edgeseq.runtime.backends.openvino.run import error_line

ALIGN = 64


def lower(graphs: dict[str, StreamingGraph], out: Path, dtype: str) -> dict[str, str]:
    """``<graph>.xml`` per graph and the shared weights file under ``out``; {graph: file}."""
    import openvino as ov

    from edgeseq.registry import get_backend

    onnx_files = {name: out / f"{name}.onnx" for name in graphs}
    stage = out / ".openvino"
    stage.mkdir()
    try:
        if not all(p.is_file() for p in onnx_files.values()):
            # no ONNX lowering in this conversion (or not of these graphs): one, staged
            (stage / "onnx").mkdir()
            written = get_backend("onnx").lower(graphs, stage / "onnx", dtype)
            onnx_files = {name: stage / "onnx" / f for name, f in written.items()}
        saved = {}
        for name, path in onnx_files.items():
            try:
                model = ov.convert_model(str(path))
            except Exception as e:  # OpenVINO's frontend errors name no graph
                raise ValueError(f"graph {name}: OpenVINO cannot read its ONNX "
                                 f"({error_line(e)})") from None
            # OpenVINO's frontend folds the fp16 ONNX weights' casts back into fp32
            # constants, so --dtype fp16 asks save_model for fp16 constants (decompressed at
            # load; compute stays f32); under fp32 it must not compress on its own
            ov.save_model(model, str(stage / f"{name}.xml"), compress_to_fp16=dtype == "fp16")
            saved[name] = stage / f"{name}.xml"
        files = share_weights(saved, out)
    finally:
        shutil.rmtree(stage)
    return files


def share_weights(saved: dict[str, Path], out: Path) -> dict[str, str]:
    """Move the constants of each saved IR (``<name>.xml`` + ``<name>.bin``) into one weights
    file under ``out``, each distinct blob once, and write each graph's XML there with its
    offsets into that file; returns {graph: xml file name}."""
    index: dict[bytes, int] = {}
    files = {}
    with open(out / WEIGHTS_FILE, "wb") as blob:
        for name, xml in saved.items():
            data = xml.with_suffix(".bin").read_bytes()
            tree = ET.parse(xml)
            for layer in tree.getroot().iter("layer"):
                attrs = layer.find("data")
                if layer.get("type") != "Const" or attrs is None or "offset" not in attrs.attrib:
                    continue
                start, size = int(attrs.get("offset")), int(attrs.get("size"))
                chunk = data[start:start + size]
                key = hashlib.sha256(chunk).digest()
                if key not in index:
                    pad = -blob.tell() % ALIGN
                    blob.write(b"\0" * pad)
                    index[key] = blob.tell()
                    blob.write(chunk)
                attrs.set("offset", str(index[key]))
            tree.write(out / f"{name}.xml", encoding="utf-8", xml_declaration=True)
            files[name] = f"{name}.xml"
    return files

