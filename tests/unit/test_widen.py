"""Exact widening (edgeseq/zoo/widen.py): the widened Mamba predicts what the original does."""
import json

import pytest
import torch

from edgeseq.bundle import BundleError
from edgeseq.checkpoint import load_state_dict, read_config
from edgeseq.registry import get_family
from edgeseq.zoo.widen import widen_checkpoint, widen_state_dict


@pytest.mark.parametrize("tied", [True, False])
def test_widened_mamba_has_the_same_logits(tmp_path, tied):
    fam = get_family("mamba")
    src = fam.make_test_checkpoint(tmp_path / "src", seed=3, tie_word_embeddings=tied)
    dst = widen_checkpoint(src, tmp_path / "wide", 3)
    a, b = fam.load(src), fam.load(dst)
    assert b.config.hidden_size == 3 * a.config.hidden_size
    assert b.config.intermediate_size == 3 * a.config.intermediate_size
    assert sum(p.numel() for p in b.parameters()) > 6 * sum(p.numel() for p in a.parameters())
    ids = torch.randint(0, a.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.allclose(la, lb, atol=2e-4, rtol=1e-4), float((la - lb).abs().max())
    assert torch.equal(la.argmax(-1), lb.argmax(-1))


def test_widening_a_weight_it_has_no_rule_for_fails(tmp_path):
    src = get_family("mamba").make_test_checkpoint(tmp_path / "src")
    sd = load_state_dict(src)
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    with pytest.raises(BundleError, match="no rule for the weight"):
        widen_state_dict(sd, read_config(src), 2)
    with pytest.raises(BundleError, match="Mamba"):
        widen_state_dict(sd, {"model_type": "t5"}, 2)


def test_derived_zoo_model_is_built_once_into_the_cache(tmp_path, monkeypatch):
    from edgeseq import zoo

    monkeypatch.setenv("EDGESEQ_CACHE", str(tmp_path))
    path = zoo.resolve("zoo:mamba-bytes-x4")
    assert path == tmp_path / "zoo" / "mamba-bytes-x4"
    assert read_config(path)["hidden_size"] == 4 * read_config(zoo.ROOT / "mamba-bytes")["hidden_size"]
    stamp = json.loads((path / "derived_from.json").read_text())
    assert stamp["base"] == "mamba-bytes" and stamp["factor"] == 4
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert zoo.resolve("zoo:mamba-bytes-x4") == path          # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == before
    (path / "derived_from.json").write_text("{}")             # another base: rebuilt
    zoo.resolve("zoo:mamba-bytes-x4")
    assert json.loads((path / "derived_from.json").read_text()) == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
