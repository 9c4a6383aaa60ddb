"""`edgeseq run --speculate`, as a user runs it: same text as plain decoding, the --json fields,
and one-line errors for a bad source, a missing graph, a wrong draft and a budget too small."""
from __future__ import annotations

import json

from tests.cli.test_cli import edgeseq


def test_run_speculate_json_and_errors(bundle_of) -> None:
    t5, mamba = bundle_of("t5"), bundle_of("mamba")
    ids = "10,11,12,13,10,11,12,1"
    plain = json.loads(edgeseq("run", t5, "--prompt-ids", ids, "--num-beams", "1", "--json",
                               "-n", "12").stdout)
    spec = json.loads(edgeseq("run", t5, "--prompt-ids", ids, "--speculate", "input", "--json",
                              "-n", "12").stdout)
    assert spec["tokens"] == plain["tokens"]
    plan = spec["memory_plan"]
    assert spec["speculate"] == plan["mode"] == "input" and plan["total_bytes"] > 0
    assert {"acceptance_rate", "tokens_per_verify"} <= set(spec)
    assert spec["speculation"]["emitted"] == len(spec["tokens"])
    # a budget that holds plain decoding only: same tokens, plan says why
    tight = json.loads(edgeseq("run", mamba, "--prompt-ids", "3,4,5,3,4", "--speculate", "ngram",
                               "--memory-budget", str(plan_floor(mamba) + 1), "--json").stdout)
    assert tight["memory_plan"]["mode"] == "off" and "not ngram" in tight["memory_plan"]["reason"]
    for args, msg in [
            (("--speculate", "bogus"), "unknown; give one of auto"),
            (("--speculate", "early-exit:5"), "convert with --early-exit 5"),
            (("--speculate", f"draft:{t5}"), "cannot serve a causal_lm target"),
            (("--speculate", "ngram", "--memory-budget", "1M"), "cannot hold this model"),
            (("--speculate", "ngram", "--memory-budget", "lots"), "not a size")]:
        p = edgeseq("run", mamba, "--prompt-ids", "3,4", *args, check=False)
        assert p.returncode != 0 and msg in p.stderr, (args, p.stderr[-500:])


def plan_floor(bundle) -> int:
    from edgeseq.bundle import read_manifest
    from edgeseq.runtime.speculative.plan import plain_minimum

    return plain_minimum(bundle, read_manifest(bundle), "ort")


def test_convert_early_exit_and_run_device(bundle_of, checkpoints, tmp_path) -> None:
    from edgeseq.devices import get_profile

    # --early-exit must leave at least one layer out: refused before anything is written
    out = tmp_path / "b"
    p = edgeseq("convert", checkpoints["mamba"], "-o", out, "--early-exit", "2", "--format",
                "onnx", check=False)
    assert p.returncode != 0 and "the model has 2 layers; give 1 to 1" in p.stderr
    assert not out.exists()
    # --device takes the budget from the profile's app memory
    mamba = bundle_of("mamba")
    rep = json.loads(edgeseq("run", mamba, "--prompt-ids", "3,4,5", "--speculate",
                             "early-exit:1", "--device", "rpi5-8gb", "--json").stdout)
    assert rep["memory_plan"]["budget"] == get_profile("rpi5-8gb").app_memory
    assert rep["memory_plan"]["mode"] == "early-exit"
    p = edgeseq("run", mamba, "--prompt-ids", "3", "--speculate", "ngram", "--device",
                "no-such-device", check=False)
    assert p.returncode != 0 and "no-such-device" in p.stderr


def test_convert_draft_loop_and_run_with_it(bundle_of, checkpoints, tmp_path) -> None:
    """`edgeseq convert --draft-loop K` as a user runs it: the bundle drafts for `run
    --speculate draft:PATH` with the same tokens as plain decoding; bad K and an encoder-decoder
    are refused with one line, nothing written."""
    draft = tmp_path / "draft"
    edgeseq("convert", checkpoints["mamba"], "-o", draft, "--draft-loop", "3", "--format", "onnx",
            "--parity-tokens", "8")
    assert "draft_loop ok" in edgeseq("inspect", draft).stdout
    mamba = bundle_of("mamba")
    ids = "3,4,5,3,4,5,3"
    plain = json.loads(edgeseq("run", mamba, "--prompt-ids", ids, "--json", "-n", "10").stdout)
    spec = json.loads(edgeseq("run", mamba, "--prompt-ids", ids, "--speculate", f"draft:{draft}",
                              "--json", "-n", "10").stdout)
    assert spec["tokens"] == plain["tokens"]
    assert "draft_loop" in spec["memory_plan"]["draft_graphs"]
    for args, src, msg in [(("--draft-loop", "0"), checkpoints["mamba"], "'--draft-loop'"),
                           (("--draft-loop", "4"), checkpoints["t5"],
                            "--draft-loop applies to causal language models")]:
        out = tmp_path / "bad"
        p = edgeseq("convert", src, "-o", out, *args, "--format", "onnx", check=False)
        assert p.returncode != 0 and msg in p.stderr, p.stderr[-500:]
        assert not out.exists()
