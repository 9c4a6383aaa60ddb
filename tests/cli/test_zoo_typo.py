"""The encoder-decoder zoo default, zoo:t5-typo-bytes, converted and run as a user would."""
from __future__ import annotations

import json

import pytest

from .test_cli import edgeseq

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def typo_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("typo") / "bundle"
    edgeseq("convert", "zoo:t5-typo-bytes", "-o", str(out), "--format", "onnx")
    return out


def test_zoo_lists_the_seq2seq_defaults():
    rows = {r["name"]: r for r in json.loads(edgeseq("zoo", "--json").stdout)}
    assert rows["t5-typo-bytes"]["family"] == "t5" and rows["t5-typo-bytes"]["available"]
    assert rows["whisper-tonespeech"]["task"] == "speech_seq2seq"


def test_typo_fixer_corrects_and_passes_parity(typo_bundle):
    parity = json.loads((typo_bundle / "parity.json").read_text())
    assert parity["passed"] and parity["checks"], parity
    out = json.loads(edgeseq("run", typo_bundle, "--text", "Retrun the numbr of itmes in the lsit.",
                             "--json").stdout)
    assert out["num_beams"] == 4  # from the checkpoint's generation config
    assert out["text"] == "Return the number of items in the list."
    clean = "Return the number of items in the list."
    assert json.loads(edgeseq("run", typo_bundle, "--text", clean, "--json").stdout)["text"] == clean
