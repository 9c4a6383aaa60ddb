"""Recipe ``shrink``: the student starts as the teacher's first and last layers (Distil-
Whisper's initialisation), keeps the teacher's width, and the run reports its quality."""
from __future__ import annotations

import json

import torch

from edgeseq.convert.distill import REPORT_FILE, distill, get_recipe, load_teacher
from edgeseq.convert.distill.loop import Dist


def test_student_is_the_teachers_first_and_last_layers(checkpoints, tmp_path) -> None:
    t = load_teacher(checkpoints["mamba"])
    t.model = t.family.load(t.path)
    cls = get_recipe("shrink").for_teacher(t)
    r = cls(t, None, 0, Dist())
    # a 4-layer teacher keeps layers 0 and 3
    t.model.backbone.layers = torch.nn.ModuleList([t.model.backbone.layers[i] for i in
                                                   (0, 1, 0, 1)])
    t.model.config.num_hidden_layers = 4
    student = r.build_student()
    assert student.config.num_hidden_layers == 2 and r.options()["layers"] == [0, 3]
    for mine, theirs in zip(student.backbone.layers, (t.model.backbone.layers[0],
                                                      t.model.backbone.layers[3])):
        for (n, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), n
    assert student.backbone.layers[1].mixer.layer_idx == 1


def test_shrink_run_and_its_report(checkpoints, tmp_path) -> None:
    from edgeseq.families.s4d import S4DFamily

    out = distill(checkpoints["s4d"], tmp_path / "s", recipe="shrink", steps=2, bar=False)
    rep = json.loads((out / REPORT_FILE).read_text())
    assert rep["recipe"] == "shrink" and 0 <= rep["metrics"]["agreement"] <= 1
    student, teacher = S4DFamily().load(out), S4DFamily().load(checkpoints["s4d"])
    assert student.config.d_model == teacher.config.d_model
    assert student.config.n_layers == 1 < teacher.config.n_layers
