"""Whisper as published: whisper-tiny.en, whisper-tiny and whisper-base with their published
configs, generation configs and tokenizers (tests/fixtures/published/), random weights of the
published widths with one encoder and one decoder layer. Each checkpoint is converted once per
run (ONNX and ExecuTorch, default options, parity included) and then run through the real CLI
against transformers' ``generate`` with the checkpoint's own generation config."""
from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import _shared_root, shared_build

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "published"
#: checkpoint -> the fixture folder its tokenizer files come from (whisper-base shares
#: whisper-tiny's multilingual tokenizer, committed once)
MODELS = {"whisper-tiny.en": "whisper-tiny.en", "whisper-tiny": "whisper-tiny",
          "whisper-base": "whisper-tiny"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "normalizer.json")
LAYERS = 1
EOS_DRIFT = 0.6
AUDIO_S = 4.0


def build_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """The published config with ``LAYERS`` layers and random weights; the published generation
    config and tokenizer files beside it, unchanged."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    cfg.update(encoder_layers=LAYERS, decoder_layers=LAYERS, num_hidden_layers=LAYERS)
    cfg = {k: v for k, v in cfg.items()
           if k not in ("_name_or_path", "architectures", "transformers_version", "torch_dtype")}
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**cfg)).eval()
    with torch.no_grad():   # wider than the 0.02 init, so greedy output depends on the audio
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.06)
        # a random model never says EOS: push the decoder's position embeddings towards EOS's
        # embedding, more with every position, so transcripts end after a dozen tokens or so
        eos = model.model.decoder.embed_tokens.weight[cfg["eos_token_id"]]
        pos = model.model.decoder.embed_positions.weight
        pos += EOS_DRIFT * torch.arange(pos.shape[0])[:, None] * eos / eos.norm()
        # nor would a trained one say a timestamp after <|notimestamps|> (transformers would then
        # seek and decode the window again, which edgeseq does only with --timestamps)
        gen = json.loads((FIXTURES / name / "generation_config.json").read_text())
        model.model.decoder.embed_tokens.weight[gen["no_timestamps_token_id"] + 1:] *= 0.1
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy2(FIXTURES / name / "generation_config.json", folder / "generation_config.json")
    for f in TOKENIZER_FILES:
        shutil.copy2(FIXTURES / MODELS[name] / f, folder / f)
    return folder


@functools.lru_cache(maxsize=None)
def reference(folder: Path):
    """The checkpoint as transformers loads it (its generation config included)."""
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    model = WhisperForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    return model.eval(), WhisperTokenizerFast.from_pretrained(folder)


def write_wav(path: Path, audio: np.ndarray) -> Path:
    import wave

    pcm = np.clip(audio * 32767, -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (checkpoint, bundle), each built once per run."""
    from edgeseq.convert.pipeline import convert

    root = _shared_root(tmp_path_factory)
    out = {}
    for name in MODELS:
        ckpt = shared_build(root, f"published-{name}-ckpt",
                            lambda f, n=name: build_checkpoint(n, f))
        bundle = shared_build(root, f"published-{name}-bundle",
                              lambda f, c=ckpt: convert(c, f, formats=("onnx", "pte"),
                                                        parity_tokens=16))
        out[name] = (ckpt, bundle)
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from edgeseq.families.whisper import speech_like

    from edgeseq.audio import read_wav

    wav = write_wav(tmp_path_factory.mktemp("wav") / "utterance.wav", speech_like(AUDIO_S, seed=3))
    return read_wav(wav), wav   # the reference hears the 16-bit samples the CLI reads


def _features(audio: np.ndarray):
    """transformers' own feature extractor: the reference's input."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000,
                                                    return_tensors="pt").input_features


def _hf_text(folder: Path, audio: np.ndarray, **kw) -> str:
    model, tok = reference(folder)
    import torch

    with torch.no_grad():
        out = model.generate(_features(audio), **kw)
    return tok.batch_decode(out, skip_special_tokens=True)[0]


def _run(bundle: Path, wav: Path, *args: str) -> dict:
    from edgeseq.cli import main

    res = CliRunner().invoke(main, ["run", str(bundle), "--audio", str(wav), "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


def _norm(text: str) -> str:
    # windows are joined with single spaces (edgeseq.runtime.speech): compare words
    return " ".join(text.split())


# -- fixtures as published -------------------------------------------------------------------
@pytest.mark.parametrize("name,ids", [
    ("whisper-tiny.en", {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257,
                         "<|en|>": 50258, "<|transcribe|>": 50358, "<|notimestamps|>": 50362,
                         "<|0.00|>": 50363, "<|30.00|>": 51863}),
    ("whisper-tiny", {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|en|>": 50259,
                      "<|translate|>": 50358, "<|transcribe|>": 50359,
                      "<|startofprev|>": 50361, "<|notimestamps|>": 50363, "<|0.00|>": 50364,
                      "<|30.00|>": 51864}),
])
def test_published_special_tokens(name, ids):
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast.from_pretrained(FIXTURES / name)
    assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    gen = json.loads((FIXTURES / name / "generation_config.json").read_text())
    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    assert gen["no_timestamps_token_id"] == ids["<|notimestamps|>"]
    assert gen["decoder_start_token_id"] == cfg["decoder_start_token_id"] == ids[
        "<|startoftranscript|>"]
    assert gen["eos_token_id"] == ids["<|endoftext|>"] and len(tok) == cfg["vocab_size"]
    if name == "whisper-tiny":
        assert all(tok.convert_tokens_to_ids(t) == i for t, i in gen["lang_to_id"].items())
        assert gen["task_to_id"] == {"transcribe": 50359, "translate": 50358}


# -- the decoder prompt ----------------------------------------------------------------------
OPTIONS = [(None, None, False), (None, None, True), ("fr", None, False), ("fr", "translate", False),
           ("german", "transcribe", True), (None, "translate", False), ("<|ja|>", None, False)]


@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-tiny"])
def test_prompt_equals_transformers(built, clip, name):
    """runtime.whisper.prompt (language detection included) is transformers'
    ``_retrieve_init_tokens`` for every combination of language, task and timestamps."""
    from edgeseq.families.whisper import WhisperFamily, whisper_config
    from edgeseq.runtime import whisper as W

    ckpt, _ = built[name]
    model, _ = reference(ckpt)
    fam = WhisperFamily()
    feats = _features(clip[0])[0].numpy()
    w = whisper_config(model)
    code = (W.language_code(w, model.detect_language(_features(clip[0]))[0].item())
            if w["lang_to_id"] else None)
    options = OPTIONS if w["lang_to_id"] else [(None, None, False), (None, None, True)]
    for language, task, ts in options:
        want = fam.reference_prompt(model, feats, language=language, task=task, timestamps=ts)
        got = W.prompt(w, language, task, ts,
                       detected=code if W.needs_detection(w, language, task) else None)
        assert got == want, (language, task, ts)
    if w["lang_to_id"]:   # fine-tuned checkpoints' generation configs name a language or task
        for field, value in (("language", "<|fr|>"), ("task", "translate")):
            tuned = copy.deepcopy(model)
            setattr(tuned.generation_config, field, value)
            wt = whisper_config(tuned)
            want = fam.reference_prompt(tuned, feats)
            got = W.prompt(wt, detected=code if W.needs_detection(wt, None) else None)
            assert got == want, field


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_passes_parity(built, name):
    _, bundle = built[name]
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"]
    assert {c["format"] for c in parity["checks"]} == {"onnx", "pte"}
    assert all(c["decoder_prompt_identical"] and c["tokens_identical"]
               and c["beam_tokens_identical"] for c in parity["checks"])


# -- the CLI against transformers' generate ----------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_run_equals_transformers(built, clip, name):
    ckpt, bundle = built[name]
    audio, wav = clip
    for beams in (1, 4):
        got = _run(bundle, wav, "--num-beams", str(beams))
        assert _norm(got["text"]) == _norm(_hf_text(ckpt, audio, num_beams=beams)), beams


def test_language_detection_equals_transformers(built, clip):
    from edgeseq.families.whisper import whisper_config
    from edgeseq.runtime import whisper as W

    for name in ("whisper-tiny", "whisper-base"):
        ckpt, bundle = built[name]
        model, _ = reference(ckpt)
        want = W.language_code(whisper_config(model),
                               model.detect_language(_features(clip[0]))[0].item())
        for backend in ("ort", "executorch"):
            assert _run(bundle, clip[1], "--backend", backend)["language"] == want
    assert _run(built["whisper-tiny.en"][1], clip[1])["language"] == "en"


def test_translate_and_language(built, clip):
    ckpt, bundle = built["whisper-tiny"]
    audio, wav = clip
    got = _run(bundle, wav, "--task", "translate", "--language", "de")
    assert got["language"] == "de"
    assert _norm(got["text"]) == _norm(_hf_text(ckpt, audio, task="translate", language="de"))
    got = _run(bundle, wav, "--language", "french")
    assert got["language"] == "fr"
    assert _norm(got["text"]) == _norm(_hf_text(ckpt, audio, language="fr"))


def test_stream_with_language_and_task(built, clip):
    """--stream with a language and a task, and with detection: each window's final decode (its
    segment) is the offline one, in the offline language."""
    _, bundle = built["whisper-tiny"]
    for args in (["--task", "translate", "--language", "de"], []):
        off = _run(bundle, clip[1], *args)
        on = _run(bundle, clip[1], *args, "--stream")
        assert on["language"] == off["language"]
        assert [s["text"] for s in on["segments"]] == [s["text"] for s in off["segments"]]
    assert off["language"]   # detected


def test_timestamps_with_detected_and_given_language(built, clip):
    """--timestamps on a multilingual model: the prompt's language (detected on the first
    window, or given) is transformers', so the timed tokens equal ``return_timestamps=True``."""
    import torch

    import edgeseq
    from edgeseq.runtime.speech import Transcriber

    ckpt, bundle = built["whisper-tiny"]
    model, _ = reference(ckpt)
    for language in (None, "de"):
        with torch.no_grad():
            want = model.generate(_features(clip[0]), return_timestamps=True, language=language)
        res = Transcriber(edgeseq.load(bundle), timestamps=True, language=language).transcribe(
            clip[0])
        assert res.tokens == want[0].tolist(), language


@pytest.mark.parametrize("name,args,msg", [
    ("whisper-tiny", ["--language", "xx"], "--language xx: not a language of this model"),
    ("whisper-tiny", ["--language", "yue"], "--language yue: not a language of this model"),
    ("whisper-tiny", ["--task", "summarize"], "--task summarize: unknown task"),
    ("whisper-tiny.en", ["--language", "en"], "--language en: this is an English-only"),
    ("whisper-tiny.en", ["--task", "translate"], "--task translate: this is an English-only"),
])
def test_bad_options(built, clip, name, args, msg):
    from edgeseq.cli import main

    res = CliRunner().invoke(main, ["run", str(built[name][1]), "--audio", str(clip[1]), *args])
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"edgeseq: error: {msg}"), res.output
