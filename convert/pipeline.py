"""``edgeseq convert``: load -> build graphs -> lower per backend -> parity -> write bundle.

The bundle is written into a temporary folder beside the destination and renamed into place only
when every step, parity included, has succeeded: a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import functools
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from edgeseq import generation, tokenize, zoo
from edgeseq.bundle import (BundleError, GraphEntry, Manifest, atomic_folder, file_records,
                            record_converted, sha256_of, write_json)
from edgeseq.checkpoint import (checkpoint_folder, read_config, source_files, stored_dtype,
                                 weight_files)
from edgeseq.convert.workers import Beside
from edgeseq.families.base import detect_family
from edgeseq.registry import formats, get_backend

FORMATS = formats()        # {format: backend}, as the backend classes declare them
ALL_FORMATS = tuple(FORMATS)
DTYPES = ("fp32", "fp16")
# What --dtype fp16 means per format; state stays fp32 at every graph's interface.
FP16_NOTE = {"scheme": "fp16",
             "onnx": "fp16 weights (>= 1024 elements), fp32 compute and state",
             "pte": "fp16 weights and compute (XNNPACK), fp32 state at the interface",
             "pt2": "fp16 weights and compute, fp32 state at the interface"}

Progress = Callable[[str], None]


def _decoder_room(config: dict[str, Any]) -> int:
    """How many new tokens the decoder's cache and position table allow."""
    caps = [c for c in (config.get("max_target_len"), config.get("max_target_positions")) if c]
    return (min(caps) if caps else 1 << 30) - len(config.get("decoder_prompt", [0]))


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


def _manifest(family: Any, graphs: dict[str, Any], files: dict[str, dict[str, str]],
              src_label: str, src: Path, weights: list[Path], tok_spec: Any, dtype: str,
              target: str, config: dict[str, Any], quantization: Any) -> Manifest:
    return Manifest(
        family=family.name, task=family.task,
        source={"path": src_label, "sha256": sha256_of(source_files(src)),
                "files": [w.name for w in weights],
                # what the checkpoint held; the graphs and parity use it upcast to float32
                "dtype": stored_dtype(src)},
        graphs={name: GraphEntry(name, g.inputs, g.outputs, g.state, files[name], g.max_chunk)
                for name, g in graphs.items()},
        tokenizer=tok_spec, dtype=dtype, target=target,
        config=dict(config), quantization=quantization)


def _seq2seq_tokens(config: dict[str, Any], parity_tokens: int) -> int:
    """Tokens an encoder-decoder's parity compares: at most 32 (each is a beam-search step)."""
    return min(parity_tokens, 32, _decoder_room(config))


def _reference_job(family: Any, model: Any, tokenizer: Any, config: dict[str, Any],
                   parity_tokens: int) -> Callable[[], Any]:
    """What the original model answers on the parity inputs (``edgeseq.convert.parity``), as a
    job that needs nothing of the bundle, so it can run while the graphs are lowered."""
    from edgeseq.convert import parity

    if family.task == "classification":
        return functools.partial(parity.reference_classifier, family, model)
    if family.task in ("seq2seq", "speech_seq2seq"):
        source = family.parity_source(model, tokenizer)
        return functools.partial(parity.reference_seq2seq, family, model, source,
                                 _seq2seq_tokens(config, parity_tokens))
    prompt = parity.default_prompt(tokenizer, config["vocab_size"])
    return functools.partial(parity.reference_run, family, model, prompt, parity_tokens)


class ConversionError(BundleError):
    """Conversion failed (parity included); nothing was written."""


def convert(src: str | Path, out: str | Path, formats: tuple[str, ...] = ALL_FORMATS,
            dtype: str = "fp32", parity_tokens: int = 64, overwrite: bool = False,
            skip_parity: bool = False, force: bool = False, target: str = "host",
            max_target_len: int | None = None, quant: str | None = None, group_size: int = 32,
            keep: list[str] | None = None, quantize_all: bool = False,
            eval_file: str | Path | None = None, max_drop: float | None = None,
            calibration: str | Path | None = None, early_exit: int | None = None,
            draft_loop: int | None = None, progress: Progress | None = None) -> Path:
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
    Returns:
        The bundle folder.
    Raises:
        BundleError: bad input (missing path, unsupported architecture, corrupt or unsafe weights).
        ConversionError: a backend failed to lower or parity failed.
    """
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    src_label = str(src)
    src = zoo.resolve(src)
    if isinstance(formats, str):   # "onnx" would iterate as letters
        formats = (formats,)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise BundleError(f"--format: unknown format {bad[0]!r}; known: {', '.join(FORMATS)}, all")
    # a bundle without graphs would convert, check nothing and report parity "passed"
    if not formats:
        raise BundleError(f"--format: no format given; known: {', '.join(FORMATS)}, all")
    formats = tuple(dict.fromkeys(formats))
    if dtype not in DTYPES:
        raise BundleError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: already exists (use --overwrite to replace it)")

    config = read_config(src)
    family = detect_family(config, src)
    weights = weight_files(src)
    say(f"[1/5] loading {src_label} ({family.name}, {sum(w.stat().st_size for w in weights) / 1e6:.1f} MB)")
    seq2seq = family.task in ("seq2seq", "speech_seq2seq")
    if max_target_len is not None and not seq2seq:
        raise BundleError(f"{src_label}: --max-target-len applies to encoder-decoder models; "
                          f"{family.name} has no attention cache")
    opts = {"max_target_len": max_target_len} if seq2seq else {}
    if quant is not None:
        keep, sensitive = _check_quant(quant, formats, dtype, family, keep, quantize_all,
                                       calibration)
    model = family.load(src)
    # a generation rule the runtime would not apply as transformers does: refused by name
    generation.check(model, src, family)
    graphs = family.graphs(model, **opts)
    if early_exit is not None:
        if not hasattr(family, "exit_graph"):
            raise BundleError(f"{src_label}: --early-exit applies to generating models; "
                              f"{family.name} ({family.task}) does not generate")
        graphs["exit_step"] = family.exit_graph(model, early_exit, **opts)
    if draft_loop is not None:
        if family.task != "causal_lm":
            raise BundleError(f"{src_label}: --draft-loop applies to causal language models; "
                              f"{family.name} is {family.task}")
        from edgeseq.families.base import draft_loop_from_step

        graphs["draft_loop"] = draft_loop_from_step(graphs["step"], draft_loop)
    folder = checkpoint_folder(src)   # the side files of a checkpoint given as its weights file
    tok_spec = tokenize.detect(folder, config)
    tokenizer = tokenize.load(folder, tok_spec)
    model_config = family.model_config(model, **opts)
    # the original model's reference outputs, computed while the graphs are lowered
    reference = None if skip_parity or quant is not None else Beside(
        _reference_job(family, model, tokenizer, model_config, parity_tokens))

    with atomic_folder(out, overwrite=overwrite) as tmp, reference or nullcontext():
        files: dict[str, dict[str, str]] = {name: {} for name in graphs}
        q_formats: dict[str, Any] = {}
        for i, fmt in enumerate(formats):
            backend = get_backend(FORMATS[fmt])
            why = backend.available()
            if why:
                raise ConversionError(f"cannot write {fmt}: {why}")
            t = time.perf_counter()
            say(f"[2/5] lowering to {fmt} ({i + 1}/{len(formats)}) ...")
            try:
                if quant is not None and fmt == "pte":
                    from edgeseq.runtime.backends.executorch.quantize import float_weight_bytes

                    qgraphs, reports = backend.quantize_graphs(graphs, quant, keep, group_size,
                                                               sensitive)
                    written = backend.lower(qgraphs, tmp, dtype, quantized=True)
                    q_formats["pte"] = {"weight_bytes_fp32": float_weight_bytes(graphs),
                                        "file_bytes": (tmp / written[next(iter(written))]).stat().st_size,
                                        "graphs": reports}
                    del qgraphs
                else:
                    written = backend.lower(graphs, tmp, dtype)
            except ValueError as e:
                raise ConversionError(f"{src_label}: cannot lower to {fmt}: {e}") from None
            for name, f in written.items():
                files[name][fmt] = f
            say(f"      {fmt}: {', '.join(sorted(set(written.values())))} "
                f"in {time.perf_counter() - t:.1f}s")
        tokenize.copy_files(folder, tok_spec, tmp)
        quant_record = None
        if quant is not None:
            if "onnx" in formats:
                from edgeseq.runtime.cost import weight_bytes_by_dtype

                onnx_files = {name: f["onnx"] for name, f in files.items()}
                before = sum(weight_bytes_by_dtype(tmp, list(onnx_files.values())).values())
                if quant == "int8-static":
                    from edgeseq.quant.static import calibration_feeds, quantize_static_bundle

                    # the fp32 graphs stream the calibration data once, with a provisional
                    # manifest, and every call is recorded
                    say(f"      calibrating activation ranges on {calibration} ...")
                    write_json(tmp / "manifest.json", _manifest(
                        family, graphs, files, src_label, src, weights, tok_spec, dtype,
                        target, model_config, None).to_json())
                    feeds = calibration_feeds(family, model, tmp, family.task, Path(calibration),
                                              tokenizer)
                    reports = quantize_static_bundle(tmp, onnx_files, feeds, keep + sensitive)
                else:
                    reports = get_backend(FORMATS["onnx"]).quantize_files(
                        tmp, onnx_files, quant, keep, group_size, sensitive)
                after = weight_bytes_by_dtype(tmp, list(onnx_files.values()))
                q_formats["onnx"] = {"weight_bytes_fp32": before, "weight_bytes": after,
                                     "graphs": reports}
            for fmt, rec in q_formats.items():
                before = rec["weight_bytes_fp32"]
                after = sum(rec["weight_bytes"].values()) if "weight_bytes" in rec else rec["file_bytes"]
                if fmt == "pte":  # the program file holds more than weights: no ratio
                    say(f"      quantized pte ({quant}): program file {after / 1e6:.2f} MB "
                        f"(fp32 weights {before / 1e6:.2f} MB)")
                else:
                    say(f"      quantized {fmt} ({quant}): weights {before / 1e6:.2f} MB -> "
                        f"{after / 1e6:.2f} MB ({before / max(1, after):.2f}x smaller)")
            floats = keep + (sensitive if quant != "int4" else [])
            if quant == "int8-static":
                q_formats["onnx"]["calibration"] = str(calibration)
            say(f"      kept in float: {', '.join(floats) or 'nothing'}"
                + (f"; int8 (sensitive): {', '.join(sensitive)}" if quant == "int4" and sensitive
                   else ""))
            quant_record = {"scheme": quant, "group_size": group_size if "int4" in quant else None,
                            "keep_float": floats,
                            "int8_sensitive": sensitive if quant == "int4" else [],
                            "state": "float32 (every state tensor)",
                            "formats": {f: q_formats[f] for f in formats}}
        manifest = _manifest(family, graphs, files, src_label, src, weights, tok_spec,
                             dtype, target, model_config,
                             quant_record or (FP16_NOTE if dtype == "fp16" else None))
        if early_exit is not None:
            manifest.config["early_exit_layers"] = int(early_exit)
        if draft_loop is not None:
            manifest.config["draft_loop_tokens"] = int(draft_loop)
        write_json(tmp / "manifest.json", manifest.to_json())
        say("[3/5] manifest written")

        parity: dict[str, Any] = {"dtype": dtype, "checks": []}
        if skip_parity:
            parity["skipped"] = True
            say("[4/5] parity skipped (--skip-parity)")
        elif quant is not None:
            from edgeseq.quant import gates

            parity.update({"quantization": quant, "gates": {}})
            for fmt in formats:
                say(f"[4/5] accuracy gate: {fmt} {quant} against the fp32 model ...")
                try:
                    if family.task == "classification":
                        res = gates.classifier_gate(family, model, tmp, FORMATS[fmt], eval_file,
                                                    max_drop)
                    elif seq2seq:
                        res = gates.seq2seq_gate(family, model, tmp, FORMATS[fmt], eval_file,
                                                 max_drop)
                    else:
                        res = gates.lm_gate(family, model, tmp, FORMATS[fmt], tokenizer,
                                            manifest.config["vocab_size"], eval_file=eval_file,
                                            max_drop=max_drop)
                except (ValueError, OSError) as e:
                    raise BundleError(str(e)) from None
                parity["gates"][fmt] = res
                parity["checks"].append({"format": fmt, **res})
                say(f"      {fmt:5s} " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                                                if isinstance(v, float))
                    + f" -> {'ok' if res['passed'] else 'FAILED'}")
            parity["passed"] = all(c["passed"] for c in parity["checks"])
        elif family.task == "classification":
            from edgeseq.convert.parity import check_classifier_bundle

            ref = reference.result()
            n, frames = ref.inputs.shape[:2]
            say(f"[4/5] parity: running predictions of {n} sequences x {frames} frames, "
                f"in chunks and frame by frame ...")
            for fmt in formats:
                rec = check_classifier_bundle(tmp, FORMATS[fmt], ref, dtype)
                parity["checks"].append({"format": fmt, **rec})
                say(f"      {fmt:5s} predictions identical: {rec['predictions_identical']}, "
                    f"max |dlogits| {rec['running_logits_max_abs_err']:.2e} -> "
                    f"{'ok' if rec['passed'] else 'FAILED'}")
            parity["passed"] = all(c["passed"] for c in parity["checks"])
        elif seq2seq:
            from edgeseq.convert.parity import check_seq2seq_bundle

            say(f"[4/5] parity: reference greedy and {4}-beam search "
                f"({_seq2seq_tokens(manifest.config, parity_tokens)} tokens) ...")
            ref = reference.result()
            parity["reference_tokens"] = ref.reference_tokens
            parity["reference_beam_tokens"] = ref.beam_tokens
            for fmt in formats:
                rec = check_seq2seq_bundle(tmp, FORMATS[fmt], ref, dtype)
                parity["checks"].append({"format": fmt, **rec})
                say(f"      {fmt:5s} greedy identical: {rec['tokens_identical']} "
                    f"({rec['tokens_compared']}), 4-beam identical: "
                    f"{rec['beam_tokens_identical']}, max |dlogits| step "
                    f"{rec['step_logits_max_abs_err']:.2e} -> {'ok' if rec['passed'] else 'FAILED'}")
            parity["passed"] = all(c["passed"] for c in parity["checks"])
        else:
            from edgeseq.convert.parity import check_bundle

            say(f"[4/5] parity: reference greedy ({parity_tokens} tokens) ...")
            ref = reference.result()
            parity["prompt"] = ref.prompt
            parity["reference_tokens"] = ref.reference_tokens
            for fmt in formats:
                rec = check_bundle(tmp, FORMATS[fmt], ref, dtype)
                parity["checks"].append({"format": fmt, **rec})
                say(f"      {fmt:5s} tokens identical: {rec['tokens_identical']} "
                    f"({rec['tokens_compared']}), max |dlogits| prefill "
                    f"{rec['prefill_logits_max_abs_err']:.2e} step "
                    f"{rec['step_logits_max_abs_err']:.2e} -> {'ok' if rec['passed'] else 'FAILED'}")
            parity["passed"] = all(c["passed"] for c in parity["checks"])
        if "exit_step" in graphs and not skip_parity and quant is None:
            from edgeseq.convert.parity import check_graph_module

            parity.setdefault("graph_checks", [])
            for fmt in formats:
                rec = check_graph_module(tmp, FORMATS[fmt], graphs["exit_step"])
                parity["graph_checks"].append({"format": fmt, **rec})
                say(f"      {fmt:5s} exit_step (first {early_exit} layers) against its PyTorch "
                    f"module: max |dlogits| {rec['logits_max_abs_err']:.2e} -> "
                    f"{'ok' if rec['passed'] else 'FAILED'}")
        if "draft_loop" in graphs and not skip_parity and quant is None:
            from edgeseq.convert.parity import check_draft_loop

            parity.setdefault("graph_checks", [])
            for fmt in formats:
                rec = check_draft_loop(tmp, FORMATS[fmt], ref)
                parity["graph_checks"].append({"format": fmt, **rec})
                say(f"      {fmt:5s} draft_loop ({draft_loop} tokens in one call): tokens "
                    f"identical to the reference: {rec['tokens_identical']}, max |dstate| "
                    f"{rec['state_max_abs_err']:.2e} -> {'ok' if rec['passed'] else 'FAILED'}")
        if parity.get("graph_checks"):
            parity["passed"] = all(c["passed"] for c in parity["checks"] + parity["graph_checks"])
        parity["cost"] = conversion_cost(t0)
        write_json(tmp / "parity.json", parity)
        # the bundle is complete: record every file's size and hash (checked at load)
        manifest.files = file_records(tmp)
        write_json(tmp / "manifest.json", manifest.to_json())
        if not skip_parity and not parity["passed"] and not force:
            if quant is not None:
                raise ConversionError(
                    f"{src_label}: --quant {quant} failed its accuracy gate: "
                    + "; ".join(f"{fmt}: {_gate_summary(g)}" for fmt, g in parity["gates"].items()
                                if not g["passed"])
                    + "; keep more layers in float (--keep), use a milder scheme, raise "
                      "--max-drop, or --force to write it anyway")
            failed = [c["format"] + (f" ({c['graph']})" if "graph" in c else "")
                      for c in parity["checks"] + parity.get("graph_checks", [])
                      if not c["passed"]]
            raise ConversionError(f"{src_label}: parity failed on {', '.join(failed)} (see the "
                                  f"errors above; --force writes the bundle anyway)")
        cost = conversion_cost(t0)
        # a child is named only when its mark exceeds ours: a helper forked from this process
        # (ExecuTorch runs flatc) counts the pages it shared with us at the fork
        child = cost["children_peak_rss_bytes"]
        say(f"[5/5] wrote {out} in {cost['wall_s']:.1f}s, peak memory "
            f"{cost['peak_rss_bytes'] / 2**20:.0f} MiB (RSS high-water mark"
            + (f"; a child process {child / 2**20:.0f} MiB"
               if child > cost["peak_rss_bytes"] else "") + ")")
    record_converted(out)
    return out


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
