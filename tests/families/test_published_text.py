"""The text encoder-decoders as published: t5-small, flan-t5-small, byt5-small, bart-base and
opus-mt-en-de, each from its published config.json, generation_config.json and tokenizer files
(tests/fixtures/published/, sources in its README) with random weights of the published widths
(vocabulary and d_model as published; one encoder and one decoder layer, for time).

``edgeseq convert`` with default options (ONNX Runtime + ExecuTorch, parity included) must pass,
and ``edgeseq run --text`` must give the text transformers' ``generate`` (with the checkpoint's
generation config) followed by the checkpoint's tokenizer decode gives, greedy and with 4 beams.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from tests.cli.test_cli import edgeseq, error_line
from tests.conftest import _shared_root, shared_build

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "published"
MODELS = ["t5-small", "flan-t5-small", "byt5-small", "bart-base", "opus-mt-en-de"]
# the published config keys that set the depth, cut to one layer each
DEPTH = {"t5": ("num_layers", "num_decoder_layers"), "bart": ("encoder_layers", "decoder_layers"),
         "marian": ("encoder_layers", "decoder_layers")}
TEXT = "Retrun the numbr of itmes in teh lsit — and “stop” at 5 €."
NEW = 12  # new tokens per run
# random init per architecture: (linear gain, token-embedding scale)
INIT = {"t5": (1.0, 0.05), "bart": (3.0, 0.3), "marian": (3.0, 0.3)}


def make_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """The fixture's published files, config.json with one encoder and one decoder layer, and
    random weights saved by transformers."""
    import torch
    import transformers

    from edgeseq.families.seq2seq import widen_init

    folder.mkdir(parents=True, exist_ok=True)
    for f in (PUBLISHED / name).iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)
    cfg = json.loads((PUBLISHED / name / "config.json").read_text())
    for key in DEPTH[cfg["model_type"]]:
        cfg[key] = 1
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    # a wide init, so that outputs depend on the source and the cache (see widen_init), with
    # smaller token embeddings: with a tied head a large one is copied to the output, and the
    # model repeats one token (measured: these settings give varied greedy output for each)
    gain, embed = INIT[cfg["model_type"]]
    widen_init(model, seed, gain=gain)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embed)
    model.tie_weights()
    weights = folder / "_weights"
    model.save_pretrained(weights, safe_serialization=True)
    shutil.move(str(weights / "model.safetensors"), folder / "model.safetensors")
    shutil.rmtree(weights)
    return folder


def _build(name: str, root: Path) -> Path:
    def build(out: Path) -> Path:
        ckpt = make_checkpoint(name, out / "ckpt")
        edgeseq("convert", ckpt, "-o", out / "bundle")  # default options: ONNX + ExecuTorch
        return out
    return shared_build(root, f"published-{name}", build)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    root = _shared_root(tmp_path_factory)
    cache: dict[str, Path] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            cache[name] = _build(name, root)
        return cache[name] / "ckpt", cache[name] / "bundle"
    return get


def reference(ckpt: Path, text: str, num_beams: int, task: str | None = None) -> tuple[list, str]:
    """transformers' own answer: the checkpoint's tokenizer, ``generate`` with its generation
    config (and the task's settings and prefix, as the pipelines apply them), then decode."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(ckpt)
        model = AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()
        gen = GenerationConfig.from_pretrained(ckpt)
        if task is not None:
            params = dict(model.config.task_specific_params[task])
            text = params.pop("prefix", "") + text
            gen.update(**params)
        gen.max_new_tokens, gen.max_length, gen.num_beams = NEW, None, num_beams
        with torch.no_grad():
            out = model.generate(**tok(text, return_tensors="pt"), generation_config=gen)
    new = out[0, 1:].tolist()  # the decoder start stripped
    return new, tok.decode(out[0], skip_special_tokens=True)


@pytest.mark.parametrize("name", MODELS)
def test_convert_passes_parity_on_both_backends(built, name: str) -> None:
    _, bundle = built(name)
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] is True
    assert {c["format"] for c in parity["checks"]} == {"onnx", "pte"}
    man = json.loads((bundle / "manifest.json").read_text())
    # the tokenizer travels in the bundle, every file named inside it
    from edgeseq import tokenize

    for f in tokenize.files(man["tokenizer"]):
        assert (bundle / f).is_file()
    # parity runs on real text through the checkpoint's own tokenizer
    from edgeseq.families.base import detect_family
    from edgeseq.families.seq2seq import PARITY_TEXT

    ckpt = bundle.parent / "ckpt"
    family = detect_family(json.loads((ckpt / "config.json").read_text()), ckpt)
    tok = tokenize.load(ckpt, tokenize.detect(ckpt))
    source = family.parity_source(family.load(ckpt), tok)
    assert source == _tokenizer(ckpt)(PARITY_TEXT).input_ids


@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize("name", MODELS)
def test_run_text_equals_transformers(built, name: str, beams: int) -> None:
    ckpt, bundle = built(name)
    toks, text = reference(ckpt, TEXT, beams)
    p = edgeseq("run", bundle, "--text", TEXT, "-n", NEW, "--num-beams", beams, "--json")
    out = json.loads(p.stdout)
    assert out["text"] == text
    assert out["tokens"] == toks[:len(out["tokens"])] and len(out["tokens"]) >= len(toks) - 1
    assert out["source_tokens"] == len(_tokenizer(ckpt)(TEXT).input_ids)


def _tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(ckpt)


def test_run_task_prefix_and_settings(built) -> None:
    """``--task translation_en_to_de`` on t5-small: its prefix before the text and its
    generation settings (4 beams, early stopping), as transformers' translation pipeline."""
    ckpt, bundle = built("t5-small")
    toks, text = reference(ckpt, "The house is wonderful.", 4, task="translation_en_to_de")
    out = json.loads(edgeseq("run", bundle, "--text", "The house is wonderful.", "-n", NEW,
                             "--task", "translation_en_to_de", "--json").stdout)
    assert out["num_beams"] == 4 and out["text"] == text
    prefixed = _tokenizer(ckpt)("translate English to German: The house is wonderful.")
    assert out["source_tokens"] == len(prefixed.input_ids)
    plain = json.loads(edgeseq("run", bundle, "--text", "The house is wonderful.", "-n", NEW,
                               "--json").stdout)
    assert plain["source_tokens"] < out["source_tokens"]


def test_run_unknown_task_lists_the_known_ones(built) -> None:
    _, bundle = built("t5-small")
    p = edgeseq("run", bundle, "--text", "x", "--task", "translate_to_klingon", check=False)
    assert p.returncode == 2
    line = error_line(p)
    assert "translate_to_klingon" in line and "translation_en_to_de" in line \
        and "summarization" in line


@pytest.mark.parametrize("name,file,kind", [("opus-mt-en-de", "target.spm", "corrupt"),
                                            ("flan-t5-small", "tokenizer.json", "corrupt"),
                                            ("opus-mt-en-de", "source.spm", "missing")])
def test_convert_refuses_a_bad_tokenizer_file(built, tmp_path: Path, name: str, file: str,
                                               kind: str) -> None:
    ckpt, _ = built(name)
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    if kind == "missing":
        (bad / file).unlink()
    else:
        (bad / file).write_bytes(b"\x00\x01 this is not a tokenizer \xff")
    out = tmp_path / "bundle"
    p = edgeseq("convert", bad, "-o", out, "--skip-parity", check=False)
    assert p.returncode == 2
    assert file in error_line(p)
    assert not out.exists()
