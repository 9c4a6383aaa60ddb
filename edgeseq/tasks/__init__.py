"""Tasks as plug-ins: one file per task (``causal_lm.py``, ``seq2seq.py``, ``speech_seq2seq.py``,
``classification.py``) holds every fact the rest of edgeseq branches on, and names the parts that
run the task in the higher layers.

A task's parts live in the layer that owns their kind of work: the session in ``runtime/``, the
profile driver in ``runtime/profile/``, the calibration reader and the accuracy gate in
``quant/``, the parity check in ``convert/``, the command-line runner in ``edgeseq/cli/runners.py``. The
task records name them by import path (``"module:attribute"``) and :meth:`Task.part` imports
one on first use, as transformers' lazy auto mappings do: this core package imports no higher
layer, so the layers stay acyclic (core -> runtime -> build -> cli: tests/unit/test_imports.py) however the parts
call each other, and adding a task stays one file here plus its parts. (The alternative, each
layer registering its part against the task name at import, would leave a task half-registered
until every layer happened to be imported, and spread one task over as many registries.)

Code outside the task files asks ``edgeseq.registry.get_task(manifest.task)`` for an attribute
(``generates``, ``encoder``, ``audio``, ...) or a part; it never compares a task's name
(``tests/unit/test_tasks.py`` scans the sources for such a comparison).
"""
from __future__ import annotations

import importlib
from typing import Any, ClassVar

#: the parts a task names, and where each is called from
PARTS = {
    "session": "edgeseq.runtime.session.load: the stream type a loaded bundle opens as",
    "parity": "edgeseq.convert.pipeline: the reference outputs and the bundle's check against "
              "them",
    "gate": "edgeseq.convert.pipeline: the accuracy gate of a quantized bundle",
    "calibration": "edgeseq.quant.static.calibration_feeds: streams calibration data through "
                   "the fp32 bundle",
    "profile_driver": "edgeseq.runtime.profile: the workload measured on the host",
    "cli_runner": "edgeseq.cli run: reads the task's input, prints its output",
}


class Task:
    """One task's facts and parts. A plug-in subclasses it with class attributes and registers
    it with ``@register_task(name)`` (``edgeseq.registry``)."""

    name: ClassVar[str]
    #: produces tokens (a generation config applies; speculation, tokens/s)
    generates: ClassVar[bool] = True
    #: encodes a source once and decodes against its cross-attention (an attention cache whose
    #: capacity ``--max-target-len`` fixes; a source length to plan memory for)
    encoder: ClassVar[bool] = False
    #: the source is audio (log-mel features), not token ids
    audio: ClassVar[bool] = False
    #: the graphs the session runs: the bundle needs one graph of each group
    graphs: ClassVar[tuple[tuple[str, ...], ...]] = ()
    #: what one step of the stream is (profile tables and rates: tokens/s or frames/s)
    step_unit: ClassVar[str] = "token"
    #: what a latency target is checked against: one step, or (speech) one encoder window
    #: with the decoder steps that follow it
    latency_unit: ClassVar[str] = "step"
    #: the generation-config fields the runtime applies as transformers does
    #: (``edgeseq.generation.check`` refuses any other that a checkpoint sets)
    honoured_generation: ClassVar[frozenset[str]] = frozenset()
    #: the accuracy gate's default largest drop in agreement (``--max-drop``)
    max_drop: ClassVar[float] = 0.10
    #: the draft source ``--speculate auto`` picks (None: the task does not speculate)
    speculate_auto: ClassVar[str | None] = None
    #: the profile's advice when the runtime arena dominates peak memory
    arena_advice: ClassVar[str] = "smaller inputs"
    #: the ``edgeseq run`` input option the task reads: ``text`` (--prompt/--text/--prompt-ids),
    #: ``audio`` (--audio) or ``frames`` (--input)
    cli_input: ClassVar[str] = "text"
    # -- parts, by import path ("module:attribute"; see PARTS) -----------------------------------
    session: ClassVar[str]
    parity: ClassVar[str]
    gate: ClassVar[str]
    calibration: ClassVar[str]
    profile_driver: ClassVar[str]
    cli_runner: ClassVar[str]

    @property
    def decoder_only(self) -> bool:
        """Generates from a prompt fed through its own state (a causal LM): prefill chunks,
        ``draft_loop`` and rollback of the recurrent state apply."""
        return self.generates and not self.encoder

    def part(self, what: str) -> Any:
        """The part ``what`` (a key of ``PARTS``), imported on first use."""
        if what not in PARTS:
            raise KeyError(f"unknown task part {what!r}; known: {', '.join(PARTS)}")
        path = getattr(self, what)
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __repr__(self) -> str:
        return f"<task {self.name}>"
