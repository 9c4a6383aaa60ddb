"""``int8-static``: QDQ int8 with activation ranges calibrated on the user's data (for NPUs).

NPU execution providers (Qualcomm QNN, Intel/AMD NPU back ends, ExecuTorch's QNN delegate)
run integer graphs whose activation scales are fixed ahead of time: the graph carries explicit
``QuantizeLinear``/``DequantizeLinear`` pairs (the QDQ format) around every quantized operator.
ONNX Runtime's CPU provider fuses the same pairs into integer kernels, so the bundle is checked
on this host.

Calibration: the fp32 bundle runs on the ``--calibration`` data exactly as it will stream
(prefill and then one step per token, encoder and decoder steps, classifier chunks), every call
of every graph is recorded with its state, and ONNX Runtime's calibrator collects the ranges of
each activation over those calls (MinMax). Weights are int8 per channel, symmetric; activations
uint8 asymmetric. State tensors stay float32 at every graph interface (they are inputs and
outputs, not quantized activations), as do the family's sensitive layers and ``--keep``.
"""
from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: recorded calls per graph handed to the calibrator (spread evenly over the stream)
MAX_FEEDS = 64


class _Recorder:
    """Wraps a LoadedModel's ``run`` to keep each call's feed (inputs and state by ONNX name)."""

    def __init__(self, model: Any):
        self.model = model
        self.inner = model.run
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {}
        model.run = self.run

    def run(self, graph: str, inputs: dict[str, np.ndarray], state: Any) -> Any:
        entry = self.model.runners[graph].entry
        feed = {s.name: np.array(inputs[s.name]) for s in entry.inputs}
        if entry.state:
            feed.update({spec.input_name: a for spec, a in
                         zip(entry.state, self.model.to_numpy(state))})
        self.feeds.setdefault(graph, []).append(feed)
        return self.inner(graph, inputs, state)


def calibration_feeds(family: Any, model: Any, bundle: Path, task: str, calib: Path,
                      tokenizer: Any = None, tokens: int = 512) -> dict[str, list[dict]]:
    """Run the fp32 bundle over the calibration data (the task's calibration reader:
    ``edgeseq/tasks/<task>.py``); the recorded feeds per graph."""
    from edgeseq.registry import get_task
    from edgeseq.runtime.session import load

    sess = load(bundle, backend="ort")
    rec = _Recorder(sess.model)
    calib = Path(calib)
    if not calib.is_file():
        raise ValueError(f"{calib}: calibration file not found")
    get_task(task).part("calibration")(family, model, sess, calib, tokenizer, tokens)
    out = {}
    for graph, feeds in rec.feeds.items():
        idx = np.unique(np.linspace(0, len(feeds) - 1, min(MAX_FEEDS, len(feeds))).astype(int))
        out[graph] = [feeds[i] for i in idx]
    return out


def calibrate_classifier(family: Any, model: Any, sess: Any, calib: Path, tokenizer: Any,
                         tokens: int) -> None:
    """An ``.npz`` with x (n, frames, features): whole chunks and then single frames, so both
    the chunk and the step graph are seen."""
    try:
        x = np.asarray(np.load(calib, allow_pickle=False)["x"], dtype=np.float32)
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{calib}: expected an .npz with x (n, frames, features) ({e})") from None
    split = x.shape[1] // 2
    sess.reset(len(x))
    sess.push(x[:, :split])
    for i in range(split, x.shape[1]):
        sess.push(x[:, i:i + 1])
    sess.finish()


def calibrate_seq2seq(family: Any, model: Any, sess: Any, calib: Path, tokenizer: Any,
                      tokens: int) -> None:
    """One source per line (text, or a WAV path for speech), each decoded greedily."""
    from edgeseq.quant import gates

    sources, _, _ = gates.seq2seq_sources(family, model, sess, calib)
    for src in sources:
        sess.generate(np.asarray(src), 32, num_beams=1, do_sample=False)


def calibrate_causal(family: Any, model: Any, sess: Any, calib: Path, tokenizer: Any,
                     tokens: int) -> None:
    """Text: its first ``tokens`` tokens, a short prefill and then one step per token."""
    from edgeseq.quant import gates

    text = calib.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer.encode(text) if tokenizer is not None else []
    if not ids:
        raise ValueError(f"{calib}: no tokens to calibrate on")
    ids = ids[:tokens]
    sess.prefill(np.array([ids[:gates.PREFILL]], dtype=np.int64))
    for t in ids[gates.PREFILL:]:
        sess.step(np.array([t], dtype=np.int64))


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def quantize_static_model(model: Any, feeds: list[dict[str, np.ndarray]], keep: list[str]
                          ) -> tuple[Any, dict[str, Any]]:
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from edgeseq.runtime.backends.onnxruntime.quantize import (matmul_weights, prepare,
                                                               quantize_embeddings)

    prepare(model)
    tables = quantize_embeddings(model, 8, keep)
    weights = matmul_weights(model)
    exclude = [n for n, w in weights.items() if any(fnmatch.fnmatch(w, p) for p in keep)]
    chosen = [n for n in weights if n not in exclude]
    if not feeds:
        raise ValueError("no calibration feeds recorded for this graph")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src))
        quantize_static(src, dst, _Reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], nodes_to_quantize=chosen or None,
                        nodes_to_exclude=exclude, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True})
        model = onnx.load(str(dst))
    report = {"scheme": "int8-static",
              "how": "QDQ: int8 per-channel symmetric weights, uint8 activations with ranges "
                     f"calibrated (MinMax) over {len(feeds)} recorded calls; embedding tables int8 "
                     "per row",
              "quantized": sorted({weights[n] for n in chosen} | set(tables)),
              "kept_float": sorted({weights[n] for n in exclude})}
    return model, report


def quantize_static_bundle(folder: Path, files: dict[str, str],
                           feeds: dict[str, list[dict[str, np.ndarray]]], keep: list[str]
                           ) -> dict[str, Any]:
    """Quantize every ``<graph>.onnx`` of a bundle folder in place with its recorded feeds."""
    from edgeseq.registry import get_backend
    from edgeseq.runtime.backends.onnxruntime.quantize import quantize_model

    def rewrite(name: str, model: Any) -> tuple[Any, dict[str, Any]]:
        if feeds.get(name):
            return quantize_static_model(model, feeds[name], keep)
        # Graphs plain streaming never calls (speculative decoding's verify, decoder_chunk,
        # exit_step) see no calibration data: their weights get int8 with dynamic activations.
        model, report = quantize_model(model, "int8", keep)
        report["how"] = ("int8 with dynamic activations: no calibration feeds (a graph only "
                         "speculative decoding calls)")
        return model, report

    return get_backend("ort").rewrite_files(folder, files, rewrite)
