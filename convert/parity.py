"""Parity: every lowered graph against the original PyTorch model, on the same input.

For a causal LM we check (a) the prefill logits of a prompt, (b) the step logits along the
reference's own greedy continuation (so both sides see identical inputs), and (c) that greedy
decoding through the bundle yields exactly the reference library's tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeseq.bundle import read_manifest
from edgeseq.runtime.whisper import source_prompt

PROMPT_TEXT = "def stream(self, chunk):\n    return "
# Max abs logit error (the rule: ``logit_tolerance``). fp32: the largest of 1e-4,
# FP32_RELATIVE x max |logit| and NOISE_FACTOR x the reference's own sensitivity to one-ulp
# rounding (see fp32_noise). Rounding error grows with the logits' magnitude: a trained LM's
# logits reach the hundreds (mamba-130m's ~170), where one fp32 ulp is already 1.5e-5, and a
# kernel that sums in another order or approximates exp/sigmoid (XNNPACK) lands tens of ulps
# away: at the mamba2-130m shape (2 layers, max |logit| 485) ExecuTorch was 5.8e-4 off, 1.2e-6
# of the scale and 4.8x the measured noise. A wrong state or weight moves logits by a visible
# fraction of their range, 1e5 times more. fp16: relative to max |logit|.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
FP32_RELATIVE = 1e-5
NOISE_FACTOR = 4.0


def logit_tolerance(dtype: str, reference_logits: np.ndarray, fp32_noise: float) -> float:
    """The max abs logit error a bundle in ``dtype`` may show against the reference."""
    scale = float(np.abs(reference_logits).max()) if np.size(reference_logits) else 0.0
    if dtype == "fp32":
        return max(TOLERANCE["fp32"], FP32_RELATIVE * scale, NOISE_FACTOR * fp32_noise)
    return TOLERANCE["fp16"] * scale


@dataclass
class ParityInputs:
    prompt: list[int]
    reference_tokens: list[int]
    reference_logits: np.ndarray  # (len(prompt) + n - 1, v): logits after every known token
    fp32_noise: float = 0.0       # max |fp32 reference - float64 reference| on the same input


def reference_run(family: Any, model: Any, prompt: list[int], n_tokens: int) -> ParityInputs:
    import torch

    ids = torch.tensor([prompt], dtype=torch.int64)
    toks = family.reference_greedy(model, ids, n_tokens)[0].tolist()
    full = torch.tensor([prompt + toks[:-1]], dtype=torch.int64)
    logits = family.reference_logits(model, full)[0].numpy()
    noise = fp32_noise(family, model, full, logits)
    return ParityInputs(prompt, toks, logits, noise)


def fp32_noise(family: Any, model: Any, ids: Any, logits: np.ndarray, seed: int = 0) -> float:
    """How far fp32 rounding alone moves this model's logits on this input.

    Every weight is nudged by one fp32 ulp (relative 2**-23, random sign) and the reference is
    run again: the change is the model's amplification of rounding-size perturbations, which is
    what any re-ordering of fp32 arithmetic (an exporter's fused kernels) produces too. (A float64
    run would say the same, but transformers' Mamba path in float64 is impractically slow.)
    """
    import copy

    import torch

    g = torch.Generator().manual_seed(seed)
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        for p in nudged.parameters():
            sign = torch.randint(0, 2, p.shape, generator=g, dtype=torch.int8).to(p.dtype) * 2 - 1
            p.mul_(1 + sign * 2.0 ** -23)
    out = family.reference_logits(nudged, ids)[0].numpy()
    return float(np.abs(out - logits).max())


def default_prompt(tokenizer: Any, vocab_size: int, length: int = 16, seed: int = 0) -> list[int]:
    if tokenizer is not None:
        ids = tokenizer.encode(PROMPT_TEXT)
        if ids and max(ids) < vocab_size:
            return ids
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab_size, size=length).tolist()


def check_bundle(root: Path, backend: str, ref: ParityInputs, dtype: str) -> dict[str, Any]:
    """Run the bundle on one backend against the reference; return the parity record."""
    from edgeseq.runtime.session import load

    sess = load(root, backend=backend, graphs=set(read_manifest(root).graphs))
    p = len(ref.prompt)
    verify_err = _verify_err(sess, ref) if "verify" in sess.model.runners else 0.0
    sess.reset()
    prefill = sess.prefill(np.array([ref.prompt], dtype=np.int64))[0]
    prefill_err = float(np.abs(prefill - ref.reference_logits[:p]).max())
    step_err, last_err = 0.0, prefill_err
    for i, tok in enumerate(ref.reference_tokens[:-1]):
        logits = sess.step(np.array([tok], dtype=np.int64))[0]
        last_err = float(np.abs(logits - ref.reference_logits[p + i]).max())
        step_err = max(step_err, last_err)
    got = sess.generate(ref.prompt, len(ref.reference_tokens), stop_at_eos=False).tolist()
    mismatch = next((i for i, (a, b) in enumerate(zip(got, ref.reference_tokens)) if a != b), None)
    tol = logit_tolerance(dtype, ref.reference_logits, ref.fp32_noise)
    identical = mismatch is None and len(got) == len(ref.reference_tokens)
    passed = max(prefill_err, step_err, verify_err) <= tol and (identical or dtype != "fp32")
    return {
        "backend": backend,
        "verify_logits_max_abs_err": verify_err,
        "prompt_tokens": p,
        "tokens_compared": len(ref.reference_tokens),
        "tokens_identical": identical,
        "first_mismatch": mismatch,
        "prefill_logits_max_abs_err": prefill_err,
        "step_logits_max_abs_err": step_err,
        "last_step_logits_max_abs_err": last_err,
        "tolerance": tol,
        "reference_fp32_noise": ref.fp32_noise,
        "passed": bool(passed),
    }


def _verify_err(sess: Any, ref: ParityInputs) -> float:
    """The ``verify`` graph (speculative decoding) over the reference continuation in chunks
    from the prompt's state, each chunk started from the previous chunk's *traced* state, so the
    per-position states are checked along with the logits."""
    p = len(ref.prompt)
    sess.prefill(np.array([ref.prompt], dtype=np.int64))
    chunk = int(sess.manifest.graphs["verify"].max_chunk or 8)
    toks = ref.reference_tokens[:-1]
    err = 0.0
    for i in range(0, len(toks), chunk):
        ids = np.array([toks[i:i + chunk]], dtype=np.int64)
        out, _ = sess.model.run("verify", {"input_ids": ids}, sess._state)
        err = max(err, float(np.abs(out["logits"][0]
                                    - ref.reference_logits[p + i:p + i + ids.shape[1]]).max()))
        # go on from the traced state before the chunk's last token, then step that token:
        # the next chunk's logits are wrong unless the traces are right
        m = ids.shape[1] - 1
        if m:
            sess._state = sess.model.from_numpy([s.from_trace(out[f"trace.{s.name}"], m - 1)
                                                 for s in sess.model.specs])
            sess.step(ids[:, -1])
        else:
            sess._state = sess.model.from_numpy([s.from_trace(out[f"trace.{s.name}"], 0)
                                                 for s in sess.model.specs])
    return err


def check_graph_module(root: Path, backend: str, graph: Any, seeds: int = 3) -> dict[str, Any]:
    """A graph with no reference in the source library (``exit_step``: a truncated model)
    against its own PyTorch module, on random inputs at batch 1."""
    import torch

    from edgeseq.runtime.session import load

    sess = load(root, backend=backend, graphs={graph.name} | {
        g for g in read_manifest(root).graphs if g in ("prefill", "step", "encoder",
                                                        "decoder_step")})
    vocab = int(read_manifest(root).config["vocab_size"])
    err, scale = 0.0, 1.0
    for seed in range(seeds):
        ex = graph.example_inputs({"batch": 1}, seed=seed, vocab_size=vocab)
        n_in = len(graph.inputs)
        with torch.no_grad():
            want = graph.module(*ex)[0].numpy()
        inputs = {s.name: t.numpy() for s, t in zip(graph.inputs, ex[:n_in])}
        state = sess.model.from_numpy([t.numpy() for t in ex[n_in:]])
        out, _ = sess.model.run(graph.name, inputs, state)
        err = max(err, float(np.abs(out["logits"] - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    tol = TOLERANCE["fp32"] * scale
    return {"backend": backend, "graph": graph.name, "logits_max_abs_err": err,
            "tolerance": tol, "passed": bool(err <= tol)}


def check_draft_loop(root: Path, backend: str, ref: ParityInputs) -> dict[str, Any]:
    """``draft_loop`` from the state after the prompt: its k tokens must be the reference's
    greedy continuation, and its state after each token the one the ``step`` graph reaches."""
    from edgeseq.runtime.session import load

    sess = load(root, backend=backend, graphs={"prefill", "step", "draft_loop"})
    k = int(sess.manifest.graphs["draft_loop"].outputs[0].shape[1])
    sess.reset(1)
    if len(ref.prompt) > 1:
        sess.prefill(np.asarray([ref.prompt[:-1]], dtype=np.int64))
    start = sess.model.to_numpy(sess._state)
    out, _ = sess.model.run("draft_loop", {"input_ids": np.array([ref.prompt[-1]])},
                            sess.model.from_numpy(start))
    toks = [int(t) for t in out["tokens"][0]]
    want = ref.reference_tokens[:k]
    # the step graph along the reference's tokens gives the states the traces must hold
    sess._state = sess.model.from_numpy(start)
    err, scale = 0.0, 1.0
    specs = sess.manifest.graphs["draft_loop"].state
    for i, tok in enumerate([ref.prompt[-1], *want[:-1]][:k]):
        sess.step(np.array([tok]))
        for spec, a in zip(specs, sess.model.to_numpy(sess._state)):
            got = out[f"trace.{spec.name}"][0, i]
            err = max(err, float(np.abs(got - a[0]).max()))
            scale = max(scale, float(np.abs(a).max()))
    tol = TOLERANCE["fp32"] * scale
    same = toks[:len(want)] == want
    return {"backend": backend, "graph": "draft_loop", "tokens": k, "tokens_identical": same,
            "state_max_abs_err": err, "tolerance": tol, "passed": bool(same and err <= tol)}


# -- encoder-decoder models -----------------------------------------------------------------
SEQ2SEQ_BEAMS = 4


@dataclass
class Seq2SeqParityInputs:
    source: Any                     # token ids, or (mel bins, frames) features
    decoder_prompt: list[int]
    reference_tokens: list[int]     # greedy, EOS ignored: exactly n tokens
    reference_logits: np.ndarray    # teacher-forced (len(prompt) + n - 1, v)
    beam_tokens: list[int]          # 4-beam search as transformers' generate returns it
    fp32_noise: float = 0.0


def reference_seq2seq(family: Any, model: Any, source: Any, n_tokens: int
                      ) -> Seq2SeqParityInputs:
    import copy

    import torch

    encoded = family.reference_encoded(model, source)   # the encoder once for four calls
    prompt = family.reference_prompt(model, encoded)
    toks = family.reference_generate(model, encoded, n_tokens, ignore_eos=True)
    dec = prompt + toks[:-1]
    logits = family.reference_logits(model, encoded, dec).numpy()
    beams = family.reference_generate(model, encoded, n_tokens, num_beams=SEQ2SEQ_BEAMS)
    g = torch.Generator().manual_seed(0)
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        for p in nudged.parameters():
            sign = torch.randint(0, 2, p.shape, generator=g, dtype=torch.int8).to(p.dtype) * 2 - 1
            p.mul_(1 + sign * 2.0 ** -23)
    noise = float(np.abs(family.reference_logits(nudged, source, dec).numpy() - logits).max())
    src = source.tolist() if hasattr(source, "tolist") else list(source)
    return Seq2SeqParityInputs(src, prompt, toks, logits, beams, noise)


def check_seq2seq_bundle(root: Path, backend: str, ref: Seq2SeqParityInputs, dtype: str
                         ) -> dict[str, Any]:
    """Decoder-step logits along the reference path, greedy tokens, and 4-beam tokens."""
    from edgeseq.runtime.session import load

    sess = load(root, backend=backend, graphs=set(read_manifest(root).graphs))
    source = np.asarray(ref.source, dtype=np.float32 if sess.speech else np.int64)
    sess.encode(source)
    sess.start(1)
    path = ref.decoder_prompt + ref.reference_tokens[:-1]
    step_err = 0.0
    for i, tok in enumerate(path):
        logits = sess.step(np.array([tok], dtype=np.int64))[0]
        step_err = max(step_err, float(np.abs(logits - ref.reference_logits[i]).max()))
    chunk_err = _chunk_err(sess, path, ref) if "decoder_chunk" in sess.model.runners else 0.0
    step_err = max(step_err, chunk_err)
    # the bundle's own prompt for this source (Whisper: language detection included)
    prompt = source_prompt(sess, source) if sess.speech else None
    # the source stays encoded in the session (encoded above; ``source_prompt`` encodes it
    # again only to detect a language): both searches start from it, since a Whisper window's
    # encoder is the costliest call of the check
    got = sess.generate(None, len(ref.reference_tokens), num_beams=1, ignore_eos=True,
                        prompt=prompt, do_sample=False)
    beams = sess.generate(None, len(ref.reference_tokens), num_beams=SEQ2SEQ_BEAMS,
                          prompt=prompt, do_sample=False)
    mismatch = next((i for i, (a, b) in enumerate(zip(got, ref.reference_tokens)) if a != b), None)
    tol = logit_tolerance(dtype, ref.reference_logits, ref.fp32_noise)
    identical = mismatch is None and len(got) == len(ref.reference_tokens)
    # transformers' Whisper generate drops the final EOS that the others keep: compare without it
    eos = sess.config.get("eos_token_id")
    beams_identical = _strip_eos(list(beams), eos) == _strip_eos(list(ref.beam_tokens), eos)
    prompt_identical = prompt is None or list(prompt) == list(ref.decoder_prompt)
    passed = step_err <= tol and prompt_identical and (
        (identical and beams_identical) or dtype != "fp32")
    return {
        "backend": backend,
        "decoder_prompt_identical": prompt_identical,
        "tokens_compared": len(ref.reference_tokens),
        "tokens_identical": identical,
        "first_mismatch": mismatch,
        "beam_tokens_identical": beams_identical,
        "num_beams": SEQ2SEQ_BEAMS,
        "step_logits_max_abs_err": step_err,
        "prefill_logits_max_abs_err": 0.0,
        "tolerance": tol,
        "reference_fp32_noise": ref.fp32_noise,
        "passed": bool(passed),
    }


def _chunk_err(sess: Any, path: list[int], ref: Seq2SeqParityInputs) -> float:
    """``decoder_chunk`` (speculative verification) along the reference path in chunks of up to
    8 tokens, each a chain; the caches carry over from chunk to chunk."""
    sess.start(1)
    err = 0.0
    cap = sess.capacity
    for i in range(0, len(path), 8):
        ids = path[i:i + 8]
        if sess.position + len(ids) > cap:
            break
        c = len(ids)
        inputs = dict(sess._feeds)
        inputs.update(input_ids=np.array([ids], dtype=np.int64),
                      cache_position=np.array([sess.position], dtype=np.int64),
                      positions=np.arange(sess.position, sess.position + c, dtype=np.int64),
                      tree_mask=np.tril(np.ones((c, c), dtype=np.int64)))
        out, sess._state = sess.model.run("decoder_chunk", inputs, sess._state)
        sess.position += c
        err = max(err, float(np.abs(out["logits"][0] - ref.reference_logits[i:i + c]).max()))
    return err


def _strip_eos(toks: list[int], eos: Any) -> list[int]:
    return toks[:-1] if toks and toks[-1] == eos else toks


@dataclass
class ClassifierParityInputs:
    inputs: np.ndarray          # (n, frames, features)
    reference_running: np.ndarray  # (n, frames, classes): parallel model, logits after each frame
    #: spiking models: firing rate of each LIF layer per stretch of the inputs (empty otherwise)
    spike_rates: dict[str, list[float]] = field(default_factory=dict)


def reference_classifier(family: Any, model: Any) -> ClassifierParityInputs:
    x = family.parity_inputs(model)
    rates = family.spike_rates(model, x)
    return ClassifierParityInputs(x.numpy(), family.reference_running(model, x).numpy(), rates)


def check_classifier_bundle(root: Path, backend: str, ref: ClassifierParityInputs, dtype: str
                            ) -> dict[str, Any]:
    """Running logits after every frame, streamed (a) in the bundle's chunks and (b) frame by
    frame, against the parallel model: within the tolerance, and the same predicted class at
    every frame (for a spiking model a flipped spike would move the logits far past it). The
    record names the first frame where a prediction differs (``first_differing_frame``)."""
    from edgeseq.runtime.session import load

    sess = load(root, backend=backend)
    err, first, differ = 0.0, None, 0
    for x, want in zip(ref.inputs, ref.reference_running):
        whole = sess.classify(x).running
        sess.reset(1)
        for t in range(x.shape[0]):
            sess.push(x[t:t + 1])
        sess.finish()
        single = sess.running()[0]
        for got in (whole, single):
            err = max(err, float(np.abs(got - want).max()))
            bad = np.flatnonzero(got.argmax(-1) != want.argmax(-1))
            differ += len(bad)
            if len(bad) and (first is None or bad[0] < first):
                first = int(bad[0])
    same = differ == 0
    tol = TOLERANCE["fp32"] if dtype == "fp32" else TOLERANCE["fp16"] * float(
        np.abs(ref.reference_running).max())
    passed = err <= tol and (same or dtype != "fp32")
    rec = {"backend": backend, "sequences": len(ref.inputs),
           "frames": int(ref.inputs.shape[1]), "running_logits_max_abs_err": err,
           "predictions_identical": same, "differing_predictions": differ,
           "first_differing_frame": first, "tolerance": tol, "passed": passed}
    if ref.spike_rates:
        rec["spike_rates"] = ref.spike_rates
        rec["spike_rate_min"] = min(r for q in ref.spike_rates.values() for r in q)
    return rec


# -- the tasks' parity parts (edgeseq/tasks/<task>.py names them) ---------------------------------
Say = Callable[[str], None]


class TaskParity:
    """One task's parity: the reference outputs of the original model (``reference``: a job that
    needs nothing of the bundle, so it runs while the graphs are lowered) and the bundle's check
    against them per format (``check``: adds ``checks`` and the reference's own fields to
    ``parity``, prints one line per format, returns the reference outputs)."""

    def reference(self, family: Any, model: Any, tokenizer: Any, config: dict[str, Any],
                  parity_tokens: int) -> Callable[[], Any]:
        raise NotImplementedError

    def check(self, root: Path, backends: dict[str, str], reference: Any, dtype: str,
              config: dict[str, Any], parity_tokens: int, parity: dict[str, Any],
              say: Say) -> Any:
        raise NotImplementedError


class _CausalParity(TaskParity):
    def reference(self, family: Any, model: Any, tokenizer: Any, config: dict[str, Any],
                  parity_tokens: int) -> Callable[[], Any]:
        prompt = default_prompt(tokenizer, config["vocab_size"])
        return functools.partial(reference_run, family, model, prompt, parity_tokens)

    def check(self, root: Path, backends: dict[str, str], reference: Any, dtype: str,
              config: dict[str, Any], parity_tokens: int, parity: dict[str, Any],
              say: Say) -> Any:
        say(f"[4/5] parity: reference greedy ({parity_tokens} tokens) ...")
        ref = reference.result()
        parity["prompt"] = ref.prompt
        parity["reference_tokens"] = ref.reference_tokens
        for fmt, backend in backends.items():
            rec = check_bundle(root, backend, ref, dtype)
            parity["checks"].append({"format": fmt, **rec})
            say(f"      {fmt:5s} tokens identical: {rec['tokens_identical']} "
                f"({rec['tokens_compared']}), max |dlogits| prefill "
                f"{rec['prefill_logits_max_abs_err']:.2e} step "
                f"{rec['step_logits_max_abs_err']:.2e} -> {'ok' if rec['passed'] else 'FAILED'}")
        return ref


def _decoder_room(config: dict[str, Any]) -> int:
    """How many new tokens the decoder's cache and position table allow."""
    caps = [c for c in (config.get("max_target_len"), config.get("max_target_positions")) if c]
    return (min(caps) if caps else 1 << 30) - len(config.get("decoder_prompt", [0]))


def seq2seq_tokens(config: dict[str, Any], parity_tokens: int) -> int:
    """Tokens an encoder-decoder's parity compares: at most 32 (each is a beam-search step)."""
    return min(parity_tokens, 32, _decoder_room(config))


class _Seq2SeqParity(TaskParity):
    def reference(self, family: Any, model: Any, tokenizer: Any, config: dict[str, Any],
                  parity_tokens: int) -> Callable[[], Any]:
        source = family.parity_source(model, tokenizer)
        return functools.partial(reference_seq2seq, family, model, source,
                                 seq2seq_tokens(config, parity_tokens))

    def check(self, root: Path, backends: dict[str, str], reference: Any, dtype: str,
              config: dict[str, Any], parity_tokens: int, parity: dict[str, Any],
              say: Say) -> Any:
        say(f"[4/5] parity: reference greedy and {4}-beam search "
            f"({seq2seq_tokens(config, parity_tokens)} tokens) ...")
        ref = reference.result()
        parity["reference_tokens"] = ref.reference_tokens
        parity["reference_beam_tokens"] = ref.beam_tokens
        for fmt, backend in backends.items():
            rec = check_seq2seq_bundle(root, backend, ref, dtype)
            parity["checks"].append({"format": fmt, **rec})
            say(f"      {fmt:5s} greedy identical: {rec['tokens_identical']} "
                f"({rec['tokens_compared']}), 4-beam identical: "
                f"{rec['beam_tokens_identical']}, max |dlogits| step "
                f"{rec['step_logits_max_abs_err']:.2e} -> {'ok' if rec['passed'] else 'FAILED'}")
        return ref


class _ClassifierParity(TaskParity):
    def reference(self, family: Any, model: Any, tokenizer: Any, config: dict[str, Any],
                  parity_tokens: int) -> Callable[[], Any]:
        return functools.partial(reference_classifier, family, model)

    def check(self, root: Path, backends: dict[str, str], reference: Any, dtype: str,
              config: dict[str, Any], parity_tokens: int, parity: dict[str, Any],
              say: Say) -> Any:
        ref = reference.result()
        n, frames = ref.inputs.shape[:2]
        say(f"[4/5] parity: running predictions of {n} sequences x {frames} frames, "
            f"in chunks and frame by frame ...")
        for fmt, backend in backends.items():
            rec = check_classifier_bundle(root, backend, ref, dtype)
            parity["checks"].append({"format": fmt, **rec})
            say(f"      {fmt:5s} predictions identical: {rec['predictions_identical']}, "
                f"max |dlogits| {rec['running_logits_max_abs_err']:.2e} -> "
                f"{'ok' if rec['passed'] else 'FAILED'}")
        return ref


CAUSAL = _CausalParity()
SEQ2SEQ = _Seq2SeqParity()
CLASSIFICATION = _ClassifierParity()
