"""Distillation: a teacher checkpoint -> a student checkpoint folder that ``convert`` takes.

``distill`` (``edgeseq distill``) loads the teacher through its family (``edgeseq/checkpoint.py``
+ ``edgeseq/families/<name>.py``), lets the recipe build a student and its training data
(``data.py``: ``--data`` or the teacher's own generations), trains it with the shared loop
(``loop.py``: seeded, resumable, ``torchrun``-able) and writes the student as a checkpoint
folder (``config.json`` + ``model.safetensors`` + the teacher's tokenizer and generation files
+ ``distill.json``, the run's record) through ``atomic_folder``: an interrupted run leaves no
half-written student, only its resumable checkpoint beside it (``<student>.resume/``).

A recipe is one module here, named in ``RECIPES`` (imported when used), holding a ``Recipe``
subclass (see ``docs/distill.md``: "How to add a recipe").
"""
from __future__ import annotations

import importlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from edgeseq.errors import BundleError

#: recipe name -> the module holding its ``RECIPE`` class
RECIPES = {"draft": "edgeseq.convert.distill.draft",
           "shrink": "edgeseq.convert.distill.shrink"}
#: the teacher's files a student carries unchanged (tokenizer, generation settings)
SIDE_FILES = ("generation_config.json",)
REPORT_FILE = "distill.json"

Progress = Callable[[str], None]


@dataclass
class Teacher:
    """The loaded teacher: what every recipe reads."""

    label: str                 # as the user gave it (zoo:NAME or a path)
    path: Path                 # the checkpoint (resolved)
    folder: Path               # its side files' folder
    config: dict[str, Any]     # config.json
    family: Any                # edgeseq.families.base.Family
    task: Any                  # edgeseq.tasks.Task
    model: Any                 # the reference module (fp32, eval)
    tokenizer: Any             # edgeseq.tokenize.Tokenizer or None


class Recipe:
    """One way of making a student. Subclasses set ``name`` and the defaults, and implement the
    hooks the run calls in order: ``build_student``, ``prepare``, then ``loss`` every step,
    ``evaluate`` and ``save``."""

    name: ClassVar[str] = "?"
    #: the default budget: within 15 minutes on 2 cores for the zoo's teachers
    default_steps: ClassVar[int] = 600
    default_seconds: ClassVar[float] = 600.0
    lr: ClassVar[float] = 3e-3

    def __init__(self, teacher: Teacher, data: list[Any] | None, seed: int, dist: Any):
        self.teacher = teacher
        self.data = data
        self.seed = seed
        self.dist = dist

    @classmethod
    def refuses(cls, teacher: Teacher) -> str | None:
        """Why this recipe cannot distill ``teacher`` (None: it can)."""
        return None

    @classmethod
    def for_teacher(cls, teacher: Teacher) -> type["Recipe"]:
        """The class that runs this recipe for ``teacher`` (a recipe may have one per task)."""
        return cls

    def options(self) -> dict[str, Any]:
        """Everything that shapes the run besides the teacher, data, steps and seed (the
        student's config, batch, lengths): part of a checkpoint's fingerprint."""
        return {}

    def build_student(self) -> Any:
        raise NotImplementedError

    def trainable(self, student: Any) -> list[Any]:
        return [p for p in student.parameters() if p.requires_grad]

    def prepare(self, steps: int, say: Progress) -> None:
        """Build the training data (the teacher's generations) for a run of ``steps``."""

    def loss(self, model: Any, step: int, gen: Any) -> Any:
        """The mean loss over this rank's share of step ``step``'s global batch."""
        raise NotImplementedError

    def evaluate(self, student: Any) -> dict[str, float]:
        return {}

    def save(self, student: Any, folder: Path) -> None:
        student.save_pretrained(folder, safe_serialization=True)


def get_recipe(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise BundleError(f"--recipe {name!r}: unknown; known: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name]).RECIPE


def resume_folder(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its resumable checkpoint."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".resume")


def load_teacher(src: str | Path) -> Teacher:
    from edgeseq import tokenize, zoo
    from edgeseq.checkpoint import checkpoint_folder, read_config
    from edgeseq.families.base import detect_family
    from edgeseq.registry import get_task

    path = zoo.resolve(src)
    config = read_config(path)
    family = detect_family(config, path)
    folder = checkpoint_folder(path)
    spec = tokenize.detect(folder, config)
    return Teacher(str(src), Path(path), folder, config, family, get_task(family.task),
                   None, tokenize.load(folder, spec))


def distill(teacher: str | Path, out: str | Path, recipe: str = "draft",
            data: str | Path | None = None, steps: int | None = None,
            seconds: float | None = None, seed: int = 0, resume: bool = False,
            overwrite: bool = False, progress: Progress | None = None, bar: bool = True,
            save_every: float = 60.0, stop_after: int | None = None, threads: int = 1) -> Path:
    """Distill ``teacher`` (a checkpoint folder or ``zoo:NAME``) into a student checkpoint
    folder at ``out`` by ``recipe``.

    Args:
        data: ``--data`` (see ``data.py``); None: built-in prompts continued by the teacher.
        steps, seconds: the budget (whichever ends first; defaults: the recipe's).
        seed: seeds the student's initialisation, the data and its order.
        resume: continue the checkpoint of an interrupted run of the same configuration.
        stop_after: stop as if interrupted after that many steps (tests of ``resume``).
        threads: intra-op threads per process. One by default: these small models gain little
            from a second thread, and on a loaded host two threads per process ran 5-10x
            slower than one (measured on the zoo's Mamba: 0.45 s a step against 2-8 s);
            use more processes (torchrun) for more cores.
    Returns:
        The student folder.
    Raises:
        BundleError: an unknown recipe, a teacher it does not apply to, data that does not
            match the teacher's task, a checkpoint of another run given to ``resume``.
        loop.Interrupted: the run was stopped (SIGINT/SIGTERM); its checkpoint is saved.
    """
    import torch

    from edgeseq.convert.distill.data import read_data
    from edgeseq.convert.distill.loop import init_distributed

    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    out = Path(out)
    rec_cls = get_recipe(recipe)
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: already exists (use --overwrite to replace it)")
    if steps is not None and steps < 1:
        raise BundleError(f"--steps {steps}: give at least 1")
    t = load_teacher(teacher)
    why = rec_cls.refuses(t)
    rec_cls = rec_cls.for_teacher(t) if why is None else rec_cls
    if why:
        raise BundleError(f"{teacher}: recipe {recipe!r} does not apply: {why}")
    examples = read_data(data, t.task.cli_input, f"{teacher} ({t.family.name})") \
        if data is not None else None
    dist = init_distributed()
    was_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return _run(t, out, recipe, rec_cls, data, examples, steps, seconds, seed, resume,
                    overwrite, say, bar, save_every, stop_after, dist, t0)
    finally:
        torch.set_num_threads(was_threads)


def _run(t: Teacher, out: Path, recipe: str, rec_cls: type[Recipe], data: str | Path | None,
         examples: list[Any] | None, steps: int | None, seconds: float | None, seed: int,
         resume: bool, overwrite: bool, say: Progress, bar: bool, save_every: float,
         stop_after: int | None, dist: Any, t0: float) -> Path:
    import torch

    from edgeseq.checkpoint import source_files
    from edgeseq.convert.distill.loop import Budget, train
    from edgeseq.output import atomic_folder, write_json
    from edgeseq.trust import sha256_of

    teacher = t.label
    t.model = t.family.load(t.path)
    t.model.requires_grad_(False)
    torch.manual_seed(seed)
    r = rec_cls(t, examples, seed, dist)
    steps = steps or rec_cls.default_steps
    seconds = rec_cls.default_seconds if seconds is None else seconds
    say(f"[distill] {recipe}: {teacher} ({t.family.name}), {steps} steps at most, "
        f"{seconds:.0f} s at most" + (f", {dist.world} processes" if dist.world > 1 else ""))
    student = r.build_student()
    r.prepare(steps, say)
    gen = torch.Generator().manual_seed(10_000 + seed)
    fingerprint = {"teacher": sha256_of(source_files(t.path)), "recipe": recipe,
                   "options": json.loads(json.dumps(r.options())),
                   "data": sha256_of([Path(data)]) if data is not None else None,
                   "steps": steps, "seed": seed}
    ckpt = resume_folder(out)
    if resume:
        say(f"[distill] resuming from {ckpt}")
    run = train(student, lambda model, step: r.loss(model, step, gen), r.trainable(student),
                lr=rec_cls.lr, budget=Budget(steps, seconds), dist=dist, data_gen=gen,
                ckpt=ckpt, fingerprint=fingerprint, resume=resume, progress=bar,
                save_every=save_every, stop_after=stop_after)
    if dist.main:
        metrics = r.evaluate(student)
        with atomic_folder(out, overwrite=overwrite) as tmp:
            r.save(student, tmp)
            _copy_side_files(t, tmp)
            write_json(tmp / REPORT_FILE, {
                "recipe": recipe, "teacher": str(teacher), "teacher_sha256": fingerprint["teacher"],
                "family": t.family.name, "options": fingerprint["options"],
                "data": str(data) if data is not None else None, "seed": seed,
                "steps": run.steps, "stopped_by": run.stopped_by, "processes": dist.world,
                "resumed_from": run.resumed_from, "train_s": round(run.elapsed_s, 2),
                "wall_s": round(time.perf_counter() - t0, 2), "losses": run.losses,
                "metrics": metrics})
        shutil.rmtree(ckpt, ignore_errors=True)
        say(f"[distill] wrote {out}: {run.steps} steps in {run.elapsed_s:.0f} s, final loss "
            f"{run.losses[-1]:.4f}" + "".join(f", {k} {v:.3f}" for k, v in metrics.items()))
    dist.barrier()
    return out


def _copy_side_files(t: Teacher, dest: Path) -> None:
    """The teacher's tokenizer and generation settings, as the checkpoint holds them: the
    student reads and writes the same tokens."""
    from edgeseq.tokenize import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (t.folder / name).is_file() and not (dest / name).exists():
            shutil.copy2(t.folder / name, dest / name)
    # the teacher's generation settings win over the defaults the student's save wrote:
    # a draft must start, stop and pad as its target does
    for name in SIDE_FILES:
        if (t.folder / name).is_file():
            shutil.copy2(t.folder / name, dest / name)
