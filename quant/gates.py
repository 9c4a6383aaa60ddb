"""Accuracy gates: what quantization cost, measured at convert time against the fp32 model.

* Language models: teacher-forced over a held-out token sequence (default: the Zen of Python,
  ``this.s`` decoded, repeated to ``tokens``; or the user's ``--eval`` text file), fed as a
  short prefill and then one token per ``step`` call, so the recurrent state runs the whole
  stream. Metrics: next-token agreement (argmax equal to the fp32 model's) and the mean
  KL(fp32 || quantized) of the next-token distributions, plus the same two over the last quarter
  of the stream (drift of the state shows there first).
* Encoder-decoders: greedy outputs of the quantized bundle against the fp32 model's on held-out
  sources (default: the lines of the Zen of Python for text models, deterministic chirps for
  speech; or the user's ``--eval`` file: one source per line, a text or a WAV path, optionally
  ``<TAB>`` and its reference output). Metrics: exact match with the fp32 output and the
  character error rate (CER) against it; with references also both models' exact match and CER
  against them.
* Classifiers: predictions of the quantized bundle against the fp32 model on the family's parity
  sequences or the user's ``--eval`` ``.npz`` (``x`` (n, frames, features), optional ``y``):
  agreement, and accuracy against ``y`` when given.

Each task's gate is one of the three (``edgeseq/tasks/<task>.py`` names it) and is called as
``gate(family, model, bundle, backend, tokenizer, config, eval_file, max_drop)``; the default
``max_drop`` is the task's (``Task.max_drop``).

A gate passes when agreement (exact match for encoder-decoders) >= 1 - max_drop (and accuracy
>= fp32 accuracy - max_drop), the mean KL <= ``max_kl`` and the CER <= ``max_cer`` (with
references: the CER rises by at most ``max_cer``).
"""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAX_KL = 0.10
DEFAULT_MAX_CER = 0.05
DEFAULT_TOKENS = 1024
PREFILL = 16


def held_out_text() -> str:
    """The Zen of Python, read from ``this.py``'s rot13 string (importing ``this`` prints it)."""
    import ast
    import importlib.util

    path = importlib.util.find_spec("this").origin
    tree = ast.parse(Path(path).read_text())
    s = next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
             and getattr(n.targets[0], "id", "") == "s")
    return codecs.decode(s, "rot13")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _max_drop(family: Any, max_drop: float | None) -> float:
    from edgeseq.registry import get_task

    return get_task(family.task).max_drop if max_drop is None else max_drop


def lm_gate(family: Any, model: Any, bundle: Path, backend: str, tokenizer: Any,
            config: dict[str, Any], eval_file: Path | None = None,
            max_drop: float | None = None, tokens: int = DEFAULT_TOKENS,
            max_kl: float = DEFAULT_MAX_KL) -> dict[str, Any]:
    import torch

    from edgeseq.runtime.session import load

    if eval_file is not None:
        text = Path(eval_file).read_text(encoding="utf-8", errors="replace")
        source = f"{eval_file}"
    else:
        text, source = held_out_text(), "the Zen of Python (this.s), repeated"
    if tokenizer is not None:
        ids = tokenizer.encode(text)
    else:
        ids = np.random.default_rng(0).integers(0, config["vocab_size"], tokens).tolist()
        source = "random token ids (the bundle has no tokenizer)"
    if not ids:
        raise ValueError(f"{source}: no tokens to evaluate on")
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    with torch.no_grad():
        ref = family.reference_logits(model, torch.tensor([ids]))[0].float().numpy()
    sess = load(bundle, backend=backend)
    got = np.empty_like(ref)
    got[:PREFILL] = sess.prefill(np.array([ids[:PREFILL]], dtype=np.int64))[0]
    for i in range(PREFILL, len(ids)):
        got[i] = sess.step(np.array([ids[i]], dtype=np.int64))[0]
    lp, lq = _log_softmax(ref.astype(np.float64)), _log_softmax(got.astype(np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    agree = ref.argmax(-1) == got.argmax(-1)
    tail = slice(3 * len(ids) // 4, None)
    drop = _max_drop(family, max_drop)
    res = {"metric": "next-token agreement and KL(fp32 || quantized)", "data": source,
           "tokens": len(ids), "agreement": float(agree.mean()), "kl_mean": float(kl.mean()),
           "agreement_last_quarter": float(agree[tail].mean()),
           "kl_mean_last_quarter": float(kl[tail].mean()), "max_drop": drop, "max_kl": max_kl}
    res["passed"] = bool(res["agreement"] >= 1 - drop and res["agreement_last_quarter"] >= 1 - drop
                         and res["kl_mean"] <= max_kl and res["kl_mean_last_quarter"] <= max_kl)
    return res


def classifier_gate(family: Any, model: Any, bundle: Path, backend: str, tokenizer: Any,
                    config: dict[str, Any], eval_file: Path | None = None,
                    max_drop: float | None = None) -> dict[str, Any]:
    import torch

    from edgeseq.runtime.session import load

    y = None
    if eval_file is not None:
        try:
            data = np.load(eval_file, allow_pickle=False)
            x = np.asarray(data["x"], dtype=np.float32)
            y = np.asarray(data["y"]) if "y" in data else None
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{eval_file}: expected an .npz with x (n, frames, features) and "
                             f"optionally y (n,) ({e})") from None
        source = str(eval_file)
    else:
        x = family.parity_inputs(model, n=32, seed=1).numpy()
        source = "32 random sequences (the family's parity inputs)"
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().argmax(-1)
    from edgeseq.registry import get_backend

    sess = load(bundle, backend=backend)
    rows = get_backend(backend).max_batch or len(x)
    preds = []
    for i in range(0, len(x), rows):
        sess.reset(len(x[i:i + rows]))
        sess.push(x[i:i + rows])
        sess.finish()
        preds.append(sess.running()[:, -1].argmax(-1))
    pred = np.concatenate(preds)
    drop = _max_drop(family, max_drop)
    res = {"metric": "prediction agreement with fp32" + (" and accuracy" if y is not None else ""),
           "data": source, "sequences": int(len(x)), "agreement": float((pred == ref).mean()),
           "max_drop": drop}
    ok = res["agreement"] >= 1 - drop
    if y is not None:
        res["accuracy_fp32"] = float((ref == y).mean())
        res["accuracy"] = float((pred == y).mean())
        ok = ok and res["accuracy"] >= res["accuracy_fp32"] - drop
    res["passed"] = bool(ok)
    return res


def edit_distance(a: Any, b: Any) -> int:
    """Levenshtein distance between two sequences (characters or tokens)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _cer(hyps: list[Any], refs: list[Any]) -> float:
    return sum(edit_distance(h, r) for h, r in zip(hyps, refs)) / max(1, sum(len(r) for r in refs))


def seq2seq_sources(family: Any, model: Any, sess: Any, eval_file: Path | None
                     ) -> tuple[list[Any], list[str | None], str]:
    """Held-out sources (ids or log-mel features) and their references (or None)."""
    if eval_file is None:
        if sess.speech:
            return ([family.parity_source(model, None, seed=i) for i in range(4)], [None] * 4,
                    "4 deterministic chirps with noise (the family's parity sources)")
        if sess.tokenizer is not None:
            lines = [ln for ln in held_out_text().splitlines() if ln.strip()]
            return ([sess.encode_text(ln) for ln in lines], [None] * len(lines),
                    f"the {len(lines)} lines of the Zen of Python")
        srcs = [family.parity_source(model, None, seed=i) for i in range(16)]
        return srcs, [None] * len(srcs), "16 random sources (the bundle has no tokenizer)"
    path = Path(eval_file)
    rows = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{path}: no sources (one per line, optionally <TAB> reference)")
    sources, refs = [], []
    for ln in rows:
        src, _, ref = ln.partition("\t")
        if sess.speech:
            from edgeseq import audio

            cfg = sess.config.get("audio") or {}
            window = float(cfg.get("window_seconds", audio.CHUNK_SECONDS))
            wav = Path(src) if Path(src).is_absolute() else path.parent / src
            samples = audio.read_wav(wav)[:audio.samples_for(window)]
            sources.append(audio.log_mel_spectrogram(samples, n_mels=int(cfg.get("n_mels", 80)),
                                                     n_frames=audio.frames_for(window)))
        else:
            sources.append(sess.encode_text(src))
        refs.append(ref if ref else None)
    return sources, refs, str(path)


def seq2seq_gate(family: Any, model: Any, bundle: Path, backend: str, tokenizer: Any,
                 config: dict[str, Any], eval_file: Path | None = None,
                 max_drop: float | None = None, max_cer: float = DEFAULT_MAX_CER,
                 max_new_tokens: int = 48) -> dict[str, Any]:
    from edgeseq.runtime.session import load

    sess = load(bundle, backend=backend)
    sources, refs, data = seq2seq_sources(family, model, sess, eval_file)
    n_new = max(1, min(max_new_tokens, sess.max_new_tokens_cap()))
    ref_toks, got_toks = [], []
    for src in sources:
        ref_toks.append(family.reference_generate(model, src, n_new))
        got_toks.append(list(sess.generate(np.asarray(src), n_new, num_beams=1,
                                           do_sample=False)))
    text = sess.tokenizer is not None
    # decode() drops EOS/pad/start ids (generate() keeps the EOS, transformers' Whisper does not)
    decode = (lambda t: sess.decode(t)) if text else (lambda t: sess.decode(t).split())
    ref_out, got_out = [decode(t) for t in ref_toks], [decode(t) for t in got_toks]
    drop = _max_drop(family, max_drop)
    res: dict[str, Any] = {
        "metric": "greedy output vs fp32: exact match and " + ("CER" if text else "token error rate"),
        "data": data, "sources": len(sources),
        "exact_match": float(np.mean([a == b for a, b in zip(ref_out, got_out)])),
        "cer": float(_cer(got_out, ref_out)), "max_drop": drop, "max_cer": max_cer}
    res["agreement"] = res["exact_match"]
    ok = res["exact_match"] >= 1 - drop and res["cer"] <= max_cer
    pairs = [(r, a, b) for r, a, b in zip(refs, ref_out, got_out) if r is not None]
    if pairs and text:
        res["exact_match_target_fp32"] = float(np.mean([a.strip() == r.strip() for r, a, _ in pairs]))
        res["exact_match_target"] = float(np.mean([b.strip() == r.strip() for r, _, b in pairs]))
        res["cer_target_fp32"] = float(_cer([a for _, a, _ in pairs], [r for r, _, _ in pairs]))
        res["cer_target"] = float(_cer([b for _, _, b in pairs], [r for r, _, _ in pairs]))
        # against references the quantized model may only be a little worse than fp32
        ok = (res["exact_match_target"] >= res["exact_match_target_fp32"] - drop
              and res["cer_target"] <= res["cer_target_fp32"] + max_cer)
    res["passed"] = bool(ok)
    return res
