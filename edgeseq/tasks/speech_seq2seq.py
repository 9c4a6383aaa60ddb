"""Speech encoder-decoders (Whisper): a window of log-mel features encoded, then decoded."""
from __future__ import annotations

from edgeseq.generation import GENERATION_FIELDS
from edgeseq.registry import register_task
from edgeseq.tasks import Task


@register_task("speech_seq2seq")
class SpeechSeq2Seq(Task):
    encoder = True
    audio = True
    graphs = (("encoder",), ("decoder_step", "decoder_chunk"))
    latency_unit = "window"
    # transformers ignores encoder n-grams when the encoder input is not token ids
    # (``edgeseq.generation.NO_EFFECT_SPEECH``)
    honoured_generation = frozenset(GENERATION_FIELDS) - {"encoder_no_repeat_ngram_size"}
    max_drop = 0.10
    # a transcript does not copy its (audio) source: prompt lookup instead
    speculate_auto = "ngram"
    arena_advice = "a shorter encoder window (`--window`, activations grow with it)"
    cli_input = "audio"
    session = "edgeseq.runtime.seq2seq:Seq2SeqSession"
    parity = "edgeseq.convert.parity:SEQ2SEQ"
    gate = "edgeseq.quant.gates:seq2seq_gate"
    calibration = "edgeseq.quant.static:calibrate_seq2seq"
    profile_driver = "edgeseq.runtime.profile.measure:drive_seq2seq"
    cli_runner = "edgeseq.cli.runners:run_speech"
