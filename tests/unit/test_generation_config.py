"""Generation-config fidelity (issue 21, item 3): every field of a checkpoint's generation config
that changes transformers' output changes edgeseq's output in the same way, or ``edgeseq
convert`` refuses the checkpoint naming the field.

Each field test finds a source on which the field changes transformers' ``generate`` (so the
test can fail), then runs the converted bundle with the manifest ``convert`` would write for a
checkpoint with that generation config (``family.model_config``: the capture path) and asserts
the same tokens as transformers, with and without the field. One tiny T5 and one tiny BART
(the shared ``bundle_of`` bundles) serve every field: only ``manifest.json`` is rewritten, in a
folder whose graph files are links to the converted bundle's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeseq import generation
from edgeseq.registry import families

ARCHS = ("t5", "bart")


class Arch:
    """A tiny checkpoint's transformers model, its converted bundle, and runs of both under a
    changed generation config."""

    def __init__(self, name: str, ckpt: Path, bundle: Path, tmp: Path):
        self.name, self.ckpt, self.bundle, self.tmp = name, ckpt, bundle, tmp
        self.family = families()[name]()
        self.model = self.family.load(ckpt)
        self.base = self.model.generation_config
        self.eos = int(self.model.config.eos_token_id)
        self.manifest = json.loads((bundle / "manifest.json").read_text())
        self._folders = 0
        rng = np.random.default_rng(0)
        # hand-made sources with repeated n-grams first, then random ones (in and out of the
        # alphabet the tiny models were trained to copy)
        self.sources = [[9, 12, 9, 12, 15, 9, 12, 20, self.eos]]
        for i in range(60):
            hi = 24 if i < 30 else 90
            self.sources.append(rng.integers(8, hi, size=int(rng.integers(4, 16))).tolist()
                                + [self.eos])
        rng = np.random.default_rng(1)  # longer ones: where beams disagree more
        for _ in range(200):
            self.sources.append(rng.integers(8, 90, size=int(rng.integers(4, 30))).tolist()
                                + [self.eos])

    def config(self, fields: dict[str, Any]) -> Any:
        from transformers import GenerationConfig

        # a config as read from a generation_config.json (not re-derived from config.json)
        return GenerationConfig.from_dict({**self.base.to_dict(), "_from_model_config": False,
                                           **fields})

    def reference(self, source: list[int], fields: dict[str, Any], seed: int | None = None
                  ) -> list[int]:
        """New tokens of transformers' ``generate`` under the checkpoint's generation config
        with ``fields`` changed (no argument but the source: the config decides everything)."""
        self.model.generation_config = self.config(fields)
        try:
            ids = torch.tensor([source])
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
            prompt = self.family.model_config(self.model)["decoder_prompt"]
        finally:
            self.model.generation_config = self.base
        return out[0].tolist()[len(prompt):]

    def bundle_with(self, fields: dict[str, Any]) -> Path:
        """The bundle as ``convert`` would write it for the checkpoint with ``fields`` in its
        generation config (graphs linked, the manifest's config captured anew)."""
        self.model.generation_config = self.config(fields)
        try:
            cfg = self.family.model_config(self.model)
        finally:
            self.model.generation_config = self.base
        self._folders += 1
        folder = self.tmp / f"{self.name}-{self._folders}"
        folder.mkdir()
        for f in self.bundle.iterdir():
            if f.name != "manifest.json":
                os.link(f, folder / f.name)
        man = json.loads(json.dumps(self.manifest))
        man["config"].update(cfg)
        (folder / "manifest.json").write_text(json.dumps(man))
        return folder

    def edgeseq(self, source: list[int], fields: dict[str, Any], **kw: Any) -> list[int]:
        import edgeseq

        sess = edgeseq.load(self.bundle_with(fields), backend="ort", threads=1)
        return [int(t) for t in sess.generate(source, **kw)]

    def find_source(self, base: dict[str, Any], changed: dict[str, Any]) -> list[int]:
        """The first source on which ``changed`` makes transformers decode differently from
        ``base``."""
        for src in self.sources:
            if self.reference(src, base) != self.reference(src, changed):
                return src
        pytest.fail(f"{self.name}: no source on which {changed} changes transformers' output")


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest, checkpoints: dict[str, Path], bundle_of: Any,
         tmp_path_factory: pytest.TempPathFactory) -> Arch:
    torch.set_num_threads(1)
    name = request.param
    return Arch(name, checkpoints[name], bundle_of(name), tmp_path_factory.mktemp(name))


# (test id, the base fields, the changed fields): each pair changes transformers' output on some
# source, with everything else the checkpoint's own generation config
FIELDS = [
    ("repetition_penalty", {}, {"repetition_penalty": 3.0}),
    ("repetition_penalty<1", {}, {"repetition_penalty": 0.3}),
    ("no_repeat_ngram_size", {}, {"no_repeat_ngram_size": 2}),
    ("encoder_no_repeat_ngram_size", {}, {"encoder_no_repeat_ngram_size": 2}),
    ("min_length", {}, {"min_length": 14}),
    ("min_new_tokens", {}, {"min_new_tokens": 13}),
    ("min_new_tokens_over_min_length", {"min_length": 14}, {"min_length": 14, "min_new_tokens": 3}),
    ("forced_bos_token_id", {}, {"forced_bos_token_id": 5}),
    ("forced_eos_token_id", {"max_new_tokens": 4}, {"max_new_tokens": 4, "forced_eos_token_id": 7}),
    ("bad_words_ids", {}, {"bad_words_ids": [[9]]}),
    ("bad_words_ids_multi", {}, {"bad_words_ids": [[9, 12]]}),
    ("bad_words_ids_multi3", {}, {"bad_words_ids": [[9, 12, 15], [3, 4]]}),
    ("suppress_tokens", {}, {"suppress_tokens": [9]}),
    ("begin_suppress_tokens", {}, {"begin_suppress_tokens": [9]}),
    ("num_beams", {}, {"num_beams": 4}),
    ("length_penalty", {"num_beams": 4}, {"num_beams": 4, "length_penalty": -3.0}),
    ("length_penalty>1", {"num_beams": 4}, {"num_beams": 4, "length_penalty": 2.0}),
    ("early_stopping", {"num_beams": 4}, {"num_beams": 4, "early_stopping": True}),
    ("early_stopping_never", {"num_beams": 4}, {"num_beams": 4, "early_stopping": "never"}),
    ("renormalize_logits", {"num_beams": 4, "no_repeat_ngram_size": 2},
     {"num_beams": 4, "no_repeat_ngram_size": 2, "renormalize_logits": True}),
    ("max_length", {}, {"max_length": 6}),
    ("max_new_tokens", {}, {"max_new_tokens": 3}),
    ("max_new_tokens_over_max_length", {"max_length": 6}, {"max_length": 6, "max_new_tokens": 9}),
    ("decoder_start_token_id", {}, {"decoder_start_token_id": 5}),
]


@pytest.mark.parametrize("case", FIELDS, ids=[c[0] for c in FIELDS])
def test_field_changes_edgeseq_as_transformers(arch: Arch, case: tuple) -> None:
    name, base, changed = case
    src = arch.find_source(base, changed)
    want_base, want = arch.reference(src, base), arch.reference(src, changed)
    assert arch.edgeseq(src, base) == want_base
    assert arch.edgeseq(src, changed) == want, (name, src)


def test_multi_token_bad_word_needs_its_whole_prefix(arch: Arch) -> None:
    """[a, b] bans b only right after a; a sequence longer than the context so far (the
    decoder start token as its prefix, at the first step) is not looked at, as transformers."""
    start = arch.family.model_config(arch.model)["decoder_prompt"][0]
    src = arch.sources[0]
    first = arch.reference(src, {})[0]
    fields = {"bad_words_ids": [[start, first]]}
    assert arch.reference(src, fields) == arch.reference(src, {})
    assert arch.edgeseq(src, fields) == arch.reference(src, fields)


def test_bad_word_equal_to_eos_is_not_banned(arch: Arch) -> None:
    src = arch.sources[0]
    fields = {"bad_words_ids": [[arch.eos], [9]]}
    want = arch.reference(src, fields)
    assert want[-1] == arch.eos
    assert arch.edgeseq(src, fields) == want


def test_do_sample_in_the_config_samples_by_default(arch: Arch) -> None:
    """A config with ``do_sample`` samples without being asked (as transformers' generate),
    with transformers' top-k of 50; ``do_sample=False`` overrides it; and with ``top_k=1``
    sampling is greedy for both."""
    src = arch.sources[0]
    greedy = arch.reference(src, {})
    fields = {"do_sample": True, "temperature": 3.0}
    ref = {tuple(arch.reference(src, fields, seed=s)) for s in range(6)}
    assert len(ref) > 1  # the field changes transformers' output
    import edgeseq

    sess = edgeseq.load(arch.bundle_with(fields), backend="ort", threads=1)
    assert sess.sampling().top_k == 50 and sess.sampling().temperature == 3.0
    got = {tuple(int(t) for t in sess.generate(src, seed=s)) for s in range(6)}
    assert len(got) > 1
    assert [int(t) for t in sess.generate(src, do_sample=False)] == greedy
    one = {"do_sample": True, "top_k": 1, "temperature": 3.0}
    assert arch.edgeseq(src, one, seed=0) == arch.reference(src, one, seed=0) == greedy


@pytest.mark.parametrize("fields", [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8},
                                    {"temperature": 1.5, "top_k": 7, "top_p": 0.9}, {}],
                         ids=["temperature", "top_k", "top_p", "all", "defaults"])
def test_sampling_distribution_equals_transformers_warpers(arch: Arch, fields: dict) -> None:
    """The distribution edgeseq samples from under the config's temperature / top-k / top-p is
    the one transformers' processors and warpers leave (its ``_get_logits_processor``), at the
    first two decoder steps (BART forces its BOS at the first)."""
    import edgeseq
    from edgeseq.runtime.decoding import probabilities

    gen = {"do_sample": True, **fields}
    sess = edgeseq.load(arch.bundle_with(gen), backend="ort", threads=1)
    src = arch.sources[0]
    gc = arch.config(gen)
    arch.model._prepare_special_tokens(gc, kwargs_has_attention_mask=True, device="cpu")
    procs = arch.model._get_logits_processor(generation_config=gc, input_ids_seq_length=1,
                                             encoder_input_ids=torch.tensor([src]),
                                             device="cpu")
    mine = sess._processors(sess.default_max_new_tokens(), False)
    sess.encode(src)
    sess.start(1)
    seq = list(sess.decoder_prompt)
    for _ in range(2):
        logits = sess.step(np.array(seq[-1:]))
        want = torch.softmax(procs(torch.tensor([seq]), torch.tensor(logits)).double(), -1)
        got = probabilities(mine(np.array([seq]), logits), sess.sampling())
        np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
        assert (got > 0).sum() == (want > 0).sum().item()
        seq.append(int(np.argmax(got)))


def test_processors_equal_transformers_processors(arch: Arch) -> None:
    """Every honoured processor at once, on random scores and decoder sequences of every
    length, against the list transformers' generate builds from the same config (order
    included)."""
    from edgeseq.runtime.processors import Processors

    fields = {"repetition_penalty": 1.7, "no_repeat_ngram_size": 2,
              "encoder_no_repeat_ngram_size": 3, "bad_words_ids": [[9], [12, 15], [9, 12, 20]],
              "min_new_tokens": 4, "forced_bos_token_id": 5, "forced_eos_token_id": 7,
              "suppress_tokens": [3], "begin_suppress_tokens": [10], "max_length": 9,
              "renormalize_logits": True}
    gc = arch.config(fields)
    arch.model._prepare_special_tokens(gc, kwargs_has_attention_mask=True, device="cpu")
    src = arch.sources[0]
    procs = arch.model._get_logits_processor(generation_config=gc, input_ids_seq_length=1,
                                             encoder_input_ids=torch.tensor([src]),
                                             device="cpu")
    arch.model.generation_config = gc
    try:
        cfg = arch.family.model_config(arch.model)
    finally:
        arch.model.generation_config = arch.base
    prompt = cfg["decoder_prompt"]
    mine = Processors.from_config(cfg["generation"], len(prompt),
                                  generation.default_max_new_tokens(cfg["generation"],
                                                                    len(prompt)), source=src)
    rng = np.random.default_rng(1)
    v = arch.model.config.vocab_size
    for cur in range(1, 9):
        seqs = np.concatenate([np.full((4, 1), prompt[0]),
                               rng.choice([9, 12, 15, 20, 8], size=(4, cur - 1))], 1)
        scores = rng.standard_normal((4, v)).astype(np.float32) * 3
        want = procs(torch.tensor(seqs), torch.tensor(scores)).numpy()
        got = mine(seqs, scores)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"length {cur}")


def test_cli_defaults_to_the_checkpoints_limit(arch: Arch) -> None:
    """``edgeseq run`` without ``-n`` stops where the checkpoint's generation config does."""
    from edgeseq.cli import main

    src = arch.sources[0]
    fields = {"max_new_tokens": 3}
    want = arch.reference(src, fields)
    res = CliRunner().invoke(main, ["run", str(arch.bundle_with(fields)), "--prompt-ids",
                                    ",".join(map(str, src)), "--json", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["tokens"] == want
    assert len(want) == 3


def test_defaults_are_transformers_defaults() -> None:
    from transformers import GenerationConfig

    d = GenerationConfig().to_dict()
    assert {k: d[k] for k in generation.DEFAULTS} == generation.DEFAULTS
    # every field transformers has is classified: honoured somewhere, no effect, a sampling
    # warper (refused when sampling unless honoured), or refused by check()
    assert set(generation.GENERATION_FIELDS) <= set(d)


# -- refused at convert time -------------------------------------------------------------------

def _convert(ckpt: Path, out: Path) -> Any:
    from edgeseq.cli import main

    return CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--format", "onnx",
                                     "--skip-parity", "--quiet"])


@pytest.mark.parametrize("fields,named", [
    ({"exponential_decay_length_penalty": [5, 1.5]}, "exponential_decay_length_penalty"),
    ({"num_beams": 4, "num_beam_groups": 2}, "num_beam_groups"),
    ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0}, "diversity_penalty"),
    ({"do_sample": True, "typical_p": 0.9}, "typical_p"),
    ({"do_sample": True, "num_beams": 4}, "beam sampling"),
    ({"sequence_bias": [[[9], -5.0]]}, "sequence_bias"),
], ids=["exponential_decay", "group_beams", "diversity", "typical_p", "beam_sampling",
        "sequence_bias"])
def test_unsupported_field_is_refused_at_convert(checkpoints: dict[str, Path], tmp_path: Path,
                                                 fields: dict, named: str) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["t5"], ckpt)
    gen_file = ckpt / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    gen_file.write_text(json.dumps({**gen, **fields}))
    out = tmp_path / "out"
    res = _convert(ckpt, out)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("edgeseq: error:")]
    assert len(lines) == 1 and named in lines[0] and "generation_config.json" in lines[0], \
        res.output
    assert not out.exists()


def test_typical_p_without_sampling_is_no_effect(checkpoints: dict[str, Path]) -> None:
    """A sampling warper in a greedy config changes nothing in transformers: accepted."""
    from transformers import GenerationConfig

    fam = families()["t5"]()
    model = fam.load(checkpoints["t5"])
    model.generation_config = GenerationConfig(typical_p=0.5, top_k=3, decoder_start_token_id=0)
    generation.check(model, checkpoints["t5"], fam)


def test_generation_fields_of_config_json_are_read(checkpoints: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """Without generation_config.json, config.json's generation fields are the config (as
    transformers' from_model_config): a refused one names config.json."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["t5"], ckpt)
    (ckpt / "generation_config.json").unlink(missing_ok=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "encoder_repetition_penalty": 1.5}))
    out = tmp_path / "out"
    res = _convert(ckpt, out)
    assert res.exit_code == 2, res.output
    assert "config.json: encoder_repetition_penalty = 1.5" in res.output
    assert not out.exists()


def test_causal_lm_refuses_what_its_runtime_does_not_apply(tmp_path: Path) -> None:
    """Causal-LM sessions apply EOS only: a causal checkpoint asking for more is refused."""
    from transformers import GenerationConfig

    fam = families()["mamba"]()

    class Model:  # what check() reads of a loaded model
        generation_config = GenerationConfig(eos_token_id=0, bos_token_id=0, pad_token_id=0)

    generation.check(Model(), tmp_path, fam)
    Model.generation_config = GenerationConfig(eos_token_id=0, repetition_penalty=1.2)
    from edgeseq.bundle import BundleError

    with pytest.raises(BundleError, match=r"config.json: repetition_penalty = 1.2 .*causal_lm"):
        generation.check(Model(), tmp_path, fam)


# -- published generation configs ----------------------------------------------------------------

PUBLISHED = Path(__file__).parents[1] / "fixtures" / "published"


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in
                                          PUBLISHED.glob("*/generation_config.json")))
def test_published_generation_configs_are_accepted(folder: str) -> None:
    """Every published generation config in the fixtures (tests/fixtures/published/README.md)
    sets only fields edgeseq honours or that have no effect: convert does not refuse it."""
    from transformers import GenerationConfig

    from edgeseq.checkpoint import read_config
    from edgeseq.families.base import detect_family

    path = PUBLISHED / folder
    fam = detect_family(read_config(path), path)

    class Model:  # what check() reads of a loaded model
        generation_config = GenerationConfig.from_pretrained(path)

    generation.check(Model(), path, fam)


def test_published_bart_base_generation_config(arch: Arch) -> None:
    """bart-base's published generation config (4 beams, early stopping, no repeated 3-grams,
    forced BOS and EOS; the tiny BART has its token ids) decodes as transformers does."""
    if arch.name != "bart":
        pytest.skip("bart-base's token ids are BART's")
    fields = {k: v for k, v in json.loads(
        (PUBLISHED / "bart-base" / "generation_config.json").read_text()).items()
        if not k.startswith("_") and k != "transformers_version"}
    src = arch.find_source({}, fields)
    for s in [src, *arch.sources[:4]]:
        assert arch.edgeseq(s, fields) == arch.reference(s, fields), s


def test_whisper_long_form_fallback_fields_are_refused_and_sampling_is_not_applied(
        tmp_path: Path) -> None:
    """Whisper's generate reads its long-form thresholds from the config (refused: edgeseq does
    not implement the fallback) and overrides do_sample (greedy unless a temperature is passed),
    so a config's do_sample must not make edgeseq sample."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from edgeseq.bundle import BundleError
    from edgeseq.runtime.decoding import SamplingConfig

    whisper = families()["whisper"]()
    for name, value in (("no_speech_threshold", 0.6), ("logprob_threshold", -1.0),
                        ("compression_ratio_threshold", 1.35), ("condition_on_prev_tokens", True)):
        model = SimpleNamespace(generation_config=GenerationConfig(**{name: value}))
        with pytest.raises(BundleError, match=name):
            generation.check(model, tmp_path, whisper)
    sampled = GenerationConfig(do_sample=True, temperature=0.7, top_k=5)
    generation.check(SimpleNamespace(generation_config=sampled), tmp_path, whisper)
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 5}
    # the manifest records what the runtime applies: Whisper's overridden fields are left out
    assert SamplingConfig.from_generation(whisper.effective_generation(gen)) == SamplingConfig()
    assert SamplingConfig.from_generation(families()["t5"]().effective_generation(gen)).do_sample
