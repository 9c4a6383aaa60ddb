"""Text encoder-decoders (T5, BART, Marian): a token source encoded once, then decoded."""
from __future__ import annotations

from edgeseq.generation import GENERATION_FIELDS
from edgeseq.registry import register_task
from edgeseq.tasks import Task


@register_task("seq2seq")
class Seq2Seq(Task):
    encoder = True
    graphs = (("encoder",), ("decoder_step", "decoder_chunk"))
    honoured_generation = frozenset(GENERATION_FIELDS)
    max_drop = 0.10
    # the output mostly copies the source (Aggressive Decoding)
    speculate_auto = "input"
    arena_advice = "shorter sources (encoder activations grow with the source)"
    session = "edgeseq.runtime.seq2seq:Seq2SeqSession"
    parity = "edgeseq.convert.parity:SEQ2SEQ"
    gate = "edgeseq.quant.gates:seq2seq_gate"
    calibration = "edgeseq.quant.static:calibrate_seq2seq"
    profile_driver = "edgeseq.runtime.profile.measure:drive_seq2seq"
    cli_runner = "edgeseq.cli.runners:run_seq2seq"
