"""Published weight layouts (issue 21 item 4): sharded safetensors and sharded ``.bin`` with their
index, ``pytorch_model.bin`` in PyTorch's zip format, ``.pth`` files, fp16 / bf16 checkpoints
(upcast; the manifest records the stored dtype), tied and untied output embeddings, and the bad
inputs each layout can bring. Checkpoints are written by transformers' own ``save_pretrained``
from the published configs in ``tests/fixtures/published`` (fewer layers, random weights); every
load is compared with the model that was saved, never with itself."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from edgeseq.bundle import BundleError
from edgeseq.checkpoint import load_state_dict, read_config, stored_dtype, weight_files
from edgeseq.registry import get_family

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "published"
# fewer and thinner layers than published, so that saving and loading stay cheap; the conventions
# under test (tying, shard naming, dtypes) do not depend on the sizes
SMALL_T5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                num_heads=4)
SMALL_BART = dict(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, max_position_embeddings=64)


def _published(name: str, **small) -> dict:
    cfg = json.loads((PUBLISHED / name / "config.json").read_text())
    cfg.update(small)
    return cfg


def _t5(name: str, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = {k: v for k, v in _published(name, **SMALL_T5).items()
           if k not in ("architectures", "transformers_version")}
    return T5ForConditionalGeneration(T5Config(**cfg)).eval()


def _bart(seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = {k: v for k, v in _published("bart-base", **SMALL_BART).items()
           if k not in ("architectures", "transformers_version")}
    return BartForConditionalGeneration(BartConfig(**cfg)).eval()


def _same_weights(model, loaded) -> None:
    """Every tensor of the loaded model equals the saved model's, upcast to float32."""
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v.float()), k


# -- sharded ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[object, Path]:
    model = _t5("flan-t5-small")
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, max_shard_size="40KB")
    return model, folder


def test_sharded_safetensors_load_every_shard(sharded):
    model, folder = sharded
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    assert weight_files(folder) == shards
    _same_weights(model, get_family("t5").load(folder))


def test_sharded_bin_index(tmp_path):
    model = _t5("flan-t5-small", seed=1)
    model.save_pretrained(tmp_path, max_shard_size="40KB", safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    assert len(list(tmp_path.glob("pytorch_model-*-of-*.bin"))) > 2
    _same_weights(model, get_family("t5").load(tmp_path))


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_missing_shard(sharded, tmp_path):
    src = _copy(sharded[1], tmp_path / "ck")
    gone = sorted(src.glob("model-*-of-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(BundleError, match=f"{gone.name}: missing shard"):
        load_state_dict(src)


def test_corrupt_index(sharded, tmp_path):
    src = _copy(sharded[1], tmp_path / "ck")
    idx = src / "model.safetensors.index.json"
    idx.write_text(idx.read_text()[:-20])
    with pytest.raises(BundleError, match="model.safetensors.index.json: not valid JSON"):
        weight_files(src)


def test_index_naming_a_file_outside_the_folder(sharded, tmp_path):
    src = _copy(sharded[1], tmp_path / "ck")
    idx = src / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    shutil.copy(src / data["weight_map"][first], tmp_path / "x.safetensors")
    data["weight_map"][first] = "../x.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"'\.\./x\.safetensors'.*outside the checkpoint folder"):
        load_state_dict(src)


def test_shard_the_index_does_not_name(sharded, tmp_path):
    src = _copy(sharded[1], tmp_path / "ck")
    shards = sorted(src.glob("model-*-of-*.safetensors"))
    stray = src / shards[0].name.replace("00001", "00099")
    shutil.copy(shards[0], stray)
    with pytest.raises(BundleError, match=f"{stray.name}: a shard that .* does not name"):
        load_state_dict(src)


def test_tensor_listed_but_absent(sharded, tmp_path):
    src = _copy(sharded[1], tmp_path / "ck")
    idx = src / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"]["decoder.block.9.layer.0.SelfAttention.q.weight"] = shard
    idx.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=rf"{shard}: lacks 1 tensor.*decoder\.block\.9"):
        load_state_dict(src)


def test_cli_missing_shard_is_one_line_and_writes_nothing(sharded, tmp_path):
    from ..cli.test_cli import edgeseq, error_line

    src = _copy(sharded[1], tmp_path / "ck")
    sorted(src.glob("model-*-of-*.safetensors"))[0].unlink()
    out = tmp_path / "out"
    p = edgeseq("convert", src, "-o", out, "--format", "onnx", check=False)
    assert p.returncode == 2 and "missing shard" in error_line(p)
    assert not out.exists() and not [f for f in tmp_path.iterdir() if f.name.startswith(".out")]


# -- pickles ---------------------------------------------------------------------------------------
def test_pytorch_model_bin_zip_format(tmp_path):
    import zipfile

    model = _bart(seed=2)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert zipfile.is_zipfile(tmp_path / "pytorch_model.bin")  # PyTorch's zip format
    _same_weights(model, get_family("bart").load(tmp_path))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pth"])
def test_code_running_pickle_is_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    sd = {"w": torch.zeros(2), "x": _Evil(marker)}
    torch.save(sd, tmp_path / name)  # a zip-format checkpoint whose pickle imports os.system
    with pytest.raises(BundleError, match="refused: this pickle would import or run code"):
        load_state_dict(tmp_path / name)
    with open(tmp_path / "legacy.pt", "wb") as f:  # and the legacy (non-zip) format
        pickle.dump(sd, f)
    with pytest.raises(BundleError, match="refused"):
        load_state_dict(tmp_path / "legacy.pt")
    assert not marker.exists()


def test_pth_wrapped_by_a_training_script(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    torch.save({"epoch": 7, "state_dict": sd, "best_acc": 0.9}, tmp_path / "ckpt.pth")
    got = load_state_dict(tmp_path / "ckpt.pth")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    # a folder holding one .pth: the same
    assert load_state_dict(tmp_path).keys() == sd.keys()
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    torch.save(opt.state_dict(), tmp_path / "best_optim_state.pth")
    with pytest.raises(BundleError, match="an optimizer state"):
        load_state_dict(tmp_path / "best_optim_state.pth")
    with pytest.raises(BundleError, match="several weight files"):
        weight_files(tmp_path)


def test_weights_file_without_config(tmp_path):
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "model.pth")
    with pytest.raises(BundleError, match="unknown architecture and no config.json"):
        read_config(tmp_path / "model.pth")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match="expected a checkpoint folder .* or a weights file"):
        read_config(tmp_path / "notes.txt")


# -- dtypes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,safe", [(torch.float16, True), (torch.bfloat16, False)])
def test_half_precision_checkpoints_are_upcast(tmp_path, dtype, safe):
    model = _t5("t5-small", seed=3).to(dtype)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    name = str(dtype).removeprefix("torch.")
    assert stored_dtype(tmp_path) == name
    loaded = get_family("t5").load(tmp_path)
    _same_weights(model, loaded)  # the exact upcast of what was stored


@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory):
    """The one conversion here: a sharded bf16 Flan-T5 (untied head), ONNX, parity included."""
    from edgeseq.convert.pipeline import convert

    root = tmp_path_factory.mktemp("bf16")
    model = _t5("flan-t5-small", seed=4).to(torch.bfloat16)
    model.save_pretrained(root / "ck", max_shard_size="40KB")
    out = convert(root / "ck", root / "out", formats=("onnx",), parity_tokens=8)
    return model, out


def test_bf16_sharded_converts_with_parity_against_the_upcast_model(bf16_bundle):
    model, out = bf16_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["dtype"] == "bfloat16"
    assert len(manifest["source"]["files"]) >= 2  # every shard is part of the source
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["checks"][0]["tokens_identical"]
    # parity's reference is the family's loaded model: the exact float32 upcast of the stored
    # bf16 weights (test_half_precision_checkpoints_are_upcast), not a bf16 model


# -- tied and untied output embeddings -------------------------------------------------------------
def _drop(folder: Path, key: str) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    assert key in sd
    del sd[key]
    save_file(sd, f, metadata={"format": "pt"})


def test_t5_v1_tied_head_is_the_embedding(tmp_path):
    model = _t5("t5-small", seed=5)
    assert model.config.tie_word_embeddings
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers drops the tied copy
    loaded = get_family("t5").load(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.shared.weight.data_ptr()
    _same_weights(model, loaded)


def test_flan_t5_untied_head_missing_is_refused(tmp_path):
    model = _t5("flan-t5-small", seed=6)
    assert not model.config.tie_word_embeddings
    model.save_pretrained(tmp_path)
    loaded = get_family("t5").load(tmp_path)  # complete: its own head, not the embedding
    assert not torch.equal(loaded.lm_head.weight, loaded.shared.weight)
    _same_weights(model, loaded)
    _drop(tmp_path, "lm_head.weight")
    with pytest.raises(BundleError, match="lm_head.weight is missing, and config.json does not "
                                          "tie it.*tie_word_embeddings: false"):
        get_family("t5").load(tmp_path)


def test_bart_tied_head(tmp_path):
    model = _bart(seed=7)
    model.save_pretrained(tmp_path)
    loaded = get_family("bart").load(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.model.shared.weight)
    _same_weights(model, loaded)
