"""Streaming sequence classification (LMUFormer): frames in, a running prediction out."""
from __future__ import annotations

from edgeseq.registry import register_task
from edgeseq.tasks import Task


@register_task("classification")
class Classification(Task):
    generates = False
    graphs = (("step",), ("chunk", "step"))
    step_unit = "frame"
    max_drop = 0.02
    arena_advice = ("frame-by-frame steps instead of chunks (the chunk graph's activations are "
                    "larger)")
    cli_input = "frames"
    session = "edgeseq.runtime.classify:ClassifierSession"
    parity = "edgeseq.convert.parity:CLASSIFICATION"
    gate = "edgeseq.quant.gates:classifier_gate"
    calibration = "edgeseq.quant.static:calibrate_classifier"
    profile_driver = "edgeseq.runtime.profile.measure:drive_classification"
    cli_runner = "edgeseq.cli.runners:run_classify"
