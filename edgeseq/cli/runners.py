"""``edgeseq run`` per task: each task's plug-in (``edgeseq/tasks/``) names its runner here; a
runner reads the task's input from ``RunOptions`` and prints its output."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edgeseq.bundle import BundleError
from edgeseq.cli.common import _fail, _json, _write
from edgeseq.generation import CAUSAL_MAX_NEW_TOKENS


@dataclass
class RunOptions:
    """``edgeseq run``'s options, as each task's runner (``edgeseq/tasks/``) reads them."""

    bundle: str
    prompt: str | None
    prompt_ids: str | None
    audio: str | None
    input_npy: str | None
    early_exit: float | None
    stream_audio: bool
    chunk_seconds: float
    window_s: float | None
    agreement: int
    language: str | None
    task: str | None
    timestamps: bool
    num_beams: int | None
    num_beam_groups: int | None
    diversity_penalty: float | None
    length_penalty: float | None
    max_new_tokens: int | None
    do_sample: bool | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    seed: int | None
    as_json: bool
    source_name: str


def run_causal(sess: Any, o: RunOptions) -> None:
    """``edgeseq run`` for a causal LM: stream a completion of the prompt."""
    from edgeseq.runtime.streaming import TextStream, timed_stream

    prompt, prompt_ids, as_json = o.prompt, o.prompt_ids, o.as_json
    if prompt_ids is not None:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            _fail(f"--prompt-ids: expected comma-separated integers, got {prompt_ids!r}")
        vocab = sess.manifest.config.get("vocab_size")
        if vocab and any(not 0 <= i < vocab for i in ids):
            _fail(f"--prompt-ids: ids must be in [0, {vocab})")
    else:
        ids = sess.encode_array(prompt)
    if len(ids) == 0:
        _fail("the prompt is empty")
    out = TextStream(sess.decode)

    def show(tok: int) -> None:
        _write(out.push(tok))

    if not as_json and prompt is not None:
        click.echo(prompt, nl=False)
    cfg = _causal_sampling(o.do_sample, o.temperature, o.top_k, o.top_p)
    res = timed_stream(sess, ids, CAUSAL_MAX_NEW_TOKENS if o.max_new_tokens is None
                       else o.max_new_tokens, on_token=None if as_json else show,
                       do_sample=cfg.do_sample, temperature=cfg.temperature,
                       top_k=cfg.top_k, top_p=cfg.top_p, seed=o.seed)
    if as_json:
        _json({
            "tokens": res.tokens, "text": sess.decode(res.tokens), "prompt_tokens": len(ids),
            "backend": sess.backend, "first_token_ms": round(res.first_token_ms, 3),
            "tokens_per_s": round(res.tokens_per_s, 3), "total_ms": round(res.total_ms, 3)},
            o.bundle)
    else:
        _write(out.finish())
        click.echo("")
        click.echo(f"-- {len(res.tokens)} tokens on {sess.backend}: first token "
                   f"{res.first_token_ms:.1f} ms (prompt {len(ids)} tokens), "
                   f"{res.tokens_per_s:.1f} tokens/s", err=True)


def _run_speculative(bundle: str, backend: str | None, threads: int | None, speculate: str,
                     budget_text: str | None, device_id: str | None, text: str | None,
                     ids_text: str | None, max_new_tokens: int | None, do_sample: bool | None,
                     temperature: float | None, top_k: int | None, top_p: float | None,
                     seed: int | None,
                     as_json: bool, source_name: str = "--text") -> None:
    import time

    from edgeseq.runtime.profile import parse_size
    from edgeseq.runtime.speculative import session as spec

    budget = None
    try:
        if budget_text is not None:
            budget = parse_size(budget_text)
        elif device_id is not None:
            from edgeseq.devices import DeviceError, get_profile

            try:
                budget = get_profile(device_id).app_memory
            except DeviceError as e:
                _fail(str(e))
    except ValueError as e:
        _fail(f"--memory-budget: {e}")
    from edgeseq import tokenize
    from edgeseq.bundle import read_manifest
    from edgeseq.registry import tasks

    try:
        # the source is known before loading: the plan is made for its length
        man = read_manifest(Path(bundle))
        kind = tasks().get(man.task)
        if kind is None:
            _fail(f"{bundle}: task {man.task!r} has no session type in this edgeseq")
        seq2seq = kind.encoder
        if kind.audio:  # the command's speculative path reads text only
            _fail("--speculate with a speech bundle: use the library (edgeseq.runtime.speculative)")
        if ids_text is not None:
            ids = _parse_ids(ids_text, man.config.get("vocab_size"))
        else:
            tok = tokenize.load(Path(bundle), man.tokenizer)
            if tok is None:
                _fail(f"{bundle}: bundle has no tokenizer; pass --prompt-ids")
            ids = (tokenize.source_ids(tok, text or "", man.config) if seq2seq
                   else tok.encode(text or ""))
        if not ids or (text is not None and not text.strip()):
            _fail("the prompt is empty")
        if seq2seq:
            # the plan is made for this source; one past what the encoder takes would fail
            # later with advice (a larger max_source) that only the library can follow
            _check_source(len(ids), man.config, source_name)
        if seq2seq:  # the checkpoint's generation config, as a plain run
            from edgeseq import generation
            from edgeseq.runtime.decoding import SamplingConfig

            gen = man.config.get("generation") or {}
            if max_new_tokens is None:
                max_new_tokens = generation.default_max_new_tokens(
                    gen, len(man.config.get("decoder_prompt") or [0]))
            cfg = SamplingConfig.from_generation(gen, do_sample, temperature, top_k, top_p)
        else:
            max_new_tokens = CAUSAL_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
            cfg = _causal_sampling(do_sample, temperature, top_k, top_p)
        do_sample, temperature, top_k, top_p = cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p
        ss = spec.load(bundle, backend=backend, speculate=speculate, memory_budget=budget,
                       threads=threads, max_source=len(ids) if seq2seq else None,
                       max_length=(len(man.config.get("decoder_prompt") or [0]) + max_new_tokens)
                       if seq2seq else None, manifest=man)
        s = ss.session
        t0 = time.perf_counter()
        toks = ss.generate(ids, max_new_tokens, do_sample=do_sample, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)
        total = time.perf_counter() - t0
    except (BundleError, ValueError) as e:
        _fail(str(e))
    rep = ss.report()
    rate = len(toks) / total if total > 0 else 0.0
    out_text = s.decode(toks)
    if as_json:
        _json({"tokens": [int(t) for t in toks], "text": out_text,
               "prompt_tokens": len(ids), "backend": s.backend,
               "tokens_per_s": round(rate, 3), "total_ms": round(total * 1e3, 3), **rep}, bundle)
        return
    click.echo(out_text if seq2seq else (text or "") + out_text)
    plan = ss.plan
    how = ("plain decoding (" + plan.reason + ")" if plan.mode == "off" else
           f"{plan.mode}, k<={plan.k_max}, width {plan.width}, rollback {plan.rollback}"
           + "".join(f", {g} packed" for g in sorted(plan.prepack)))
    click.echo(f"-- {len(toks)} tokens on {s.backend} in {total * 1e3:.0f} ms ({rate:.1f} "
               f"tokens/s); speculation: {how}; acceptance {rep['acceptance_rate']:.2f}, "
               f"{rep['tokens_per_verify']:.2f} tokens per verification; planned footprint "
               f"{plan.total / 2**20:.1f} MiB"
               + (f" of {budget / 2**20:.1f} MiB" if budget else ""), err=True)


def _check_source(n: int, config: dict[str, Any], source_name: str) -> None:
    """Refuse a source longer than the encoder takes before anything runs (with or without
    --speculate: a speculative plan would otherwise be made for it)."""
    from edgeseq.limits import LimitError, check_source

    try:
        check_source(n, config, source_name)
    except LimitError as e:
        _fail(str(e))


def _parse_ids(text: str, vocab: int | None) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--prompt-ids: expected comma-separated integers, got {text!r}")
    if vocab and any(not 0 <= i < vocab for i in ids):
        _fail(f"--prompt-ids: ids must be in [0, {vocab})")
    return ids


def _causal_sampling(do_sample: bool | None, temperature: float | None, top_k: int | None,
                     top_p: float | None) -> Any:
    """Sampling settings for a causal LM: the flags given, else greedy / 1.0 / 0 / 1.0 (a causal
    checkpoint that sets sampling fields is refused at convert time: edgeseq.generation)."""
    from edgeseq.runtime.decoding import SamplingConfig

    return SamplingConfig(bool(do_sample), 1.0 if temperature is None else temperature,
                          top_k or 0, 1.0 if top_p is None else top_p)


def run_seq2seq(sess: Any, o: RunOptions) -> None:
    """``edgeseq run`` for a text encoder-decoder: translate or correct the source text."""
    import time

    from edgeseq.runtime.streaming import TextStream

    text, ids_text, max_new_tokens, num_beams = o.prompt, o.prompt_ids, o.max_new_tokens, o.num_beams
    groups, diversity, length_penalty = o.num_beam_groups, o.diversity_penalty, o.length_penalty
    do_sample, temperature, top_k, top_p = o.do_sample, o.temperature, o.top_k, o.top_p
    seed, as_json, task, source_name = o.seed, o.as_json, o.task, o.source_name
    if task is not None:  # T5's task_specific_params: its prefix and generation settings
        try:
            sess.use_task(task)
        except BundleError as e:
            _fail(str(e))
        if ids_text is not None:
            _fail(f"--task {task}: a task prefix applies to --text, not --prompt-ids")
    ids = _parse_ids(ids_text, sess.config.get("vocab_size")) if ids_text is not None \
        else sess.encode_text(text or "")
    if not ids or (text is not None and not text.strip()):
        _fail("the source is empty")
    _check_source(len(ids), sess.config, source_name)
    t0 = time.perf_counter()
    sess.encode(ids)
    beams = num_beams if num_beams is not None else int(sess.gen.get("num_beams") or 1)
    if beams > 1:
        toks = sess.generate(None, max_new_tokens, num_beams=beams, num_beam_groups=groups,
                             diversity_penalty=diversity, length_penalty=length_penalty,
                             do_sample=do_sample)
        total = time.perf_counter() - t0
        first_ms = None  # a beam search settles its first token only at the end
        if not as_json:
            click.echo(sess.decode(toks))
    else:
        toks, first_ms, out = [], 0.0, TextStream(sess.decode)
        for tok in sess.stream(None, max_new_tokens, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed):
            if not toks:
                first_ms = (time.perf_counter() - t0) * 1e3
            toks.append(tok)
            if not as_json:
                _write(out.push(tok))
        total = time.perf_counter() - t0
        if not as_json:
            _write(out.finish())
            click.echo("")
    if first_ms is None:
        rate = len(toks) / total if total > 0 else 0.0
    else:
        rate = (len(toks) - 1) / (total - first_ms / 1e3) if len(toks) > 1 and total > first_ms / 1e3 else 0.0
    if as_json:
        _json({
            "tokens": [int(t) for t in toks], "text": sess.decode(toks), "source_tokens": len(ids),
            "num_beams": beams, "backend": sess.backend, "first_token_ms": None if first_ms is None else round(first_ms, 3),
            "tokens_per_s": round(rate, 3), "total_ms": round(total * 1e3, 3)},
            str(getattr(sess, "root", "the bundle")))
    else:
        first = "" if first_ms is None else f"first token {first_ms:.1f} ms, "
        click.echo(f"-- {len(toks)} tokens on {sess.backend} "
                   f"({'beams ' + str(beams) if beams > 1 else 'greedy'}, source {len(ids)} tokens): "
                   f"{first}{rate:.1f} tokens/s, {total * 1e3:.0f} ms in all", err=True)


def run_classify(sess: Any, o: RunOptions) -> None:
    """``edgeseq run`` for a sequence classifier: classify the frames of ``--input``."""
    import time

    from edgeseq.limits import NumericError

    path, early_exit, as_json = o.input_npy, o.early_exit, o.as_json
    if path is None:
        _fail("this is a sequence classifier: give --input FILE.npy (frames x features)")
    from edgeseq.limits import read_npy

    p = Path(path)
    try:
        x = read_npy(p)  # the header is checked before anything its size is allocated
    except ValueError as e:
        _fail(str(e))
    spec = sess.config["input"]
    try:
        t0 = time.perf_counter()
        res = sess.classify(x)
        total = time.perf_counter() - t0
    except ValueError as e:
        want = f"{spec.get('frames') or 'any number of'} frames x {spec['features']} features"
        _fail(f"{p}: {e} (this model reads {want}; {spec.get('scaling') or 'no scaling given'})")
    except NumericError as e:  # finite frames that overflow inside the model
        _fail(f"{p}: {e}", 1)
    out: dict[str, Any] = {
        "class": res.label, "label": sess.label_name(res.label),
        "probs": [round(v, 6) for v in res.probs], "frames": res.frames,
        "backend": sess.backend, "lookahead": sess.lookahead,
        "ms_per_frame": round(total * 1e3 / max(1, res.frames), 4)}
    if early_exit is not None:
        ef, df = res.exit_frame(early_exit), res.decided_frame(early_exit)
        out.update({"early_exit": early_exit, "exit_frame": ef,
                    "exit_fraction": None if ef is None else round((ef + 1) / res.frames, 4),
                    "decided_frame": df,
                    "decided_class": None if df is None else int(res.running[df].argmax())})
    if as_json:
        _json(out, str(p))
        return
    click.echo(f"class {out['label']} (p={max(res.probs):.3f})")
    if early_exit is not None:
        ef = out["exit_frame"]
        click.echo(f"early exit at {early_exit}: " + ("never (the prediction is not stable at "
                   "that confidence)" if ef is None else
                   f"frame {ef} of {res.frames} ({out['exit_fraction']:.0%} of the sequence)"))
    click.echo(f"-- {res.frames} frames on {sess.backend}: {out['ms_per_frame']:.3f} ms/frame "
               f"(lookahead {sess.lookahead} frames)", err=True)


def run_speech(sess: Any, o: RunOptions) -> None:
    """``edgeseq run`` for a speech model: transcribe (or stream) the WAV file of ``--audio``."""
    from edgeseq import audio as A
    from edgeseq.runtime.speech import Transcriber, chunked

    path, stream, chunk_s, window_s = o.audio, o.stream_audio, o.chunk_seconds, o.window_s
    num_beams, as_json, agreement, timestamps = o.num_beams, o.as_json, o.agreement, o.timestamps
    language, task = o.language, o.task
    if path is None:
        _fail("this is a speech model: give --audio FILE.wav")
    if timestamps and window_s is not None:
        _fail("--window does not combine with --timestamps: timestamped decoding seeks through "
              "the audio in the encoder's full window, as transformers does")
    wav = A.read_wav(path)
    tr = Transcriber(sess, window_s=window_s, num_beams=num_beams or 1, agreement=agreement,
                     timestamps=timestamps, language=language, task=task)
    if stream:
        def show(rep: Any) -> None:
            if not as_json:
                if timestamps:   # each decoded window's segments, one line each
                    for seg in rep.segments:
                        click.echo(_timed_line(seg))
                elif rep.stable_text:
                    click.echo(rep.stable_text + " ", nl=False)
                click.echo(f"[chunk {rep.index} @ {rep.audio_s:.1f}s: {rep.latency_ms:.0f} ms]",
                           err=True)
        res = tr.stream(chunked(wav, chunk_s), on_chunk=show)
        if not as_json and not timestamps:
            click.echo("")
    else:
        res = tr.transcribe(wav)
        if not as_json:
            click.echo("\n".join(_timed_line(seg) for seg in res.segments) if timestamps
                       else res.text)
    lat = [c.latency_ms for c in res.chunks]
    if as_json:
        _json({
            "text": res.text, "language": tr.language_code, "audio_s": round(res.audio_s, 3),
            "backend": sess.backend,
            "compute_s": round(res.compute_s, 3), "rtf": round(res.rtf, 4),
            "segments": [{"start": round(a, 3), "end": round(b, 3), "text": t}
                         for a, b, t in res.segments],
            "chunk_latency_ms": [round(x, 2) for x in lat]}, str(path))
    else:
        extra = (f", chunk latency mean {sum(lat) / len(lat):.0f} ms max {max(lat):.0f} ms"
                 if lat else "")
        lang = f" (language {tr.language_code})" if tr.language_code else ""
        click.echo(f"-- {res.audio_s:.1f} s of audio on {sess.backend}{lang}: real-time factor "
                   f"{res.rtf:.3f}{extra}", err=True)


def _timed_line(seg: tuple[float, float, str]) -> str:
    """A timestamped segment as text: ``[0.00 -> 2.40] text``."""
    start, end, text = seg
    return f"[{start:.2f} -> {end:.2f}] {text}"

