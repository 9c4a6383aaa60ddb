"""``edgeseq convert TEACHER --distill RECIPE``: distillation and conversion in one command.

The student checkpoint and, for ``draft``, the draft's bundle are made in a temporary folder
beside the output; only the final bundle is written at the output (``atomic_folder``), so an
interrupted or failed run leaves nothing there. For a resumable run, use ``edgeseq distill``
(its checkpoint survives an interruption) and convert the student after.

- ``draft``: the teacher's bundle with the draft's bundle inside (``draft/``), recorded in the
  teacher's manifest, so ``edgeseq run OUT --speculate draft`` finds it.
- any other recipe (``shrink``): the student's bundle.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgeseq.errors import BundleError

#: tokens a causal draft proposes in one call (its ``draft_loop`` graph): the zoo drafter's
#: setting in the speculative benchmark, where it measured the best speedup
DRAFT_LOOP = 16


def convert_distilled(teacher: str, out: str | Path, recipe: str, data: str | None = None,
                      steps: int | None = None, seconds: float | None = None, seed: int = 0,
                      bar: bool = True, **convert_kw: Any) -> Path:
    """Distill ``teacher`` by ``recipe``, then convert as the recipe says (see the module)."""
    from edgeseq.convert.distill import distill, get_recipe
    from edgeseq.convert.pipeline import convert

    get_recipe(recipe)
    out = Path(out)
    if out.exists() and not convert_kw.get("overwrite"):
        raise BundleError(f"{out}: already exists (use --overwrite to replace it)")
    say = convert_kw.get("progress") or (lambda m: None)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.distill.",
                                     dir=out.absolute().parent) as work:
        student = distill(teacher, Path(work) / "student", recipe, data=data, steps=steps,
                          seconds=seconds, seed=seed, progress=convert_kw.get("progress"),
                          bar=bar)
        if recipe != "draft":
            # the student replaces the teacher: it is the bundle
            say(f"[distill] converting the student ({student})")
            return convert(student, out, **convert_kw)
        draft_kw = {k: v for k, v in convert_kw.items()
                    if k not in ("overwrite", "early_exit", "draft_loop", "eval_file",
                                 "calibration", "max_target_len")}
        from edgeseq.checkpoint import read_config
        from edgeseq.families.base import detect_family
        from edgeseq.registry import get_task

        if get_task(detect_family(read_config(student), student).task).decoder_only:
            # a causal draft proposes DRAFT_LOOP tokens in one call (as the zoo's drafter is
            # converted for the speculative benchmark): one call instead of a call per token
            draft_kw["draft_loop"] = DRAFT_LOOP
        say(f"[distill] converting the draft ({student})")
        draft = convert(student, Path(work) / "draft", **draft_kw)
        say(f"[distill] converting {teacher} with its draft")
        return convert(teacher, out, draft=draft, **convert_kw)
