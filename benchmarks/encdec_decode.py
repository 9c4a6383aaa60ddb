"""Greedy encoder-decoder decoding, side by side: Whisper-tiny and t5-small shapes (random weights).

Engines, each in its own process (so peak RSS is its own), same input, same random weights, EOS
disabled so every engine decodes exactly ``--tokens`` new tokens:

    transformers         eager PyTorch ``generate`` (fp32)
    optimum-onnx         optimum's ONNX export (encoder, merged decoder with past), ONNX Runtime
    ctranslate2          ``TransformersConverter`` float32; ``models.Whisper`` / ``Translator``
    edgeseq-ort          edgeseq bundle on ONNX Runtime (growing cache; ``--fixed``: fixed cache)
    edgeseq-executorch   edgeseq bundle on ExecuTorch (fixed cache of tokens + 8 positions)

For Whisper, ``edgeseq-ort`` also gets a row with a 5 s encoder window (the 3 s clip padded to 500
mel frames instead of 3000): edgeseq's encoder graph takes any even number of frames.

Input: Whisper, 3 s of a chirp plus noise as log-mel features padded to 30 s (3000 frames); T5,
32 random source ids + EOS. Per row: first-token latency (input features/ids in hand -> first
new token: encoder + first decoder step), decode tokens/s after the first token, total time, peak
RSS of the worker (VmHWM). One warm-up run, then the best of 3.

    ./dev bench encdec_decode                   # Whisper-tiny and t5-small shapes, 64 tokens
    ./dev bench encdec_decode --small           # tiny shapes, 8 tokens: a quick check
    ./dev bench encdec_decode --engines transformers,edgeseq-ort --models t5

Real-pipeline mode (``--pipeline``): the published whisper-tiny.en, whisper-tiny and t5-small
configs, generation configs and tokenizers (``tests/fixtures/published``) with random weights
(the encoder's cost does not depend on them), decoded as each checkpoint's generation rules say
(Whisper: its prompt, English where multilingual, no timestamps; EOS suppressed so every engine
decodes ``--tokens``), the full 30 s window, at 1 and 2 threads, with int8 rows: CTranslate2
``compute_type="int8"`` and edgeseq's ``--quant int8`` bundle. Whisper rows report the real-time
factor (time from features in hand to the last token / clip seconds):

    ./dev bench encdec_decode --pipeline                 # tiny.en, tiny, t5-small; 1 and 2 threads
    ./dev bench encdec_decode --pipeline --models whisper-tiny.en --threads 1

optimum-onnx and ctranslate2 are optional: ``pip install -e '.[bench]'``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("transformers", "optimum-onnx", "ctranslate2", "ctranslate2-int8", "edgeseq-ort",
           "edgeseq-ort-int8", "edgeseq-executorch")
MODELS = ("whisper", "t5")
# --pipeline: published configs (tests/fixtures/published/NAME), random weights
PUBLISHED = ("whisper-tiny.en", "whisper-tiny", "t5-small")
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "published"
PIPELINE_ENGINES = ("transformers", "optimum-onnx", "ctranslate2", "ctranslate2-int8",
                    "edgeseq-ort", "edgeseq-ort-int8")
PIPELINE_CLIP_SECONDS = 5.0
PIPELINE_TOKENS = 24  # about a 5 s utterance's transcript

WHISPER_SPECIAL = dict(vocab_size=51865, num_mel_bins=80, max_source_positions=1500,
                       max_target_positions=448, decoder_start_token_id=50258,
                       eos_token_id=50257, pad_token_id=50257)
SHAPES = {
    ("whisper", False): dict(d_model=384, encoder_layers=4, decoder_layers=4,
                             encoder_attention_heads=6, decoder_attention_heads=6,
                             encoder_ffn_dim=1536, decoder_ffn_dim=1536, **WHISPER_SPECIAL),
    ("whisper", True): dict(d_model=64, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=2, decoder_attention_heads=2,
                            encoder_ffn_dim=128, decoder_ffn_dim=128, **WHISPER_SPECIAL),
    ("t5", False): dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6,
                        vocab_size=32128, feed_forward_proj="relu", tie_word_embeddings=True,
                        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
    ("t5", True): dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                       vocab_size=1024, feed_forward_proj="relu", tie_word_embeddings=True,
                       decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
}
SAMPLE_RATE = 16000
CLIP_SECONDS = 3.0
SOURCE_LEN = 32
OPTIONAL = {"optimum-onnx": "optimum.onnxruntime", "ctranslate2": "ctranslate2",
            "ctranslate2-int8": "ctranslate2"}


def peak_rss_bytes() -> int:
    """This process's peak RSS. (ru_maxrss survives exec, so a worker would report its parent's
    peak; VmHWM belongs to the process's own address space.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- inputs and checkpoints ------------------------------------------------------------------
def make_checkpoint(folder: Path, model: str, shape: dict) -> None:
    import torch
    from transformers import (T5Config, T5ForConditionalGeneration, WhisperConfig,
                              WhisperForConditionalGeneration)

    torch.manual_seed(0)
    if model == "whisper":
        net = WhisperForConditionalGeneration(WhisperConfig(**shape))
    else:
        net = T5ForConditionalGeneration(T5Config(**shape))
    net.save_pretrained(folder, safe_serialization=True)


def make_published(folder: Path, name: str) -> dict:
    """``name``'s published config, generation config and tokenizer files with random weights
    (seeded): what a user's checkpoint folder holds, but for the weights."""
    import torch
    from transformers import (AutoConfig, T5ForConditionalGeneration,
                              WhisperForConditionalGeneration)

    src = FIXTURES / name
    cfg = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    cls = WhisperForConditionalGeneration if cfg.model_type == "whisper" \
        else T5ForConditionalGeneration
    cls(cfg).save_pretrained(folder, safe_serialization=True)
    for f in src.iterdir():  # generation config and tokenizer files, as published
        if f.is_file() and f.suffix in (".json", ".model", ".txt") and f.name != "config.json":
            shutil.copy2(f, folder / f.name)
    return json.loads((folder / "config.json").read_text())


def make_inputs(folder: Path, vocab_size: int, eos: int, clip_s: float = CLIP_SECONDS
                ) -> dict[str, Path]:
    """``vocab_size``: source ids are drawn below it (a published T5's tokenizer names 32000
    pieces + 100 sentinels of the model's 32128 ids: CTranslate2 takes the source as pieces)."""
    """The same input for every engine, saved as .npy: features padded to 30 s and to 5 s for
    Whisper, source ids for T5."""
    import numpy as np

    from edgeseq.audio import log_mel_spectrogram

    rng = np.random.default_rng(0)
    t = np.arange(int(clip_s * SAMPLE_RATE)) / SAMPLE_RATE
    f0, f1 = 200.0, 3000.0  # linear chirp 200 Hz -> 3 kHz, plus a little noise
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * clip_s))
    audio = (0.5 * np.sin(phase) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    paths = {"feats30": folder / "features_30s.npy", "feats5": folder / "features_5s.npy",
             "ids": folder / "source_ids.npy"}
    np.save(paths["feats30"], log_mel_spectrogram(audio, n_frames=3000))
    np.save(paths["feats5"], log_mel_spectrogram(audio, n_frames=500))
    ids = rng.integers(3, vocab_size, SOURCE_LEN).tolist() + [eos]
    np.save(paths["ids"], np.asarray(ids, dtype=np.int64))
    return paths


# -- CTranslate2 without a tokenizer -----------------------------------------------------------
class IdTokenizer:
    """What CTranslate2's converter reads from a tokenizer, for a checkpoint that has none: token
    ``i`` is named ``<i>``, except Whisper's special tokens, which CTranslate2 finds by name
    (``<|startoftranscript|>``, ``<|endoftext|>``, ``<|notimestamps|>``, timestamps)."""

    def __init__(self, vocab_size: int, names: dict[int, str] | None = None,
                 pad: int | None = None, eos: int | None = None, unk: int | None = None):
        self.names = [f"<{i}>" for i in range(vocab_size)]
        for i, name in (names or {}).items():
            self.names[i] = name
        pick = lambda i: None if i is None else self.names[i]  # noqa: E731
        self.pad_token, self.eos_token, self.unk_token = pick(pad), pick(eos), pick(unk)
        self.bos_token = None
        self.additional_special_tokens: list[str] = []
        self.special_tokens_map: dict = {}

    def get_vocab(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.names[i]


def whisper_token_names(eot: int = 50257, languages: int = 99, timestamps: int = 1501) -> dict:
    """Multilingual Whisper's special-token layout (51865 ids: 50257 text, then specials)."""
    names = {eot: "<|endoftext|>", eot + 1: "<|startoftranscript|>"}
    for k in range(languages):
        names[eot + 2 + k] = f"<|lang{k}|>"
    nxt = eot + 2 + languages
    for k, s in enumerate(("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                           "<|nospeech|>", "<|notimestamps|>")):
        names[nxt + k] = s
    for k in range(timestamps):
        names[nxt + 6 + k] = "<|%.2f|>" % (k * 0.02)
    return names


def convert_ct2(ckpt: Path, out: Path, model: str) -> None:
    from ctranslate2.converters import TransformersConverter

    if model in PUBLISHED:  # the published tokenizer files are there: CTranslate2 reads them
        TransformersConverter(str(ckpt)).convert(str(out), force=True)
        return
    cfg = json.loads((ckpt / "config.json").read_text())
    if model == "whisper":
        if cfg["vocab_size"] != 51865:
            raise ValueError("the Whisper stand-in vocabulary needs vocab_size 51865")
        tok = IdTokenizer(cfg["vocab_size"], whisper_token_names(cfg["eos_token_id"]),
                          eos=cfg["eos_token_id"])
    else:
        tok = IdTokenizer(cfg["vocab_size"], pad=cfg["pad_token_id"], eos=cfg["eos_token_id"],
                          unk=2)

    class Converter(TransformersConverter):
        def load_tokenizer(self, *args, **kwargs):  # no tokenizer files in a random checkpoint
            return tok

    Converter(str(ckpt)).convert(str(out), force=True)


# -- preparation (each in its own process) ----------------------------------------------------
def prepare(engine: str, model: str, ckpt: Path, out: Path, cap: int | None) -> None:
    if engine == "optimum-onnx":
        from optimum.exporters.onnx import main_export

        task = ("automatic-speech-recognition-with-past" if model.startswith("whisper")
                else "text2text-generation-with-past")
        main_export(str(ckpt), output=str(out), task=task, device="cpu", do_validation=False)
    elif engine.startswith("ctranslate2"):  # int8 is chosen at load (compute_type)
        convert_ct2(ckpt, out, model)
    else:
        from edgeseq.convert.pipeline import convert

        fmt = "pte" if engine == "edgeseq-executorch" else "onnx"
        convert(ckpt, out, formats=(fmt,), skip_parity=True, max_target_len=cap, overwrite=True,
                quant="int8" if engine.endswith("-int8") else None,
                progress=lambda m: print(m, file=sys.stderr))


# -- measuring (each engine in its own process) ----------------------------------------------
class Clock:
    """Per-token callback: time of the first new token and the tokens, for one run."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.tokens: list[int] = []

    def token(self, tok: int) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        self.tokens.append(int(tok))

    def put(self, value) -> None:  # a transformers streamer: first call is the decoder prompt
        if not hasattr(self, "_prompt_seen"):
            self._prompt_seen = True
            return
        for tok in value.reshape(-1).tolist():
            self.token(tok)

    def end(self) -> None:
        pass


def best_of(run, reps: int = 3) -> dict:
    """One warm-up run, then ``reps`` runs; each returns (first_s, total_s, tokens)."""
    run()
    firsts, totals, rates, tokens = [], [], [], []
    for _ in range(reps):
        first, total, tokens = run()
        firsts.append(first)
        totals.append(total)
        rates.append((len(tokens) - 1) / max(total - first, 1e-9))
    return {"first_token_ms": min(firsts) * 1e3, "total_ms": min(totals) * 1e3,
            "tokens_per_s": max(rates), "tokens": [int(t) for t in tokens],
            "n_tokens": len(tokens)}


def worker(engine: str, model: str, kw: dict) -> dict:
    import numpy as np

    n, threads = kw["n"], kw["threads"]
    art = Path(kw["artifact"])
    speech = model.startswith("whisper")
    source = np.load(kw["feats"] if speech else kw["ids"])
    prompt = kw.get("prompt")  # --pipeline Whisper: the generation config's decoder prompt
    lang = kw.get("language")
    note = ""
    if engine in ("transformers", "optimum-onnx"):
        import torch

        torch.set_num_threads(threads)
        if engine == "transformers":
            from transformers import T5ForConditionalGeneration, WhisperForConditionalGeneration

            cls = WhisperForConditionalGeneration if speech else T5ForConditionalGeneration
            net = cls.from_pretrained(art).eval()
        else:
            import onnxruntime as ort
            from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTModelForSpeechSeq2Seq

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            cls = ORTModelForSpeechSeq2Seq if speech else ORTModelForSeq2SeqLM
            net = cls.from_pretrained(art, session_options=so, provider="CPUExecutionProvider")
        if speech:
            inputs = {"input_features": torch.from_numpy(source)[None]}
        else:
            ids = torch.from_numpy(source)[None]
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        if prompt is not None and lang:  # as the published generation rules, in English
            inputs.update(language=lang, task="transcribe")

        def run():
            clock = Clock()
            with torch.inference_mode():
                net.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             num_beams=1, streamer=clock)
            return clock.first, time.perf_counter() - clock.t0, clock.tokens
    elif engine.startswith("ctranslate2"):
        import ctranslate2

        compute = "int8" if engine.endswith("-int8") else "float32"
        if speech:
            cfg = json.loads((Path(kw["ckpt"]) / "config.json").read_text())
            sot, eot = cfg["decoder_start_token_id"], cfg["eos_token_id"]
            net = ctranslate2.models.Whisper(str(art), device="cpu", compute_type=compute,
                                             intra_threads=threads, inter_threads=1)
            feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(source[None]))
            start = prompt or [sot]

            def gen(k: int) -> list[int]:
                # EOS suppressed (with the model's own suppressed tokens, -1) = exactly k tokens;
                # CTranslate2 decodes max_length // 2 new tokens (openai-whisper's sample_len)
                res = net.generate(feats, [start], beam_size=1, max_length=2 * k,
                                   suppress_tokens=[-1, eot], suppress_blank=True)
                return res[0].sequences_ids[0][:k]

            note = "first token: a separate 1-token generate (no per-token callback)"
            if prompt is None:
                note += ("; CTranslate2 applies Whisper's timestamp rules to a prompt without "
                         "<|notimestamps|>")

            def run():
                t0 = time.perf_counter()
                gen(1)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                toks = gen(n)
                return first, time.perf_counter() - t0, toks
        else:
            net = ctranslate2.Translator(str(art), device="cpu", compute_type=compute,
                                         intra_threads=threads, inter_threads=1)
            if model in PUBLISHED:  # the published tokenizer's pieces (written by the driver:
                # importing transformers here would put torch into this worker's peak RSS)
                pieces = json.loads(Path(kw["pieces"]).read_text())
                src = [[pieces["names"][int(i)] for i in source]]
                to_id = lambda ts: [pieces["ids"][t] for t in ts]  # noqa: E731
            else:
                src = [[f"<{int(i)}>" for i in source]]
                to_id = lambda ts: [int(t[1:-1]) for t in ts]  # noqa: E731

            def run():
                clock = Clock()
                res = net.translate_batch(src, beam_size=1, min_decoding_length=n,
                                          max_decoding_length=n,
                                          callback=lambda step: clock.token(step.token_id))
                total = time.perf_counter() - clock.t0
                return clock.first, total, to_id(res[0].hypotheses[0])
    else:
        import edgeseq

        backend = "executorch" if engine == "edgeseq-executorch" else "ort"
        sess = edgeseq.load(art, backend=backend, threads=threads)

        def run():
            clock = Clock()
            for tok in sess.stream(source, n, ignore_eos=True, prompt=prompt):
                clock.token(tok)
            return clock.first, time.perf_counter() - clock.t0, clock.tokens
    res = best_of(run)
    res["peak_rss"] = peak_rss_bytes()
    res["note"] = note
    return res


def subprocess_json(args: list[str]) -> tuple[dict | None, str]:
    """Run this script with ``args``; its RESULT line, or None and why it failed."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        err = [ln.strip() for ln in out.stderr.strip().splitlines() if ln.strip()]
        print(out.stderr[-3000:], file=sys.stderr)
        why = err[-1][:200] if err else f"exit code {out.returncode}"
        native = [ln for ln in err if ln.startswith("[") and ".cpp:" in ln]  # ExecuTorch's log
        if native:
            why += " (" + native[0].split("] ", 1)[-1][:200] + ")"
        return None, why.replace("|", "/")
    return json.loads(line[0][7:]), ""


# -- driver --------------------------------------------------------------------------------------
def rows_for(model: str, engines: list[str], fixed: bool, n: int
             ) -> list[tuple[str, str, str, int | None]]:
    """(label, engine, features key, cache capacity) per row."""
    out = []
    for eng in engines:
        if eng == "edgeseq-ort":
            cap = n + 8 if fixed else None
            extra = ", fixed cache" if fixed else ""
            out.append((f"edgeseq ort ({extra[2:]})" if fixed else "edgeseq ort", eng,
                        "feats30", cap))
            if model == "whisper":  # stand-in only: a published Whisper needs its 30 s window
                out.append((f"edgeseq ort (5 s window{extra})", eng, "feats5", cap))
        elif eng == "edgeseq-executorch":
            out.append(("edgeseq executorch", eng, "feats30", n + 8))
        else:
            out.append((eng, eng, "feats30", None))
    return out


def artifact_path(base: Path, eng: str, cap: int | None, ckpt: Path) -> Path:
    if eng == "transformers":
        return ckpt
    if eng.startswith("ctranslate2"):  # one conversion; int8 is chosen at load
        return base / "ctranslate2"
    if eng == "optimum-onnx":
        return base / eng
    return base / (f"{eng}-cap{cap}" if cap else eng)


def is_built(eng: str, art: Path) -> bool:
    marker = {"transformers": "model.safetensors", "optimum-onnx": "encoder_model.onnx",
              "ctranslate2": "model.bin", "ctranslate2-int8": "model.bin"
              }.get(eng, "manifest.json")
    return (art / marker).exists()


def whisper_prompt(ckpt: Path) -> tuple[list[int], str | None]:
    """The decoder prompt a published Whisper's generation config gives for English
    transcription without timestamps, and the language to name (None: English-only model)."""
    g = json.loads((ckpt / "generation_config.json").read_text())
    prompt = [int(g["decoder_start_token_id"])]
    lang = None
    if g.get("is_multilingual"):
        lang = "en"
        prompt += [int(g["lang_to_id"]["<|en|>"]), int(g["task_to_id"]["transcribe"])]
    return prompt + [int(g["no_timestamps_token_id"])], lang


def installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the parent package is missing
        return False


def fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes and 8 tokens, a quick check")
    ap.add_argument("--tokens", type=int, default=None,
                    help="new tokens per run (64; 8 with --small)")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts (default: all CPUs; 1,2 with --pipeline)")
    ap.add_argument("--engines", default=None)
    ap.add_argument("--models", default=None)
    ap.add_argument("--pipeline", action="store_true",
                    help="published configs and generation rules, int8 rows, 1 and 2 threads")
    ap.add_argument("--fixed", action="store_true",
                    help="edgeseq ort with the fixed-capacity cache (tokens + 8) too")
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoints and exports here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    if a.worker or a.prepare:
        kw = json.loads(a.args)
        if a.prepare:
            cap = kw.get("cap")
            prepare(a.prepare, kw["model"], Path(kw["ckpt"]), Path(kw["artifact"]), cap)
            print("RESULT {}")
        else:
            print("RESULT " + json.dumps(worker(a.worker, kw["model"], kw)))
        return

    n = a.tokens or (PIPELINE_TOKENS if a.pipeline else 8 if a.small else 64)
    engines = [e for e in (a.engines or ",".join(PIPELINE_ENGINES if a.pipeline else ENGINES))
               .split(",") if e]
    models = [m for m in (a.models or ",".join(PUBLISHED if a.pipeline else MODELS)).split(",")
              if m]
    threads = [int(t) for t in (a.threads or ("1,2" if a.pipeline else str(os.cpu_count() or 2)))
               .split(",") if t]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; known: {', '.join(ENGINES)}")
    for m in models:
        if m not in (PUBLISHED if a.pipeline else MODELS):
            ap.error(f"unknown model {m!r}; known: "
                     f"{', '.join(PUBLISHED if a.pipeline else MODELS)}")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="edgeseq-encdec-"))
    try:
        report(a, work, engines, models, n, threads)
    finally:
        if a.workdir is None:  # nothing to keep: checkpoints and exports are rebuilt each time
            shutil.rmtree(work, ignore_errors=True)


def report(a: argparse.Namespace, work: Path, engines: list[str], models: list[str], n: int,
           threads: list[int]) -> None:
    """Build what is missing under ``work``, measure every row, print the table and ratios."""
    load0 = os.getloadavg()[0]
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results: dict[tuple[str, int], list[tuple[str, str, dict | None, str]]] = {}
    shapes: dict[str, dict] = {}
    t_start = time.perf_counter()
    clip_s = PIPELINE_CLIP_SECONDS if a.pipeline else CLIP_SECONDS
    for model in models:
        published = model in PUBLISHED
        base = work / (model if published else f"{model}-{'small' if a.small else 'full'}")
        ckpt = base / "ckpt"
        if not (ckpt / "model.safetensors").exists():
            say(f"making a random {model} in {ckpt}")
            if published:
                make_published(ckpt, model)
            else:
                make_checkpoint(ckpt, model, SHAPES[(model, a.small)])
        shape = shapes[model] = json.loads((ckpt / "config.json").read_text())
        high = shape["vocab_size"]
        extra: dict = {}
        if published and not model.startswith("whisper"):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(ckpt)
            high = len(tok) - len(tok.additional_special_tokens)
            vocab = tok.get_vocab()
            extra["pieces"] = str(base / "pieces.json")
            (base / "pieces.json").write_text(json.dumps(
                {"names": tok.convert_ids_to_tokens(list(range(len(tok)))), "ids": vocab}))
        inputs = make_inputs(base, high, shape["eos_token_id"], clip_s)
        if published and model.startswith("whisper"):
            extra["prompt"], extra["language"] = whisper_prompt(ckpt)
        built: dict[str, str] = {}
        for t in threads:
            rows = []
            for label, eng, feats_key, cap in rows_for(model, engines, a.fixed, n):
                if not installed(OPTIONAL.get(eng)):
                    rows.append((label, eng, None, f"{OPTIONAL[eng]} is not installed "
                                                   "(pip install -e '.[bench]')"))
                    continue
                art = artifact_path(base, eng, cap, ckpt)
                kw = {"model": model, "ckpt": str(ckpt), "artifact": str(art), "cap": cap}
                if str(art) in built and built[str(art)]:
                    rows.append((label, eng, None, built[str(art)]))
                    continue
                if not is_built(eng, art):
                    say(f"{model}: preparing {eng} in {art}")
                    t0 = time.perf_counter()
                    _, why = subprocess_json(["--prepare", eng, "--args", json.dumps(kw)])
                    built[str(art)] = f"preparation failed: {why}" if why else ""
                    if why:
                        rows.append((label, eng, None, built[str(art)]))
                        continue
                    say(f"  ({time.perf_counter() - t0:.0f} s)")
                say(f"{model}: measuring {label}, {t} thread(s)")
                t0 = time.perf_counter()
                kw.update(n=n, threads=t, feats=str(inputs[feats_key]), ids=str(inputs["ids"]),
                          **extra)
                res, why = subprocess_json(["--worker", eng, "--args", json.dumps(kw)])
                say(f"  ({time.perf_counter() - t0:.0f} s)")
                rows.append((label, eng, res, f"failed: {why}" if why else ""))
            results[(model, t)] = rows

    what = ("published configs, generation rules and tokenizers, random weights"
            if a.pipeline else "random weights")
    print(f"\nGreedy decoding, {n} new tokens (EOS disabled), {what}, CPU, "
          f"{'/'.join(map(str, threads))} thread(s); 1 warm-up + best of 3. Whisper input: "
          f"{clip_s:.0f} s clip as log-mel features padded to 30 s (3000 frames) unless noted; "
          f"T5 input: {SOURCE_LEN} source ids + EOS. int8 rows: CTranslate2 compute_type int8, "
          f"edgeseq --quant int8 (8-bit MatMulNBits, a scale per 128 weights; an encoder's weights "
          f"per-channel DynamicQuantizeMatMul).")
    keys = ("d_model", "encoder_layers", "decoder_layers", "num_layers", "vocab_size", "d_ff",
            "encoder_ffn_dim")
    desc = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in shapes[m].items() if k in keys)
                     for m in models)
    print(f"Shapes: {desc}. Load average (1 min) {load0:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} CPUs); total wall time "
          f"{time.perf_counter() - t_start:.0f} s.\n")
    print("| model | threads | engine | first token ms | decode tokens/s | total ms | RTF | "
          "peak RSS MB | same tokens as transformers | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (model, t), rows in results.items():
        speech = model.startswith("whisper")
        ref = next((r["tokens"] for _, e, r, _ in rows if e == "transformers" and r), None)
        full = next((r["tokens"] for lb, e, r, _ in rows
                     if e == "edgeseq-ort" and r and "5 s" not in lb), None)
        for label, eng, r, note in rows:
            if r is None:
                print(f"| {model} | {t} | {label} | - | - | - | - | - | - | {note} |")
                continue
            note = "; ".join(x for x in (note, r.get("note", "")) if x)
            same = "ref" if eng == "transformers" else (str(r["tokens"] == ref) if ref else "-")
            if "5 s" in label:  # another input: how far it follows the full window instead
                same = "n/a (other input)"
                if full:
                    k = next((i for i, (x, y) in enumerate(zip(r["tokens"], full)) if x != y),
                             min(len(full), len(r["tokens"])))
                    note = "; ".join(x for x in (note, f"first {k} of {n} tokens equal to the "
                                                       f"30 s window's (edgeseq ort)") if x)
            if r["n_tokens"] != n:
                note = (note + " " if note else "") + f"decoded {r['n_tokens']} tokens"
            rtf = f"{r['total_ms'] / 1e3 / clip_s:.3f}" if speech else "-"
            print(f"| {model} | {t} | {label} | {r['first_token_ms']:.1f} | "
                  f"{r['tokens_per_s']:.1f} | {r['total_ms']:.0f} | {rtf} | "
                  f"{r['peak_rss'] / 1e6:.0f} | {same} | {note} |")

    print("\nRatios (time: > 1 means the edgeseq row is faster; memory: < 1 means it uses less):")
    pairs = (("edgeseq-ort", "transformers"), ("edgeseq-ort", "optimum-onnx"),
             ("edgeseq-ort", "ctranslate2"), ("edgeseq-ort-int8", "ctranslate2-int8"),
             ("edgeseq-ort-int8", "ctranslate2"))
    for (model, t), rows in results.items():
        by = {e: r for label, e, r, _ in rows if r and "5 s" not in label and "fixed" not in label}
        for mine, other in pairs:
            es, o = by.get(mine), by.get(other)
            if es is None or o is None:
                continue
            print(f"- {model}, {t} thread(s), {mine} vs {other}: "
                  f"total {fmt_ratio(o['total_ms'] / es['total_ms'])}, "
                  f"decode {fmt_ratio(es['tokens_per_s'] / o['tokens_per_s'])}, "
                  f"first token {fmt_ratio(o['first_token_ms'] / es['first_token_ms'])}, "
                  f"peak RSS {es['peak_rss'] / o['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
