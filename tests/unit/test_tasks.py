"""A task is one registered plug-in (issue #24): its facts and parts live in
``edgeseq/tasks/<task>.py``, nowhere else compares its name, and the layers import downward only."""
import ast
from pathlib import Path

import pytest

from edgeseq.registry import UnknownNameError, families, get_task, tasks
from edgeseq.tasks import PARTS, Task

ROOT = Path(__file__).resolve().parents[2]
#: the source folders and the package each is installed as
PACKAGES = {"edgeseq": "edgeseq", "runtime": "edgeseq.runtime", "quant": "edgeseq.quant",
            "convert": "edgeseq.convert", "kernels": "edgeseq.kernels",
            "devices": "edgeseq.devices"}


def _sources():
    for folder, pkg in PACKAGES.items():
        for p in sorted((ROOT / folder).rglob("*.py")):
            rel = p.relative_to(ROOT / folder).with_suffix("")
            yield p, ".".join((pkg, *rel.parts)).removesuffix(".__init__")


def test_the_registered_tasks_and_their_parts():
    assert list(tasks()) == ["causal_lm", "seq2seq", "speech_seq2seq", "classification"]
    for name, task in tasks().items():
        assert isinstance(task, Task) and task.name == name and get_task(name).name == name
        assert task.graphs, name
        for part in PARTS:
            assert callable(task.part(part)) or hasattr(task.part(part), "check"), (name, part)
    # every family's task is registered
    assert {c.task for c in families().values()} <= set(tasks())
    with pytest.raises(UnknownNameError, match="unknown task 'tts'; known: causal_lm, seq2seq, "
                                               "speech_seq2seq, classification"):
        get_task("tts")
    with pytest.raises(KeyError, match="unknown task part"):
        get_task("seq2seq").part("decoder")


def test_task_facts():
    lm, s2s, asr, cls = (get_task(n) for n in tasks())
    assert [t.generates for t in (lm, s2s, asr, cls)] == [True, True, True, False]
    assert [t.encoder for t in (lm, s2s, asr, cls)] == [False, True, True, False]
    assert [t.audio for t in (lm, s2s, asr, cls)] == [False, False, True, False]
    assert [t.decoder_only for t in (lm, s2s, asr, cls)] == [True, False, False, False]
    assert [t.speculate_auto for t in (lm, s2s, asr, cls)] == ["ngram", "input", "ngram", None]
    assert [t.max_drop for t in (lm, s2s, asr, cls)] == [0.10, 0.10, 0.10, 0.02]
    assert cls.step_unit == "frame" and asr.latency_unit == "window"


def test_no_module_outside_the_task_plugins_compares_a_task_name():
    """A task name string in a comparison (``task == "seq2seq"``, ``task in ("seq2seq", ...)``)
    or as a dict key (a per-task table) outside ``edgeseq/tasks/`` is a fact that belongs to the
    task plug-in."""
    names = set(tasks())

    def named(node):
        if isinstance(node, ast.Constant) and node.value in names:
            return True
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts)

    found = []
    for p, mod in _sources():
        if mod.startswith("edgeseq.tasks"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            hit = (isinstance(node, ast.Compare) and any(named(x) for x in
                                                         [node.left, *node.comparators])) \
                or (isinstance(node, ast.Dict) and any(k is not None and named(k)
                                                       for k in node.keys)) \
                or (isinstance(node, ast.match_case) and named(getattr(node.pattern, "value",
                                                                       None)))
            if hit:
                found.append(f"{p.relative_to(ROOT)}:{node.lineno if hasattr(node, 'lineno') else ''}")
    assert found == [], found
