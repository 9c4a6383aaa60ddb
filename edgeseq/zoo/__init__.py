"""The zoo: small models trained by this project and shipped inside the package.

Each lives in a folder beside this file (a checkpoint folder any family loader reads) with the
script that trained it. ``zoo:NAME`` works wherever a checkpoint path does.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgeseq.bundle import BundleError
from edgeseq.paths import cache_root

ROOT = Path(__file__).parent
PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    task: str
    description: str
    train_script: str
    # A derived model is built on first use from a shipped one (``(base, widening factor)``,
    # edgeseq/zoo/widen.py) into the cache: too large to ship, exact to rebuild.
    derived: tuple[str, int] | None = None

    @property
    def path(self) -> Path:
        return cache_root() / "zoo" / self.name if self.derived else ROOT / self.name

    @property
    def available(self) -> bool:
        return (ROOT / self.derived[0]).is_dir() if self.derived else self.path.is_dir()


MODELS = [
    ZooModel("mamba-bytes", "mamba", "causal_lm",
             "byte-level Mamba LM (4 layers) trained on the Python standard library's sources",
             "edgeseq/zoo/train_mamba_bytes.py"),
    ZooModel("mamba-bytes-draft", "mamba", "causal_lm",
             "1-layer byte Mamba (150 k params) distilled from mamba-bytes as its speculative-decoding "
             "draft; greedy top-1 agreement with it 0.77, ~7x cheaper ONNX step",
             "edgeseq/zoo/train_mamba_draft.py"),
    ZooModel("mamba-bytes-x4", "mamba", "causal_lm",
             "mamba-bytes widened exactly to Mamba-130M's width (d 768, 4 layers, 60 MB): the same "
             "predictions, bound by weight traffic; built into the cache on first use",
             "edgeseq/zoo/widen.py", derived=("mamba-bytes", 4)),
    ZooModel("whisper-tonespeech", "whisper", "speech_seq2seq",
             "tiny Whisper (2 encoder / 4 decoder layers, 10 s window) that transcribes tone speech, "
             "a synthetic spoken language (edgeseq/zoo/tonespeech.py)",
             "edgeseq/zoo/train_tonespeech_whisper.py"),
    ZooModel("t5-typo-bytes", "t5", "seq2seq",
             "byte-level T5 (3 encoder / 2 decoder layers) that fixes keyboard typos in English text, "
             "trained on the Python standard library's docstrings",
             "edgeseq/zoo/train_typo_fixer.py"),
    ZooModel("lmuformer-digits", "lmuformer", "classification",
             "LMUFormer (14 k params) reading scikit-learn's 8x8 digits pixel by pixel (64 frames); "
             "test accuracy 98.3%", "edgeseq/zoo/train_lmuformer_digits.py"),
    ZooModel("slmuformer-digits", "lmuformer", "classification",
             "spiking LMUFormer (LIF neurons, 22 k params) on the same digits; test accuracy 97.2%",
             "edgeseq/zoo/train_lmuformer_digits.py"),
]
DEFAULT = "mamba-bytes"


def get(name: str) -> ZooModel:
    for m in MODELS:
        if m.name == name:
            return m
    raise BundleError(f"zoo:{name}: no such zoo model; known: {', '.join(m.name for m in MODELS)}")


def resolve(path: str | Path) -> Path:
    """``zoo:NAME`` -> the model's folder; any other path is returned unchanged."""
    s = str(path)
    if s.startswith(PREFIX):
        m = get(s[len(PREFIX):])
        if m.derived:
            return _materialize(m)
        if not m.path.is_dir():
            raise BundleError(f"{s}: the zoo model's files are missing from {m.path} "
                              f"(train it with {m.train_script})")
        return m.path
    return Path(path)


def _materialize(m: ZooModel) -> Path:
    """Build a derived model into the cache, or reuse the copy built from the same base."""
    from edgeseq.zoo.widen import widen_checkpoint

    base, factor = m.derived
    src = resolve(PREFIX + base)
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    stamp = {"base": base, "factor": factor, "sha256": digest}
    mark = m.path / "derived_from.json"
    if mark.is_file() and json.loads(mark.read_text()) == stamp:
        return m.path
    return widen_checkpoint(src, m.path, factor, stamp)
