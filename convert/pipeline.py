"""``edgeseq convert``: one linear pipeline of named stages,

    validate -> load -> build graphs -> lower per format -> [quantize] -> manifest
    -> parity (or, quantized, the accuracy gates) -> write

where the task-specific parts (the parity check and its reference, the accuracy gate, the
calibration reader) come from the checkpoint's task plug-in (``edgeseq/tasks/<task>.py``).

The bundle is written into a temporary folder beside the destination and renamed into place only
when every step, parity included, has succeeded: a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeseq import generation, tokenize, zoo
from edgeseq.bundle import BundleError, GraphEntry, Manifest
from edgeseq.output import atomic_folder, write_json
from edgeseq.trust import file_records, record_converted, sha256_of
from edgeseq.checkpoint import (checkpoint_folder, read_config, source_files, stored_dtype,
                                 weight_files)
from edgeseq.convert.workers import Beside
from edgeseq.families.base import detect_family
from edgeseq.registry import formats, get_backend, get_task

FORMATS = formats()        # {format: backend}, as the backend classes declare them
ALL_FORMATS = tuple(FORMATS)
DTYPES = ("fp32", "fp16")
# What --dtype fp16 means per format; state stays fp32 at every graph's interface.
FP16_NOTE = {"scheme": "fp16",
             "onnx": "fp16 weights (>= 1024 elements), fp32 compute and state",
             "pte": "fp16 weights and compute (XNNPACK), fp32 state at the interface",
             "pt2": "fp16 weights and compute, fp32 state at the interface",
             "openvino": "fp16 weights (OpenVINO's compress_to_fp16: float constants), f32 "
                         "inference precision and state"}

Progress = Callable[[str], None]


def _check_quant(quant: str, formats: tuple[str, ...], dtype: str, family: Any,
                 keep: list[str] | None, quantize_all: bool,
                 calibration: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Refuse a scheme/format combination that does not exist; return the patterns of the
    weights kept in float (the user's ``--keep``) and of the family's sensitive ones
    (``Family.quant_sensitive``)."""
    ORT_SCHEMES = get_backend(FORMATS["onnx"]).quant_schemes
    ET_SCHEMES = get_backend(FORMATS["pte"]).quant_schemes
    if quant not in ORT_SCHEMES:
        raise BundleError(f"unknown quantization {quant!r}; known: fp16, {', '.join(ORT_SCHEMES)}")
    if quant == "int8-static" and calibration is None:
        raise BundleError("--quant int8-static calibrates activation ranges on your data: give "
                          "--calibration FILE (text for language models, one source per line for "
                          "encoder-decoders, an .npz with x for classifiers)")
    if calibration is not None and not Path(calibration).is_file():
        raise BundleError(f"{calibration}: calibration file not found")
    if "pt2" in formats:
        raise BundleError(f"--quant {quant}: pt2 (the PyTorch reference format) is not quantized; "
                          f"use --format onnx, pte or onnx,pte")
    plain = [f for f in formats if f not in ("onnx", "pte")
             and not get_backend(FORMATS[f]).quant_schemes]
    if plain:
        raise BundleError(f"--quant {quant}: the {plain[0]} backend does not quantize; "
                          f"use --format onnx, pte or onnx,pte")
    if "pte" in formats and quant not in ET_SCHEMES:
        raise BundleError(f"--quant {quant} exists for ONNX Runtime only (ExecuTorch: "
                          f"{', '.join(ET_SCHEMES)}); use --format onnx")
    if dtype != "fp32":
        raise BundleError(f"--quant {quant} starts from fp32 graphs: drop --dtype fp16")
    sensitive = [] if quantize_all else list(family.quant_sensitive)
    if family.quant_sensitive_floor == "float":
        return list(keep or []) + sensitive, []
    return list(keep or []), sensitive


def _gate_summary(g: dict[str, Any]) -> str:
    parts = [f"agreement {g['agreement']:.4f} (needs >= {1 - g['max_drop']:.4f})"]
    if "kl_mean" in g:
        parts.append(f"mean KL {g['kl_mean']:.4f} (needs <= {g['max_kl']})")
    if "cer" in g:
        parts.append(f"CER {g['cer']:.4f} (needs <= {g['max_cer']})")
    if "accuracy" in g:
        parts.append(f"accuracy {g['accuracy']:.4f} (fp32 {g['accuracy_fp32']:.4f})")
    return ", ".join(parts)


def _manifest(c: "_Conversion", quantization: Any) -> Manifest:
    return Manifest(
        family=c.family.name, task=c.family.task,
        source={"path": c.src_label, "sha256": sha256_of(source_files(c.src)),
                "files": [w.name for w in c.weights],
                # what the checkpoint held; the graphs and parity use it upcast to float32
                "dtype": stored_dtype(c.src)},
        graphs={name: GraphEntry(name, g.inputs, g.outputs, g.state, c.files[name], g.max_chunk)
                for name, g in c.graphs.items()},
        tokenizer=c.tok_spec, dtype=c.dtype, target=c.target,
        config=dict(c.model_config), quantization=quantization, side_files=dict(c.side_files),
        partitions=dict(c.partitions), backends=list(c.preferred))


class ConversionError(BundleError):
    """Conversion failed (parity included); nothing was written."""


def convert(src: str | Path, out: str | Path, formats: tuple[str, ...] = ALL_FORMATS,
            dtype: str = "fp32", parity_tokens: int = 64, overwrite: bool = False,
            skip_parity: bool = False, force: bool = False, target: str = "host",
            max_target_len: int | None = None, quant: str | None = None,
            group_size: int | None = None,
            keep: list[str] | None = None, quantize_all: bool = False,
            eval_file: str | Path | None = None, max_drop: float | None = None,
            calibration: str | Path | None = None, early_exit: int | None = None,
            draft_loop: int | None = None, draft: str | Path | None = None,
            progress: Progress | None = None,
            devices: dict[str, str] | None = None, preferred: tuple[str, ...] = ()) -> Path:
    """Convert a checkpoint folder (or ``zoo:NAME``) into a bundle at ``out``.

    Args:
        formats: any of ``onnx``, ``pte``, ``pt2`` (the PyTorch reference backend's format).
        dtype: ``fp32`` or ``fp16`` (what fp16 means per format: ``FP16_NOTE``; state stays fp32
            at every graph interface).
        parity_tokens: greedy tokens compared against the reference library's ``generate``.
        skip_parity: write without checking (not recommended); ``force`` writes despite a failure.
        max_target_len: encoder-decoders only: a fixed-capacity self-attention cache of this many
            positions (static shapes) instead of a growing one.
        quant: ``int8``, ``int4`` (each backend's ``quantize.py``, its ``quant_schemes``) or
            ``int4-tensor`` (ONNX only) weight quantization,
            checked per format by an accuracy gate (``edgeseq.quant.gates``) instead of exact
            parity; ``keep`` globs weights to leave in float (default: the
            family's sensitive layers, none with ``quantize_all``).
        early_exit: generating families: also write ``exit_step``, the first ``early_exit``
            layers plus the head, for self-speculative drafting (``--speculate early-exit:N``).
        draft_loop: causal LMs: also write ``draft_loop``, that many greedy steps in one call,
            for a bundle that serves as another model's draft (``--speculate draft:PATH``).
        devices: per format, the accelerator its backend compiles for (``openvino``: ``GPU``),
            as ``convert.targets.plan`` reads a device profile; its partition record
            (``Manifest.partitions``) says which operators run there.
        preferred: the backends in the target's order of preference (``Manifest.backends``:
            ``load`` runs the first by default); empty: ONNX Runtime, as always.
        draft: a converted draft bundle (``convert --distill draft``) to ship inside this one,
            in ``draft/``, and record in the manifest (``--speculate draft`` finds it).
    Returns:
        The bundle folder.
    Raises:
        BundleError: bad input (missing path, unsupported architecture, corrupt or unsafe weights).
        ConversionError: a backend failed to lower or parity failed.
    """
    say = progress or (lambda msg: None)
    c = _Conversion(src_label=str(src), t0=time.perf_counter(), say=say, formats=formats,
                    dtype=dtype, target=target, quant=quant, group_size=group_size,
                    calibration=calibration, devices=dict(devices or {}),
                    preferred=tuple(preferred))
    _validate(c, out, overwrite)
    _load(c, max_target_len, keep, quantize_all)
    _build_graphs(c, early_exit, draft_loop)
    # the original model's reference outputs, computed while the graphs are lowered
    reference = None if skip_parity or quant is not None else Beside(
        c.task.part("parity").reference(c.family, c.model, c.tokenizer, c.model_config,
                                        parity_tokens))
    with atomic_folder(c.out, overwrite=overwrite) as tmp, reference or nullcontext():
        _lower(c, tmp)
        if quant is not None:
            _quantize(c, tmp)
        _place(c, tmp)
        if draft is not None:
            _add_draft(c, tmp, Path(draft))
        manifest = _write_manifest(c, tmp, early_exit, draft_loop)
        if skip_parity:
            parity: dict[str, Any] = {"dtype": dtype, "checks": [], "skipped": True}
            say("[4/5] parity skipped (--skip-parity)")
        elif quant is not None:
            parity = _gates(c, tmp, manifest, eval_file, max_drop)
        else:
            parity = _parity(c, tmp, manifest, reference, parity_tokens, early_exit, draft_loop)
        _write(c, tmp, manifest, parity, skip_parity, force)
    record_converted(c.out)
    return c.out


@dataclass
class _Conversion:
    """What the stages of one conversion hand on to each other."""

    src_label: str
    t0: float
    say: Progress
    formats: tuple[str, ...]
    dtype: str
    target: str
    quant: str | None
    group_size: int | None  # None: each backend's own (``Backend.int4_group``)
    calibration: str | Path | None
    devices: dict[str, str] = field(default_factory=dict)
    preferred: tuple[str, ...] = ()
    out: Path = Path()
    src: Path = Path()
    config: dict[str, Any] = field(default_factory=dict)
    family: Any = None
    task: Any = None
    weights: list[Path] = field(default_factory=list)
    opts: dict[str, Any] = field(default_factory=dict)
    keep: list[str] = field(default_factory=list)
    sensitive: list[str] = field(default_factory=list)
    model: Any = None
    graphs: dict[str, Any] = field(default_factory=dict)
    folder: Path = Path()
    tok_spec: Any = None
    tokenizer: Any = None
    model_config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    side_files: dict[str, dict[str, str]] = field(default_factory=dict)
    q_formats: dict[str, Any] = field(default_factory=dict)
    partitions: dict[str, Any] = field(default_factory=dict)
    quant_record: dict[str, Any] | None = None
    draft: dict[str, Any] | None = None


def _validate(c: _Conversion, out: str | Path, overwrite: bool) -> None:
    """Refuse bad arguments before the checkpoint is read."""
    c.src = zoo.resolve(c.src_label)
    formats = c.formats
    if isinstance(formats, str):   # "onnx" would iterate as letters
        formats = (formats,)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise BundleError(f"--format: unknown format {bad[0]!r}; known: {', '.join(FORMATS)}, all")
    # a bundle without graphs would convert, check nothing and report parity "passed"
    if not formats:
        raise BundleError(f"--format: no format given; known: {', '.join(FORMATS)}, all")
    c.formats = tuple(dict.fromkeys(formats))
    if c.dtype not in DTYPES:
        raise BundleError(f"unknown dtype {c.dtype!r}; known: {', '.join(DTYPES)}")
    c.out = Path(out)
    if c.out.exists() and not overwrite:
        raise BundleError(f"{c.out}: already exists (use --overwrite to replace it)")


def _load(c: _Conversion, max_target_len: int | None, keep: list[str] | None,
          quantize_all: bool) -> None:
    """The checkpoint's family and task (the options checked against them), the reference
    model with its generation config checked, and the checkpoint's tokenizer."""
    c.config = read_config(c.src)
    c.family = detect_family(c.config, c.src)
    c.task = get_task(c.family.task)
    c.weights = weight_files(c.src)
    c.say(f"[1/5] loading {c.src_label} ({c.family.name}, "
          f"{sum(w.stat().st_size for w in c.weights) / 1e6:.1f} MB)")
    if max_target_len is not None and not c.task.encoder:
        raise BundleError(f"{c.src_label}: --max-target-len applies to encoder-decoder models; "
                          f"{c.family.name} has no attention cache")
    c.opts = {"max_target_len": max_target_len} if c.task.encoder else {}
    c.keep = list(keep or [])
    if c.quant is not None:
        c.keep, c.sensitive = _check_quant(c.quant, c.formats, c.dtype, c.family, keep,
                                           quantize_all, c.calibration)
    c.model = c.family.load(c.src)
    # a generation rule the runtime would not apply as transformers does: refused by name
    generation.check(c.model, c.src, c.family)
    c.folder = checkpoint_folder(c.src)   # the side files of a checkpoint given as its weights
    c.tok_spec = tokenize.detect(c.folder, c.config)
    c.tokenizer = tokenize.load(c.folder, c.tok_spec)


def _build_graphs(c: _Conversion, early_exit: int | None, draft_loop: int | None) -> None:
    """The family's streaming graphs, plus the optional drafting graphs."""
    c.graphs = c.family.graphs(c.model, **c.opts)
    if early_exit is not None:
        if not hasattr(c.family, "exit_graph"):
            raise BundleError(f"{c.src_label}: --early-exit applies to generating models; "
                              f"{c.family.name} ({c.family.task}) does not generate")
        c.graphs["exit_step"] = c.family.exit_graph(c.model, early_exit, **c.opts)
    if draft_loop is not None:
        if not c.task.decoder_only:
            raise BundleError(f"{c.src_label}: --draft-loop applies to causal language models; "
                              f"{c.family.name} is {c.family.task}")
        from edgeseq.families.base import draft_loop_from_step

        c.graphs["draft_loop"] = draft_loop_from_step(c.graphs["step"], draft_loop)
    c.model_config = c.family.model_config(c.model, **c.opts)


def _lower(c: _Conversion, tmp: Path) -> None:
    """Every graph lowered per format (ExecuTorch quantizes while lowering), and the tokenizer
    files copied."""
    c.files = {name: {} for name in c.graphs}
    # in the registry's order, not the user's: a backend that converts another's files (the
    # OpenVINO IR from the ONNX files) then finds them written
    order = sorted(c.formats, key=list(FORMATS).index)
    for i, fmt in enumerate(order):
        backend = get_backend(FORMATS[fmt])
        why = backend.available()
        if why:
            raise ConversionError(f"cannot write {fmt}: {why}")
        t = time.perf_counter()
        c.say(f"[2/5] lowering to {fmt} ({i + 1}/{len(c.formats)}) ...")
        try:
            if c.quant is not None and fmt == "pte":
                from edgeseq.runtime.backends.executorch.quantize import float_weight_bytes

                group = c.group_size or backend.int4_group
                qgraphs, reports = backend.quantize_graphs(c.graphs, c.quant, c.keep, group,
                                                           c.sensitive)
                written = backend.lower(qgraphs, tmp, c.dtype, quantized=True)
                c.q_formats["pte"] = {
                    "weight_bytes_fp32": float_weight_bytes(c.graphs),
                    "file_bytes": (tmp / written[next(iter(written))]).stat().st_size,
                    **({"group_size": group} if "int4" in c.quant else {}),
                    "graphs": reports}
                del qgraphs
            elif fmt == "onnx":
                written = backend.lower(c.graphs, tmp, c.dtype, fused=all(
                    get_backend(b).onnx_contrib_ops for b in c.preferred))
            else:
                written = backend.lower(c.graphs, tmp, c.dtype)
        except ValueError as e:
            raise ConversionError(f"{c.src_label}: cannot lower to {fmt}: {e}") from None
        for name, f in written.items():
            c.files[name][fmt] = f
        sides = {role: f for role, f in backend.side_files.items() if (tmp / f).is_file()}
        if sides:
            c.side_files[fmt] = sides
        try:
            placed = backend.partition(tmp, written, c.devices.get(fmt))
        except BundleError as e:
            raise ConversionError(f"{c.src_label}: {fmt}: {e}") from None
        if placed is not None:
            c.partitions[backend.name] = placed
        c.say(f"      {fmt}: {', '.join(sorted(set(written.values())))} "
              f"in {time.perf_counter() - t:.1f}s")
    tokenize.copy_files(c.folder, c.tok_spec, tmp)


def _place(c: _Conversion, tmp: Path) -> None:
    """The partition of the target's backends that run another backend's files (QNN runs the
    ONNX files): after quantization, which decides what an NPU takes."""
    for name in c.preferred:
        backend = get_backend(name)
        if FORMATS[backend.format] == backend.name or name in c.partitions:
            continue
        files = {g: f[backend.format] for g, f in c.files.items() if backend.format in f}
        t = time.perf_counter()
        try:
            placed = backend.partition(tmp, files, c.devices.get(name) or c.target,
                                       task=c.task, config=c.model_config)
        except BundleError as e:
            # the files serve the target's other backends; this one cannot take them (QNN: a
            # text encoder's source of any length): said, and left out of the manifest
            c.say(f"      {name}: left out of the target's backends: {e}")
            c.preferred = tuple(b for b in c.preferred if b != name)
            continue
        if placed is not None:
            c.partitions[name] = placed
            c.say(f"      {name}: partition of {len(files)} graphs in "
                  f"{time.perf_counter() - t:.1f}s")


def _quantize(c: _Conversion, tmp: Path) -> None:
    """ONNX graphs quantized in place (int8-static: calibrated through the task's calibration
    reader); the quantization record of every format."""
    quant, keep, sensitive = c.quant, c.keep, c.sensitive
    if "onnx" in c.formats:
        from edgeseq.runtime.cost import weight_bytes_by_dtype

        onnx_files = {name: f["onnx"] for name, f in c.files.items()}
        before = sum(weight_bytes_by_dtype(tmp, list(onnx_files.values())).values())
        if quant == "int8-static":
            from edgeseq.quant.static import calibration_feeds, quantize_static_bundle

            # the fp32 graphs stream the calibration data once, with a provisional
            # manifest, and every call is recorded
            c.say(f"      calibrating activation ranges on {c.calibration} ...")
            write_json(tmp / "manifest.json", _manifest(c, None).to_json())
            feeds = calibration_feeds(c.family, c.model, tmp, c.family.task,
                                      Path(c.calibration), c.tokenizer)
            reports = quantize_static_bundle(tmp, onnx_files, feeds, keep + sensitive)
        else:
            ort = get_backend(FORMATS["onnx"])
            group = c.group_size or ort.int4_group
            reports = ort.quantize_files(tmp, onnx_files, quant, keep, group, sensitive)
        after = weight_bytes_by_dtype(tmp, list(onnx_files.values()))
        c.q_formats["onnx"] = {"weight_bytes_fp32": before, "weight_bytes": after,
                               **({"group_size": group} if quant == "int4" else {}),
                               "graphs": reports}
    for fmt, rec in c.q_formats.items():
        before = rec["weight_bytes_fp32"]
        after = sum(rec["weight_bytes"].values()) if "weight_bytes" in rec else rec["file_bytes"]
        if fmt == "pte":  # the program file holds more than weights: no ratio
            c.say(f"      quantized pte ({quant}): program file {after / 1e6:.2f} MB "
                  f"(fp32 weights {before / 1e6:.2f} MB)")
        else:
            c.say(f"      quantized {fmt} ({quant}): weights {before / 1e6:.2f} MB -> "
                  f"{after / 1e6:.2f} MB ({before / max(1, after):.2f}x smaller)")
    floats = keep + (sensitive if quant != "int4" else [])
    if quant == "int8-static":
        c.q_formats["onnx"]["calibration"] = str(c.calibration)
    c.say(f"      kept in float: {', '.join(floats) or 'nothing'}"
          + (f"; int8 (sensitive): {', '.join(sensitive)}" if quant == "int4" and sensitive
             else ""))
    # the group each format used (they may differ: each backend's default) is in its record
    groups = {r["group_size"] for r in c.q_formats.values() if "group_size" in r}
    c.quant_record = {"scheme": quant, "group_size": groups.pop() if len(groups) == 1 else None,
                      "keep_float": floats,
                      "int8_sensitive": sensitive if quant == "int4" else [],
                      "state": "float32 (every state tensor)",
                      "formats": {f: c.q_formats[f] for f in c.formats}}


#: where a bundle keeps the draft bundle shipped inside it
DRAFT_FOLDER = "draft"


def _add_draft(c: _Conversion, tmp: Path, draft: Path) -> None:
    """Copy a converted draft bundle into ``tmp/draft`` once it is known to serve this model
    (same task, vocabulary and tokenizer), with the formats this bundle has."""
    import shutil

    from edgeseq.bundle import read_manifest
    from edgeseq.runtime.speculative.session import check_draft

    dman = read_manifest(draft)
    check_draft(c.out, _manifest(c, None), draft, dman)
    have = {fmt for g in dman.graphs.values() for fmt in g.files}
    missing = [f for f in c.formats if FORMATS[f] not in have and f not in have]
    if missing:
        raise BundleError(f"{draft}: the draft has no {', '.join(missing)} graphs; convert it "
                          f"with the target's formats")
    shutil.copytree(draft, tmp / DRAFT_FOLDER, symlinks=False)
    c.draft = {"path": DRAFT_FOLDER, "recipe": "draft"}


def _write_manifest(c: _Conversion, tmp: Path, early_exit: int | None,
                    draft_loop: int | None) -> Manifest:
    manifest = _manifest(c, c.quant_record or (FP16_NOTE if c.dtype == "fp16" else None))
    manifest.draft = c.draft
    if early_exit is not None:
        manifest.config["early_exit_layers"] = int(early_exit)
    if draft_loop is not None:
        manifest.config["draft_loop_tokens"] = int(draft_loop)
    write_json(tmp / "manifest.json", manifest.to_json())
    c.say("[3/5] manifest written")
    return manifest


def _gates(c: _Conversion, tmp: Path, manifest: Manifest, eval_file: str | Path | None,
           max_drop: float | None) -> dict[str, Any]:
    """A quantized bundle: the task's accuracy gate per format, against the fp32 model."""
    gate = c.task.part("gate")
    parity: dict[str, Any] = {"dtype": c.dtype, "checks": [], "quantization": c.quant,
                              "gates": {}}
    for fmt in c.formats:
        c.say(f"[4/5] accuracy gate: {fmt} {c.quant} against the fp32 model ...")
        try:
            res = gate(c.family, c.model, tmp, FORMATS[fmt], c.tokenizer, manifest.config,
                       eval_file=eval_file, max_drop=max_drop)
        except (ValueError, OSError) as e:
            raise BundleError(str(e)) from None
        parity["gates"][fmt] = res
        parity["checks"].append({"format": fmt, **res})
        c.say(f"      {fmt:5s} " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                                            if isinstance(v, float))
              + f" -> {'ok' if res['passed'] else 'FAILED'}")
    parity["passed"] = all(g["passed"] for g in parity["checks"])
    return parity


def _parity(c: _Conversion, tmp: Path, manifest: Manifest, reference: Any, parity_tokens: int,
            early_exit: int | None, draft_loop: int | None) -> dict[str, Any]:
    """A float bundle: the task's parity check per format, then the drafting graphs'."""
    parity: dict[str, Any] = {"dtype": c.dtype, "checks": []}
    backends = {fmt: FORMATS[fmt] for fmt in c.formats}
    ref = c.task.part("parity").check(tmp, backends, reference, c.dtype, manifest.config,
                                      parity_tokens, parity, c.say)
    parity["passed"] = all(g["passed"] for g in parity["checks"])
    if "exit_step" in c.graphs:
        from edgeseq.convert.parity import check_graph_module

        parity.setdefault("graph_checks", [])
        for fmt, backend in backends.items():
            rec = check_graph_module(tmp, backend, c.graphs["exit_step"])
            parity["graph_checks"].append({"format": fmt, **rec})
            c.say(f"      {fmt:5s} exit_step (first {early_exit} layers) against its PyTorch "
                  f"module: max |dlogits| {rec['logits_max_abs_err']:.2e} -> "
                  f"{'ok' if rec['passed'] else 'FAILED'}")
    if "draft_loop" in c.graphs:
        from edgeseq.convert.parity import check_draft_loop

        parity.setdefault("graph_checks", [])
        for fmt, backend in backends.items():
            rec = check_draft_loop(tmp, backend, ref)
            parity["graph_checks"].append({"format": fmt, **rec})
            c.say(f"      {fmt:5s} draft_loop ({draft_loop} tokens in one call): tokens "
                  f"identical to the reference: {rec['tokens_identical']}, max |dstate| "
                  f"{rec['state_max_abs_err']:.2e} -> {'ok' if rec['passed'] else 'FAILED'}")
    if parity.get("graph_checks"):
        parity["passed"] = all(g["passed"] for g in parity["checks"] + parity["graph_checks"])
    return parity


def _write(c: _Conversion, tmp: Path, manifest: Manifest, parity: dict[str, Any],
           skip_parity: bool, force: bool) -> None:
    """``parity.json`` and the final manifest (every file's size and hash), or the failure."""
    parity["cost"] = conversion_cost(c.t0)
    write_json(tmp / "parity.json", parity)
    # the bundle is complete: record every file's size and hash (checked at load)
    manifest.files = file_records(tmp)
    write_json(tmp / "manifest.json", manifest.to_json())
    if not skip_parity and not parity["passed"] and not force:
        if c.quant is not None:
            raise ConversionError(
                f"{c.src_label}: --quant {c.quant} failed its accuracy gate: "
                + "; ".join(f"{fmt}: {_gate_summary(g)}" for fmt, g in parity["gates"].items()
                            if not g["passed"])
                + "; keep more layers in float (--keep), use a milder scheme, raise "
                  "--max-drop, or --force to write it anyway")
        failed = [g["format"] + (f" ({g['graph']})" if "graph" in g else "")
                  for g in parity["checks"] + parity.get("graph_checks", [])
                  if not g["passed"]]
        raise ConversionError(f"{c.src_label}: parity failed on {', '.join(failed)} (see the "
                              f"errors above; --force writes the bundle anyway)")
    cost = conversion_cost(c.t0)
    # a child is named only when its mark exceeds ours: a helper forked from this process
    # (ExecuTorch runs flatc) counts the pages it shared with us at the fork
    child = cost["children_peak_rss_bytes"]
    c.say(f"[5/5] wrote {c.out} in {cost['wall_s']:.1f}s, peak memory "
          f"{cost['peak_rss_bytes'] / 2**20:.0f} MiB (RSS high-water mark"
          + (f"; a child process {child / 2**20:.0f} MiB"
             if child > cost["peak_rss_bytes"] else "") + ")")


def conversion_cost(t0: float) -> dict[str, Any]:
    """Wall time since ``t0`` (``time.perf_counter``) and peak memory: this process's resident
    high-water mark (VmHWM; for ``edgeseq convert`` the conversion's own, for a library call the
    calling process's) and the largest finished child process's (0 when there was none; a
    forked child's mark includes the pages it shares with this process, so the two do not add)."""
    import resource

    from edgeseq.runtime.profile import _rss

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB; bytes on macOS
    return {"wall_s": round(time.perf_counter() - t0, 3), "peak_rss_bytes": _rss("VmHWM"),
            "children_peak_rss_bytes": int(children * (1 if sys.platform == "darwin" else 1024))}
