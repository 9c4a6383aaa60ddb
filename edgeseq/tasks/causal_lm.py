"""Causal language models: a prompt prefilled into a recurrent state, then one token per step."""
from __future__ import annotations

from edgeseq.registry import register_task
from edgeseq.tasks import Task


@register_task("causal_lm")
class CausalLM(Task):
    graphs = (("step",), ("prefill", "verify"))
    # EOS and nothing more: a causal checkpoint that asks for more is refused at convert time
    honoured_generation = frozenset({"eos_token_id", "bos_token_id", "pad_token_id"})
    max_drop = 0.10
    speculate_auto = "ngram"
    arena_advice = ("prefill in smaller chunks (Session.max_chunk, the manifest's max_chunk by "
                    "default: prefill activations grow with it)")
    session = "edgeseq.runtime.session:Session"
    parity = "edgeseq.convert.parity:CAUSAL"
    gate = "edgeseq.quant.gates:lm_gate"
    calibration = "edgeseq.quant.static:calibrate_causal"
    profile_driver = "edgeseq.runtime.profile.measure:drive_causal_lm"
    cli_runner = "edgeseq.cli.runners:run_causal"
