"""Recipe ``shrink``: a student of the teacher's family and width with fewer layers, initialised
from the teacher's own layers (Distil-Whisper, Gandhi et al. 2023: the encoder kept, the first
and last decoder layers), trained by KD; it replaces the teacher on a weaker device.

- Causal LMs (Mamba, Mamba-2, S4D): the first and last layers (one layer of a two-layer
  teacher), trained whole on the ``draft`` recipe's data and loss.
- Encoder-decoders (T5, BART, Marian, Whisper): as ``draft``'s student (encoder frozen, first
  and last decoder layers), and ``evaluate`` reports its quality against the teacher: exact
  match and token error rate of its greedy outputs against the teacher's on held-out sources.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from edgeseq.convert.distill import Recipe, Teacher
from edgeseq.convert.distill.draft import _DECODERS, CausalDraft, Seq2SeqDraft, _get

#: causal families: where the layers are and the config field counting them
_LAYERS = {"mamba": ("backbone.layers", "num_hidden_layers"),
           "mamba2": ("backbone.layers", "num_hidden_layers"),
           "s4d": ("layers", "n_layers")}


def _first_last(n: int) -> list[int]:
    return [0] if n <= 2 else [0, n - 1]


class Shrink(Recipe):
    name = "shrink"

    @classmethod
    def refuses(cls, teacher: Teacher) -> str | None:
        fam = teacher.family.name
        if not teacher.task.generates or (fam not in _LAYERS and fam not in _DECODERS):
            return (f"no shrink recipe for the {fam} family ({teacher.family.task}); it applies "
                    f"to {', '.join((*_LAYERS, *_DECODERS))}")
        return None

    @classmethod
    def for_teacher(cls, teacher: Teacher) -> type[Recipe]:
        return ShrinkSeq2Seq if teacher.task.encoder else ShrinkCausal


class ShrinkCausal(CausalDraft):
    name = "shrink"
    default_steps = 600
    lr = 1e-3

    def _keep(self) -> list[int]:
        path, _ = _LAYERS[self.teacher.family.name]
        return _first_last(len(_get(self.teacher.model, path)))

    def options(self) -> dict[str, Any]:
        return {"layers": self._keep(), "batch": self.batch, "seq": self.seq,
                "prompt_len": self.prompt_len, "on_policy": self.on_policy,
                "temperature": self.temperature, "lr": self.lr}

    def build_student(self) -> Any:
        path, key = _LAYERS[self.teacher.family.name]
        student = copy.deepcopy(self.teacher.model)
        kept = torch.nn.ModuleList([_get(student, path)[i] for i in self._keep()])
        for i, layer in enumerate(kept):
            layer_idx_renumber(layer, i)
        parent, _, name = path.rpartition(".")
        setattr(_get(student, parent) if parent else student, name, kept)
        if dataclasses.is_dataclass(student.config):
            student.config = dataclasses.replace(student.config, **{key: len(kept)})
        else:
            setattr(student.config, key, len(kept))
        student.requires_grad_(True)
        student.train()
        self._fast(student)
        self._fast(self.teacher.model)
        return student


class ShrinkSeq2Seq(Seq2SeqDraft):
    name = "shrink"

    def _keep(self) -> list[int]:
        path, _ = _DECODERS[self.teacher.family.name]
        return _first_last(len(_get(self.teacher.model, path)))

    @torch.no_grad()
    def evaluate(self, student: Any) -> dict[str, float]:
        """Agreement (teacher-forced), and the student's greedy outputs against the
        teacher's on the held-out sources: exact match and token error rate."""
        from edgeseq.quant.gates import edit_distance

        out = super().evaluate(student)
        fam = self.teacher.family
        was = student.training
        student.eval()
        exact, errors, total = 0, 0, 0
        for src, dec in self._held_out:
            want = dec[len(fam.reference_prompt(self.teacher.model, src)):]
            got = fam.reference_generate(student, src, self.max_new_tokens)
            exact += got == want
            errors += edit_distance(got, want)
            total += max(1, len(want))
        student.train(was)
        n = len(self._held_out)
        return {**out, "exact_match": exact / n, "token_error_rate": errors / total}


def layer_idx_renumber(layer: Any, i: int) -> None:
    """Attention and mixer modules index the decoding cache by their layer: renumbered."""
    for mod in layer.modules():
        if isinstance(getattr(mod, "layer_idx", None), int):
            mod.layer_idx = i


RECIPE = Shrink
