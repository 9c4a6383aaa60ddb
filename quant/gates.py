"""Accuracy gates: what quantization cost, measured at convert time against the fp32 model.

* Language models: teacher-forced over a held-out token sequence (default: the Zen of Python,
  ``this.s`` decoded, repeated to ``tokens``; or the user's ``--eval`` text file), fed as a
  short prefill and then one token per ``step`` call, so the recurrent state runs the whole
  stream. Metrics: next-token agreement (argmax equal to the fp32 model's) and the mean
  KL(fp32 || quantized) of the next-token distributions, plus the same two over the last quarter
  of the stream (drift of the state shows there first).
* Classifiers: predictions of the quantized bundle against the fp32 model on the family's parity
  sequences or the user's ``--eval`` ``.npz`` (``x`` (n, frames, features), optional ``y``):
  agreement, and accuracy against ``y`` when given.

A gate passes when agreement >= 1 - max_drop (and accuracy >= fp32 accuracy - max_drop), and
the mean KL <= ``max_kl``.
"""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAX_DROP = {"causal_lm": 0.10, "classification": 0.02}
DEFAULT_MAX_KL = 0.10
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


def lm_gate(family: Any, model: Any, bundle: Path, backend: str, tokenizer: Any,
            vocab_size: int, tokens: int = DEFAULT_TOKENS, eval_file: Path | None = None,
            max_drop: float | None = None, max_kl: float = DEFAULT_MAX_KL) -> dict[str, Any]:
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
        ids = np.random.default_rng(0).integers(0, vocab_size, tokens).tolist()
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
    drop = DEFAULT_MAX_DROP["causal_lm"] if max_drop is None else max_drop
    res = {"metric": "next-token agreement and KL(fp32 || quantized)", "data": source,
           "tokens": len(ids), "agreement": float(agree.mean()), "kl_mean": float(kl.mean()),
           "agreement_last_quarter": float(agree[tail].mean()),
           "kl_mean_last_quarter": float(kl[tail].mean()), "max_drop": drop, "max_kl": max_kl}
    res["passed"] = bool(res["agreement"] >= 1 - drop and res["agreement_last_quarter"] >= 1 - drop
                         and res["kl_mean"] <= max_kl and res["kl_mean_last_quarter"] <= max_kl)
    return res


def classifier_gate(family: Any, model: Any, bundle: Path, backend: str,
                    eval_file: Path | None = None, max_drop: float | None = None
                    ) -> dict[str, Any]:
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
    sess = load(bundle, backend=backend)
    sess.reset(len(x))
    sess.push(x)
    sess.finish()
    pred = sess.running()[:, -1].argmax(-1)
    drop = DEFAULT_MAX_DROP["classification"] if max_drop is None else max_drop
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
