"""Mamba and Mamba-2 as users hold them: the published config.json, generation_config.json and
GPT-NeoX tokenizer files (tests/fixtures/published/, sources in its README) with random weights
of the published shapes (2 layers instead of 24; d_model, vocabulary, state sizes and tying as
published), written in each published layout:

- ``mamba-130m-hf``: a transformers folder (model.safetensors, tied head not stored);
- ``mamba2-130m``: the original mamba_ssm layout (no ``model_type``, ``ssm_cfg``, a
  ``pytorch_model.bin`` in PyTorch's zip format with ``backbone.embedding`` names, fp16 here);
  its reference is transformers' ``Mamba2ForCausalLM`` built from the published transformers
  port's config.json (``mamba2-130m-hf``), so the config translation is checked against it;
- ``mamba2-130m-hf``: that port as a transformers folder (loaded and compared with
  transformers' ``from_pretrained``; its graphs are the mamba_ssm layout's).

The first two are converted once per run with the real CLI's default options (ONNX and
ExecuTorch, parity included), and ``edgeseq run --prompt`` through the CLI must give
transformers' ``generate`` text (greedy, the checkpoint's generation config) decoded by
``AutoTokenizer``. Cost: 7 to 15 min wall on the shared 2-core host (load 5 to 7; most of it
the ExecuTorch lowering of the 50k x 768 embedding models).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import _shared_root, shared_build

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "published"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LAYERS = 2
# Random weights of the published shapes, drawn so that greedy decoding wanders (a tied head
# over N(0, 1) embeddings predicts the input token again, which hides a wrong state) while the
# logits keep a trained model's magnitude (mamba-130m's reach ~170): small embeddings, and the
# final norm's weight scales every logit (the argmax does not depend on it).
EMBED_STD = 0.05
HEAD_GAIN = 20.0
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
NEW_TOKENS = 24


def _cli(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-m", "edgeseq.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _random_model(layout: str) -> torch.nn.Module:
    """transformers' model for a layout, from the published transformers config.json."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    from edgeseq.families.mamba import widen_init

    hf = "mamba-130m-hf" if layout == "mamba-130m-hf" else "mamba2-130m-hf"
    cfg = json.loads((FIX / hf / "config.json").read_text())
    cfg["num_hidden_layers"] = LAYERS
    torch.manual_seed(0)
    if hf == "mamba-130m-hf":
        model = MambaForCausalLM(MambaConfig(**cfg))
    else:
        model = Mamba2ForCausalLM(Mamba2Config(**cfg))
    widen_init(model)
    with torch.no_grad():
        model.backbone.embeddings.weight.mul_(EMBED_STD)
        model.backbone.norm_f.weight.fill_(HEAD_GAIN)
        model.lm_head.weight = model.backbone.embeddings.weight  # tied, as published
    return model.eval()


def write_checkpoint(layout: str, folder: Path) -> Path:
    """The layout's files as published (config with 2 layers) plus random weights."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _random_model(layout)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    cfg = json.loads((FIX / layout / "config.json").read_text())
    if layout == "mamba2-130m":
        cfg["n_layer"] = LAYERS
        # mamba_ssm's own names and a torch.save'd state dict whose head shares the
        # embedding's storage; fp16, so loading upcasts
        sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.half()
              for k, v in sd.items()}
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
        torch.save(sd, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(cfg, indent=4) + "\n")
    else:
        cfg["num_hidden_layers"] = LAYERS
        if "n_layer" in cfg:
            cfg["n_layer"] = LAYERS
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in ("generation_config.json",):
        if (FIX / layout / name).is_file():
            shutil.copy(FIX / layout / name, folder / name)
    # the GPT-NeoX tokenizer is committed once (with mamba-130m-hf); mamba2-130m's users take
    # EleutherAI/gpt-neox-20b's and put it beside the weights
    for name in TOKENIZER_FILES:
        shutil.copy(FIX / "mamba-130m-hf" / name, folder / name)
    return folder


def reference_model(layout: str, folder: Path) -> torch.nn.Module:
    """transformers' own model on the checkpoint's weights, loaded without edgeseq: its
    ``from_pretrained`` for the transformers layouts; for the mamba_ssm layout, the published
    port's config with the fp16 weights upcast (as transformers' conversion script maps them)."""
    from transformers import (AutoModelForCausalLM, GenerationConfig, Mamba2Config,
                              Mamba2ForCausalLM)

    if layout != "mamba2-130m":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = json.loads((FIX / "mamba2-130m-hf" / "config.json").read_text())
    cfg["num_hidden_layers"] = LAYERS
    model = Mamba2ForCausalLM(Mamba2Config(**cfg))
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v.float()
          for k, v in sd.items()}
    model.load_state_dict(sd)
    model.generation_config = GenerationConfig.from_model_config(model.config)
    return model.eval()


def _convert(layout: str, out: Path) -> Path:
    ckpt = write_checkpoint(layout, out.parent / f"{out.name}-ckpt")
    res = _cli("convert", str(ckpt), "-o", str(out))
    (out.parent / f"{out.name}.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory):
    root = _shared_root(tmp_path_factory)
    cache: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in cache:
            cache[layout] = shared_build(root, f"published-{layout}",
                                         lambda out: _convert(layout, out))
        return cache[layout]
    return get


# -- the mamba_ssm layout's config, against the published transformers port ----------------
PORT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim",
               "state_size", "n_groups", "expand", "conv_kernel", "chunk_size", "use_bias",
               "use_conv_bias", "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id",
               "eos_token_id", "pad_token_id", "residual_in_fp32", "rms_norm", "hidden_act")


def test_mamba_ssm_config_reads_as_its_published_transformers_port():
    """state-spaces/mamba2-130m's config.json, translated, against AntonV/mamba2-130m-hf's
    (written by transformers' conversion script from it): the same transformers model."""
    from transformers import Mamba2Config

    from edgeseq.families.mamba import mamba_ssm_layer, mamba_ssm_to_transformers

    ssm = json.loads((FIX / "mamba2-130m" / "config.json").read_text())
    port = Mamba2Config(**json.loads((FIX / "mamba2-130m-hf" / "config.json").read_text()))
    assert mamba_ssm_layer(ssm) == "Mamba2"
    ours = Mamba2Config(**mamba_ssm_to_transformers(ssm, FIX / "mamba2-130m" / "config.json"))
    assert {f: getattr(ours, f) for f in PORT_FIELDS} == {f: getattr(port, f) for f in PORT_FIELDS}
    assert list(ours.time_step_limit) == list(port.time_step_limit)
    # the padded vocabulary (50277 -> 50288) covers the tokenizer's 50277 ids
    tok = json.loads((FIX / "mamba-130m-hf" / "tokenizer.json").read_text())
    ids = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok["added_tokens"]}
    assert len(ids) == max(ids) + 1 == 50277 <= ours.vocab_size


def test_mamba1_ssm_layout_reads_as_the_hf_checkpoint():
    """The original state-spaces/mamba-130m config (mamba_ssm, Mamba1) translates to the
    published mamba-130m-hf model."""
    from transformers import MambaConfig

    from edgeseq.families.mamba import mamba_ssm_layer, mamba_ssm_to_transformers

    ssm = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    hf = MambaConfig(**json.loads((FIX / "mamba-130m-hf" / "config.json").read_text()))
    assert mamba_ssm_layer(ssm) == "Mamba1"
    ours = MambaConfig(**mamba_ssm_to_transformers(ssm, Path("config.json")))
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand",
              "conv_kernel", "time_step_rank", "intermediate_size", "use_bias", "use_conv_bias",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(hf, f) for f in fields}


BAD_SSM = [
    ({"d_intermediate": 1536}, "d_intermediate"),
    ({"attn_layer_idx": [1]}, "attn_layer_idx"),
    ({"rms_norm": False}, "rms_norm"),
    ({"ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}, "ssm_cfg.norm_before_gate"),
    ({"ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "ssm_cfg.D_has_hdim"),
    ({"ssm_cfg": {"layer": "Mamba2", "rmsnorm": False}}, "ssm_cfg.rmsnorm"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_ssm": 512}}, "ssm_cfg.d_ssm"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim_x": 8}}, "headdim_x"),
    ({"ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer"),
    ({"lm_head_bias": True}, "lm_head_bias"),
]


@pytest.mark.parametrize("change, named", BAD_SSM, ids=[n for _, n in BAD_SSM])
def test_mamba_ssm_config_it_cannot_map_is_refused_by_name(change, named):
    from edgeseq.bundle import BundleError
    from edgeseq.families.mamba import mamba_ssm_to_transformers

    cfg = {**json.loads((FIX / "mamba2-130m" / "config.json").read_text()), **change}
    with pytest.raises(BundleError, match=named.replace(".", r"\.")) as e:
        mamba_ssm_to_transformers(cfg, Path("ckpt/config.json"))
    assert "ckpt/config.json" in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_hybrid_mamba_ssm_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = json.loads((FIX / "mamba2-130m" / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "attn_layer_idx": [9, 18]}))
    torch.save({"backbone.embedding.weight": torch.zeros(4, 2)}, ckpt / "pytorch_model.bin")
    res = _cli("convert", str(ckpt), "-o", str(tmp_path / "out"), "-q")
    assert res.returncode == 2
    assert res.stderr.startswith("edgeseq: error: ") and "attn_layer_idx" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- published weights in the transformers port's layout --------------------------------------
def test_port_layout_loads_as_transformers_does(tmp_path):
    """AntonV/mamba2-130m-hf's layout: edgeseq's reference module computes transformers'
    ``from_pretrained`` logits (the same graphs as the mamba_ssm layout, which is converted)."""
    from edgeseq.checkpoint import read_config
    from edgeseq.families.base import detect_family

    ckpt = write_checkpoint("mamba2-130m-hf", tmp_path / "ckpt")
    family = detect_family(read_config(ckpt), ckpt)
    ours = family.load(ckpt)
    ref = reference_model("mamba2-130m-hf", ckpt)
    ids = torch.tensor([[510, 3158, 8516, 30013, 27287, 689, 253, 22658, 4370, 13]])
    with torch.no_grad():
        want = ref(ids).logits
        got = family.reference_logits(ours, ids)
    assert family.name == "mamba2" and got.shape == want.shape
    assert torch.equal(got, want)


# -- converted with the CLI's defaults, run with the CLI ------------------------------------
# the port's layout builds the same graphs as the mamba_ssm layout (same family and config, as
# the first test shows), so it is loaded and compared, not converted a third time
CONVERTED = ("mamba-130m-hf", "mamba2-130m")


@pytest.mark.parametrize("layout", CONVERTED)
def test_convert_defaults_pass_parity_on_both_backends(bundles, layout):
    from transformers import AutoTokenizer

    from edgeseq.convert.parity import PROMPT_TEXT

    b = bundles(layout)
    p = json.loads((b / "parity.json").read_text())
    assert p["passed"]
    assert sorted(c["format"] for c in p["checks"]) == ["onnx", "pte"]
    for c in p["checks"]:
        assert c["tokens_identical"] and c["tokens_compared"] == 64, c
        assert c["prefill_logits_max_abs_err"] <= c["tolerance"], c
    # parity ran on real text through the checkpoint's own tokenizer
    tok = AutoTokenizer.from_pretrained(FIX / "mamba-130m-hf")
    assert p["prompt"] == tok(PROMPT_TEXT)["input_ids"]
    # the conversion's cost is recorded
    assert p["cost"]["wall_s"] > 0 and p["cost"]["peak_rss_bytes"] > 100 * 2**20
    man = json.loads((b / "manifest.json").read_text())
    assert man["config"]["eos_token_id"] == 0 and man["config"]["vocab_size"] == (
        50280 if layout == "mamba-130m-hf" else 50288)
    assert (b / "tokenizer.json").is_file()


def _transformers_text(layout: str, ckpt: Path, prompt: str, n: int) -> tuple[list[int], str]:
    """transformers' greedy ``generate`` with the checkpoint's generation config, decoded by
    ``AutoTokenizer`` on the same folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = reference_model(layout, ckpt)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, generation_config=model.generation_config, do_sample=False,
                             num_beams=1, max_new_tokens=n)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("backend", ["ort", "executorch"])
@pytest.mark.parametrize("layout", CONVERTED)
def test_cli_run_prompt_gives_transformers_text(bundles, layout, backend):
    b = bundles(layout)
    ckpt = b.parent / f"{b.name}-ckpt"
    want_ids, want_text = _transformers_text(layout, ckpt, PROMPT, NEW_TOKENS)
    res = _cli("run", str(b), "--prompt", PROMPT, "-n", str(NEW_TOKENS), "--json",
               "--backend", backend)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    assert got["tokens"] == want_ids
    assert got["text"] == want_text
    assert len(set(want_ids)) > NEW_TOKENS // 2  # the random model wanders: the state matters


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def stream(self, chunk):\n\treturn    chunk[::-1]  # four spaces, a tab, runs",
    "Hello , world . It 's a test , isn't it ?",  # the decode-time clean-up's cases
    "café naïve Ångström 東京 🙂 — “quotes”",
    "cafe\u0301 (a combining accent: NFC)",
    "text<|endoftext|>more text <|padding|>",
    "        indented by eight\n                and sixteen",
]


@pytest.mark.parametrize("text", TEXTS)
def test_bundle_tokenizer_text_equals_autotokenizer(bundles, text):
    from transformers import AutoTokenizer

    from edgeseq import tokenize
    from edgeseq.bundle import read_manifest

    b = bundles("mamba-130m-hf")
    ours = tokenize.load(b, read_manifest(b).tokenizer)
    ref = AutoTokenizer.from_pretrained(FIX / "mamba-130m-hf")
    ids = ref(text)["input_ids"]
    assert ours.encode(text) == ids
    for seq in (ids, [0, *ids, 1, 0]):
        assert ours.decode(seq) == ref.decode(seq, skip_special_tokens=True)
