"""The LMUFormer repository's checkpoints as its training script saves them (issue 21 item 4).

``best_model.pth`` (a ``DataParallel`` state dict, ``fft_H`` complex buffers included) of an
independent re-expression of upstream's modules (``upstream_lmuformer``), random weights, is
converted from the file as given (the non-spiking one by the CLI, nothing beside it) -- sizes
inferred from the weights, the rest in upstream's own argument names -- and the bundle is compared, frame by frame, with that upstream-equivalent
reference on ONNX Runtime and ExecuTorch: the same prediction after every frame, logits within
1e-4, on inputs under which every spiking layer fires in every quarter of the sequence.

Sizes: upstream's spiking patch embedding only works at 128 input channels and 256 dims (its
convolutions ignore the sizes it is given; ``upstream_lmuformer.Conv1d4EB``); converting that
size takes minutes on two cores, so the spiking model here is the same module tree at 32 dims
(``UPSTREAM_SPIKING_SIZES`` turns the quirk off). The LMU keeps upstream's fixed seq_len = theta =
128, so sequences are 128 frames.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeseq
from edgeseq.bundle import BundleError
from edgeseq.families import lmu as L

from ..cli.test_cli import edgeseq as cli, error_line
from . import upstream_lmuformer as U

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "published" / "lmuformer"
SIZES = {False: dict(in_channels=16, embed_dims=32, depths=2, mlp_ratios=2, num_classes=35),
         True: dict(in_channels=16, embed_dims=32, depths=1, mlp_ratios=2, num_classes=35)}
FRAMES = U.SEQ_LEN


def _upstream(spiking: bool, seed: int = 0) -> U.ConvLMU:
    model = U.randomize(U.ConvLMU(spiking, **SIZES[spiking], quirk=False), seed, spiking)
    if spiking:
        with torch.no_grad():  # the LMU's single input neuron fires all along, as trained ones do
            for blk in model.block:
                blk.attn.lmu.bn_u.bias.fill_(1.3)
    return model


def _inputs(spiking: bool, n: int = 3, seed: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FRAMES, SIZES[spiking]["in_channels"], generator=g)


def _gsc_config(**over) -> dict:
    """The model arguments of upstream's src/gsc.yml (tests/fixtures/published/lmuformer), in
    its own names, for the sizes of this test."""
    import yaml

    gsc = yaml.safe_load((PUBLISHED / "gsc.yml").read_text())
    cfg = {k: gsc[k] for k in ("dim", "layer", "mlp_ratio", "in_channels", "n_class",
                               "audio_length", "num_heads", "patch_size")}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def upstream_bundles(tmp_path_factory):
    """Per variant: (upstream-equivalent model, best_model.pth, bundle). The non-spiking file
    converts with nothing beside it; the spiking one with a config.json in upstream's terms."""
    from edgeseq.convert.pipeline import convert

    out = {}
    for spiking in (False, True):
        root = tmp_path_factory.mktemp(f"up{int(spiking)}")
        model = _upstream(spiking)
        (root / "models").mkdir()
        pth = root / "models" / "best_model.pth"
        U.save_as_upstream(model, pth)
        if spiking:
            s = SIZES[True]
            cfg = _gsc_config(model="slmu_rnn_conv1d", dim=s["embed_dims"], layer=s["depths"],
                              mlp_ratio=s["mlp_ratios"], in_channels=s["in_channels"],
                              label_csv="speechcommands_class_labels_indices.csv")
            (root / "models" / "config.json").write_text(json.dumps(cfg))
            shutil.copy(PUBLISHED / "speechcommands_class_labels_indices.csv", root / "models")
        if spiking:
            bundle = convert(pth, root / "bundle", formats=("onnx", "pte"))
        else:  # as a user runs it: the file as saved, nothing beside it
            bundle = root / "bundle"
            cli("convert", pth, "-o", bundle, "--format", "onnx,pte", "-q")
        out[spiking] = (model, pth, bundle)
    return out


def test_saved_as_upstream_saves():
    import io

    model = _upstream(False)
    buf = io.BytesIO()
    U.save_as_upstream(model, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert all(k.startswith("module.") for k in sd)
    assert sd["module.block.0.attn.lmu.fft_H"].is_complex()
    assert "module.patch_embed.conv_layers.3.3.running_var" in sd


@pytest.mark.parametrize("spiking", [False, True])
def test_pth_converts_with_inferred_sizes(upstream_bundles, spiking):
    model, pth, bundle = upstream_bundles[spiking]
    man = json.loads((bundle / "manifest.json").read_text())
    c = man["config"]
    s = SIZES[spiking]
    assert man["source"]["files"] == ["best_model.pth"]
    assert c["spiking"] is spiking and c["embed_dims"] == s["embed_dims"]
    assert c["depths"] == s["depths"] and c["num_classes"] == s["num_classes"]
    assert c["memory_size"] == s["embed_dims"] * (2 if spiking else 1) and c["theta"] == 128
    assert c["input"]["features"] == s["in_channels"]
    if spiking:  # from config.json: audio_length and label_csv, in upstream's terms
        assert c["input"]["frames"] == 128 and c["labels"][:3] == ["backward", "follow", "five"]
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] and {ch["format"] for ch in parity["checks"]} == {"onnx", "pte"}
    for ch in parity["checks"]:
        assert ch["predictions_identical"] and ch["first_differing_frame"] is None
        if spiking:  # parity ran on inputs under which every layer fires in every quarter
            assert ch["spike_rate_min"] > 0, ch["spike_rates"]
            assert "block.0.attn.lmu.f_u" in ch["spike_rates"]


@pytest.mark.parametrize("backend", ["ort", "executorch"])
@pytest.mark.parametrize("spiking", [False, True])
def test_every_frame_matches_upstream(upstream_bundles, spiking, backend):
    model, _, bundle = upstream_bundles[spiking]
    x = _inputs(spiking)
    with torch.no_grad():
        want = model.running(x).numpy()
    if spiking:  # the reference really spikes, in every layer, to the end of the sequence
        rates = _upstream_rates(model, x)
        assert min(min(r) for r in rates.values()) > 0.01, rates
    sess = edgeseq.load(bundle, backend=backend)
    for row in range(x.shape[0]):
        got = sess.classify(x[row].numpy()).running
        np.testing.assert_array_equal(got.argmax(-1), want[row].argmax(-1))
        np.testing.assert_allclose(got, want[row], atol=1e-4, rtol=0)


def _upstream_rates(model: U.ConvLMU, x: torch.Tensor) -> dict[str, list[float]]:
    """Firing rate of each LIF of the reference per quarter of the sequence (time is dim 0)."""
    rates: dict[str, list[float]] = {}
    hooks = [m.register_forward_hook(
        lambda mod, i, o, name=name: rates.__setitem__(
            name, [float(c.mean()) for c in o.chunk(4, dim=0)]))
        for name, m in model.named_modules() if isinstance(m, U.MultiStepLIF)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rates


# -- what cannot be inferred, or is contradicted -----------------------------------------------------
@pytest.fixture(scope="module")
def small_pth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    U.save_as_upstream(_upstream(False), root / "best_model.pth")
    return root / "best_model.pth"


def _with_config(pth: Path, tmp_path: Path, cfg: dict) -> Path:
    shutil.copy(pth, tmp_path / pth.name)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path / pth.name


@pytest.mark.parametrize("cfg,msg", [
    ({"dim": 64}, r"config.json: dim = 64, but the weights in best_model.pth have embed_dims = 32"),
    ({"model": "slmu_rnn_conv1d"}, r"config.json: model = 'slmu_rnn_conv1d', but the weights .* "
                                   r"have spiking = False"),
    ({"model": "slmu_rnn_ms_conv1d"}, r"model 'slmu_rnn_ms_conv1d': edgeseq converts the "
                                      r"LMUFormer repository's lmu_rnn_conv1d and slmu_rnn_conv1d"),
    ({"mlp_ratios": 4}, r"mlp_ratios = 4, but the weights .* have mlp_ratio"),
    ({"theta": 64}, r"A is not the Legendre memory of order 32 for theta 64 .* give \"theta\""),
    ({"n_class": 35, "label_csv": "missing.csv"}, r"label_csv .*missing.csv' not found"),
    ({"frobnicate": 1}, r"config.json: unknown LMUFormerConfig key\(s\): frobnicate"),
])
def test_refusals_name_the_upstream_argument(small_pth, tmp_path, cfg, msg):
    with pytest.raises(BundleError, match=msg):
        L.LMUFormerFamily().load(_with_config(small_pth, tmp_path, cfg))


def test_upstream_names_and_ignored_arguments_load(small_pth, tmp_path):
    cfg = _gsc_config(model="lmu_rnn_conv1d", dim=32, layer=2, mlp_ratio=2, in_channels=16)
    model = L.LMUFormerFamily().load(_with_config(small_pth, tmp_path, cfg))
    c = model.config
    assert (c.embed_dims, c.depths, c.mlp_ratio, c.num_classes, c.input_frames) == (
        32, 2, 2.0, 35, 128)


def test_optimizer_file_and_other_variants_are_refused(tmp_path):
    model = _upstream(False)
    opt = torch.optim.Adam(model.parameters())
    torch.save(opt.state_dict(), tmp_path / "best_optim_state.pth")
    with pytest.raises(BundleError, match="an optimizer state"):
        L.LMUFormerFamily().load(tmp_path / "best_optim_state.pth")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.block.0.attn.prev_bn.weight"] = torch.ones(32)  # slmu_rnn_ms_conv1d's SLMUMs
    torch.save(sd, tmp_path / "ms.pth")
    with pytest.raises(BundleError, match="an LMUFormer slmu_rnn_ms_conv1d checkpoint"):
        L.LMUFormerFamily().load(tmp_path / "ms.pth")


def test_cli_missing_file(small_pth, tmp_path):
    p = cli("convert", small_pth.parent / "nope.pth", "-o", tmp_path / "o2", check=False)
    assert p.returncode == 2 and "nope.pth: no such file or folder" in error_line(p)
    assert not (tmp_path / "o2").exists()
