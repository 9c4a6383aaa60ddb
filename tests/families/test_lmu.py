"""LMU and LMUFormer: the Legendre system, the cells, and streaming == parallel on every backend."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgeseq
from edgeseq.families import lmu as L
from edgeseq.families import lmu_model as M

from ..cli.test_cli import edgeseq as cli


@pytest.mark.parametrize("order,theta", [(1, 1.0), (4, 10.0), (12, 64.0), (64, 128.0)])
def test_zoh_matches_scipy(order, theta):
    from scipy.signal import cont2discrete

    a, b = M.legendre_continuous(order, theta)
    ad, bd, *_ = cont2discrete((a, b, np.ones((1, order)), np.zeros((1,))), dt=1.0, method="zoh")
    got_a, got_b = M.legendre_discrete(order, theta)
    np.testing.assert_allclose(got_a, ad, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_b, bd, atol=1e-6, rtol=0)


def test_lmu_memory_holds_a_delayed_window():
    """The point of the Legendre system: the memory reconstructs u(t - theta') for theta' <= theta."""
    from numpy.polynomial import legendre

    order, theta = 12, 50.0
    ad, bd = M.legendre_discrete(order, theta)
    t = np.arange(400)
    u = np.sin(2 * np.pi * t / 97.0)
    m = np.zeros(order)
    for x in u:
        m = ad @ m + bd[:, 0] * x
    # decode u(t - theta * r) with the shifted Legendre polynomials P_i(2r - 1)
    for r in (0.25, 0.5, 0.75):
        coef = np.array([legendre.legval(2 * r - 1, np.eye(order)[i]) for i in range(order)])
        assert abs(coef @ m - u[-1 - int(round(theta * r))]) < 0.05


def test_lmu_cell_parallel_equals_recurrent():
    torch.manual_seed(0)
    cell = M.LMUCell(3, 8, order=6, theta=20.0)
    x = torch.randn(2, 50, 3)
    with torch.no_grad():
        assert cell.parallel
        torch.testing.assert_close(cell(x), cell.forward_recurrent(x), atol=1e-5, rtol=0)
        fb = M.LMUCell(3, 8, order=6, theta=20.0, hidden_to_memory=True, memory_to_memory=True,
                       hidden_to_hidden=True)
        assert not fb.parallel
        torch.testing.assert_close(fb(x), fb.forward_recurrent(x))


def test_lif_dynamics_and_surrogate():
    lif = M.LIF(tau=2.0, v_threshold=1.0)
    x = torch.full((1, 4, 1), 1.5)
    # v: 0.75 -> 1.125 (spike, reset 0) -> 0.75 -> 1.125 (spike)
    assert lif(x)[0, :, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    x = torch.full((1, 6, 3), 1.2, requires_grad=True)
    lif(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("spiking", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_stream_module_equals_parallel(tmp_path, spiking, k):
    fam = L.LMUFormerFamily()
    model = fam.load(fam.make_test_checkpoint(tmp_path, spiking=spiking))
    c = model.config
    x = fam.parity_inputs(model, n=2)
    with torch.no_grad():
        want = model.running_logits(x)
        g = L.LMUFormerStream(model, k).eval()
        specs = L.state_specs(c)
        st = [torch.zeros(s.concrete_shape({"batch": 2})) for s in specs]
        look = L.lookahead(c)
        n = x.shape[1] + look
        n += (-n) % k
        frames = torch.zeros(2, n, c.in_channels)
        frames[:, :x.shape[1]] = x
        valid = torch.zeros(2, n)
        valid[:, :x.shape[1]] = 1
        outs, ready = [], []
        for i in range(0, n, k):
            o = g(frames[:, i:i + k], valid[:, i:i + k], *st)
            outs.append(o[0])
            ready.append(o[1])
            assert [t.shape for t in o[2:]] == [t.shape for t in st]  # constant state
            st = list(o[2:])
    got = torch.cat(outs, 1)[:, torch.cat(ready, 1)[0] > 0.5]
    assert got.shape == want.shape
    # spiking: the same spikes give exactly the same logits; a flipped spike would move them >1e-3
    tol = 1e-6 if spiking else 1e-4
    assert (got - want).abs().max() <= tol
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_spiking_test_model_really_spikes(tmp_path):
    fam = L.LMUFormerFamily()
    model = fam.load(fam.make_test_checkpoint(tmp_path, spiking=True))
    rates = []
    for mod in model.modules():
        if isinstance(mod, M.LIF):
            mod.register_forward_hook(lambda m, i, o: rates.append(float(o.mean())))
    model(fam.parity_inputs(model, 2))
    assert len(rates) >= 10 and all(0.02 < r < 0.98 for r in rates), rates


def test_official_state_dict_layout_loads(tmp_path):
    """An official LMUFormer checkpoint: torch.save(model.state_dict()) (weights only, wrapped by
    DataParallel, complex fft_H buffers) plus a config.json written by the user."""
    fam = L.LMUFormerFamily()
    src = fam.make_test_checkpoint(tmp_path / "ours", spiking=True)
    model = fam.load(src)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert any(k.endswith("attn.lmu.fft_H") for k in sd) and "module.block.0.attn.lmu.A" in sd
    assert "module.patch_embed.rpe_bn.running_var" in sd
    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text((src / "config.json").read_text())
    torch.save(sd, official / "pytorch_model.bin")
    again = fam.load(official)
    x = fam.parity_inputs(model, 2)
    assert torch.equal(again.running_logits(x), model.running_logits(x))


# -- bundles -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lmu_bundles(tmp_path_factory):
    from edgeseq.convert.pipeline import convert

    fam = L.LMUFormerFamily()
    out = {}
    for spiking in (False, True):
        root = tmp_path_factory.mktemp(f"lmu{int(spiking)}")
        ckpt = fam.make_test_checkpoint(root / "ckpt", spiking=spiking)
        out[spiking] = convert(ckpt, root / "bundle", formats=("onnx", "pte", "pt2"))
    return out


@pytest.mark.parametrize("spiking", [False, True])
def test_convert_parity_and_manifest(lmu_bundles, spiking):
    b = lmu_bundles[spiking]
    parity = json.loads((b / "parity.json").read_text())
    assert parity["passed"] and {c["format"] for c in parity["checks"]} == {"onnx", "pte", "pt2"}
    assert all(c["predictions_identical"] for c in parity["checks"])
    man = json.loads((b / "manifest.json").read_text())
    assert man["task"] == "classification" and set(man["graphs"]) == {"step", "chunk"}
    assert man["config"]["lookahead"] == 5 and man["config"]["input"]["features"] == 3
    kinds = {s["name"]: s["kind"] for s in man["graphs"]["step"]["state"]}
    assert kinds["block.0.memory"] == "recurrent" and kinds["embed.0.window"] == "window"
    if spiking:
        assert "block.1.lif_m" in kinds and "embed.4.lif" in kinds


@pytest.mark.parametrize("backend", ["ort", "executorch", "torch"])
@pytest.mark.parametrize("spiking", [False, True])
def test_any_split_streams_the_same(lmu_bundles, backend, spiking):
    """Pieces of any size (chunks, single frames, mixes) give the whole sequence's predictions."""
    fam = L.LMUFormerFamily()
    model = fam.load(lmu_bundles[spiking] / ".." / "ckpt")
    x = fam.parity_inputs(model, n=1, seed=3)[0]
    want = model.running_logits(x[None])[0].detach().numpy()
    sess = edgeseq.load(lmu_bundles[spiking], backend=backend)
    whole = sess.classify(x.numpy())
    assert whole.label == int(want[-1].argmax()) and whole.frames == x.shape[0]
    sess.reset()
    got, i = [], 0
    for n in (3, 7, 1, 1, 9, 2, 100):
        got.append(sess.push(x[i:i + n].numpy()))
        i += n
        if i >= x.shape[0]:
            break
    got.append(sess.finish())
    got = np.concatenate(got, 1)[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= (1e-6 if spiking else 1e-4)
    with pytest.raises(ValueError, match="finished"):
        sess.push(x[:1].numpy())


def test_batch_rows_on_ort(lmu_bundles):
    fam = L.LMUFormerFamily()
    model = fam.load(lmu_bundles[True] / ".." / "ckpt")
    x = fam.parity_inputs(model, n=3, seed=5)
    sess = edgeseq.load(lmu_bundles[True], backend="ort")
    sess.push(x.numpy())
    sess.finish()
    np.testing.assert_allclose(sess.running(), model.running_logits(x).detach().numpy(), atol=1e-6)


def test_cli_classify_json_and_early_exit(lmu_bundles, tmp_path):
    fam = L.LMUFormerFamily()
    model = fam.load(lmu_bundles[False] / ".." / "ckpt")
    x = fam.parity_inputs(model, n=1, seed=7)[0]
    want = model.running_logits(x[None])[0].detach()
    np.save(tmp_path / "seq.npy", x.numpy())
    out = json.loads(cli("run", lmu_bundles[False], "--input", tmp_path / "seq.npy",
                         "--early-exit", "0.3", "--json").stdout)
    assert out["class"] == int(want[-1].argmax()) and len(out["probs"]) == 5
    assert abs(sum(out["probs"]) - 1) < 1e-4 and out["frames"] == x.shape[0]
    probs = torch.softmax(want, -1)
    pred = probs.argmax(-1)
    ok = [t for t in range(len(pred)) if probs[t].max() >= 0.3 and bool((pred[t:] == pred[-1]).all())]
    assert out["exit_frame"] == (ok[0] if ok else None)


@pytest.mark.parametrize("content,msg", [
    ("wrong_features", "frames must be (frames, 3)"),
    ("nan", "NaN"),
    ("object", "holds Python objects (a pickle); refused"),
    ("text", "not a valid .npy file"),
])
def test_cli_bad_input(lmu_bundles, tmp_path, content, msg):
    path = tmp_path / "bad.npy"
    if content == "wrong_features":
        np.save(path, np.zeros((10, 4), np.float32))
    elif content == "nan":
        a = np.zeros((10, 3), np.float32)
        a[2, 1] = np.nan
        np.save(path, a)
    elif content == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_text("1,2,3\n")
    p = cli("run", lmu_bundles[False], "--input", path, check=False)
    assert p.returncode == 2 and msg in p.stderr and str(path) in p.stderr
