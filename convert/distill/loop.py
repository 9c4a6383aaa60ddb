"""The training loop every distillation recipe shares: seeded, resumable, one or many processes.

- **Reproducible**: the student's initial weights, the data order and every sample come from
  generators seeded by ``--seed``; the same seed gives the same loss curve.
- **Resumable**: every ``save_every`` seconds (and when interrupted by SIGINT/SIGTERM) the
  student's weights, the optimizer's moments and the generators' states are written as
  safetensors (``step-NNNNNN.safetensors``) beside a JSON record (``state.json``: the step, the
  loss curve, the run's fingerprint and the name of the tensors file). ``state.json`` is
  replaced last and atomically, so a kill at any moment leaves the previous complete checkpoint.
  Nothing is pickled. ``--resume`` refuses a checkpoint whose fingerprint (teacher files,
  recipe, its options, data, step budget, seed) differs from this run's.
- **Distributed**: under ``torchrun`` (``WORLD_SIZE`` > 1) the student is wrapped in
  ``DistributedDataParallel`` over the ``gloo`` backend (CPU). Every rank draws the same global
  batch from the same generator and trains on its contiguous share of rows; DDP averages the
  gradients, so the update is the single-process one for that global batch. Rank 0 alone
  writes checkpoints and the student and shows progress.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edgeseq.errors import BundleError

STATE_FILE = "state.json"
#: what a checkpoint's record holds, checked on ``--resume`` before any tensor is read
_STATE_KEYS = ("fingerprint", "step", "losses", "tensors", "elapsed_s")


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` rows."""
        share = n // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def mean(self, value: float) -> float:
        """The mean over ranks of a per-rank value (every rank gets it)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank's flag is (a stop must be taken together)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        torch.distributed.all_reduce(t)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """The process group ``torchrun`` describes in the environment (gloo: CPU), or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("gloo")
    return Dist(td.get_rank(), td.get_world_size())


def close_distributed() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


@dataclass
class Budget:
    steps: int
    seconds: float | None = None


@dataclass
class Run:
    """What the loop hands back: the loss per step (the mean over ranks) and how it ended."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = "steps"        # steps | time
    resumed_from: int | None = None


class Interrupted(Exception):
    """The run stopped early (SIGINT/SIGTERM, or a test's ``stop_after``) with its checkpoint
    written: ``--resume`` continues it."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"{checkpoint}: interrupted at step {step}; the checkpoint is saved, "
                         f"run again with --resume to continue")
        self.step = step
        self.checkpoint = checkpoint


def lr_factor(step: int, steps: int, warmup: int = 20) -> float:
    """Linear warm-up over ``warmup`` steps (fewer for a short run), then cosine to 10 %."""
    import math

    w = max(1, min(warmup, steps // 10))
    if step < w:
        return (step + 1) / w
    p = (step - w) / max(1, steps - w)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def train(student: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, int], torch.Tensor],
          params: list[torch.nn.Parameter], *, lr: float, budget: Budget, dist: Dist,
          data_gen: torch.Generator, ckpt: Path, fingerprint: dict[str, Any], resume: bool,
          progress: bool = True, save_every: float = 60.0, stop_after: int | None = None
          ) -> Run:
    """Train ``params`` of ``student`` for ``budget`` by AdamW on ``loss_fn(model, step)``.

    ``loss_fn`` draws the step's global batch from ``data_gen`` (every rank draws the same),
    keeps its share (``dist.rows``) and returns the mean loss over those rows; ``model`` is the
    DDP wrapper under torchrun. ``ckpt``: the checkpoint folder (``resume`` reads it; rank 0
    writes it). ``stop_after``: stop as if interrupted after that many steps (tests).
    """
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    run = Run()
    start = 0
    if resume:
        start, run.losses, run.elapsed_s = _load(ckpt, fingerprint, student, opt, data_gen)
        run.resumed_from = start
    model: torch.nn.Module = student
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, find_unused_parameters=False)
    stop = _StopFlag()
    t0 = time.perf_counter() - run.elapsed_s
    last_save = time.perf_counter()
    bar = _bar(budget.steps, start, dist.main and progress)
    step = start
    try:
        with stop.installed():
            while step < budget.steps:
                for g in opt.param_groups:
                    g["lr"] = lr * lr_factor(step, budget.steps)
                loss = loss_fn(model, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                run.losses.append(dist.mean(float(loss.detach())))
                run.elapsed_s = time.perf_counter() - t0
                if bar is not None:
                    bar.set_postfix_str(f"loss {run.losses[-1]:.4f}", refresh=False)
                    bar.update(1)
                out_of_time = budget.seconds is not None and run.elapsed_s >= budget.seconds
                if dist.any(out_of_time) and step < budget.steps:
                    run.stopped_by = "time"
                    break
                halt = dist.any(stop.requested or (stop_after is not None and step >= stop_after))
                due = time.perf_counter() - last_save >= save_every
                if halt or dist.any(due):
                    if dist.main:
                        _save(ckpt, fingerprint, step, run, student, opt, data_gen)
                    dist.barrier()
                    last_save = time.perf_counter()
                if halt and step < budget.steps:
                    raise Interrupted(step, ckpt)
    finally:
        if bar is not None:
            bar.close()
    run.steps = step
    return run


def _bar(total: int, start: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    # stderr: stdout stays for the command's result; the ETA is tqdm's (rate since start)
    return tqdm(total=total, initial=start, desc="distill", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


class _StopFlag:
    """SIGINT/SIGTERM request a stop at the end of the current step (a checkpoint is then
    written), instead of killing it halfway through an optimizer update."""

    def __init__(self) -> None:
        self.requested = False

    def installed(self) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def cm() -> Any:
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

            def handler(signum: int, frame: Any) -> None:
                if self.requested:    # a second ^C: stop at once
                    signal.signal(signum, old[signum])
                    raise KeyboardInterrupt
                self.requested = True

            for s in old:
                signal.signal(s, handler)
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        return cm()


# -- checkpoints ------------------------------------------------------------------------------


def _save(folder: Path, fingerprint: dict[str, Any], step: int, run: Run,
          student: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"student.{k}": v.detach().contiguous().clone()
               for k, v in student.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = gen.get_state()
    name = f"step-{step:06d}.safetensors"
    # tied weights share storage, which safetensors refuses: each is written as its own copy
    save_file(tensors, str(folder / name))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
              for g in sd["param_groups"]]
    record = {"fingerprint": fingerprint, "step": step, "losses": run.losses,
              "elapsed_s": run.elapsed_s, "tensors": name, "param_groups": groups}
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, folder / STATE_FILE)   # the new checkpoint exists from here on
    for old in folder.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, checked for the fields the loop reads (one-line errors)."""
    from edgeseq.checkpoint import read_json

    path = folder / STATE_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: no checkpoint to resume ({STATE_FILE} missing); run "
                          f"without --resume")
    rec = read_json(path)
    if not isinstance(rec, dict) or any(k not in rec for k in _STATE_KEYS) \
            or not isinstance(rec["step"], int) or not isinstance(rec["losses"], list) \
            or not isinstance(rec["tensors"], str) or "/" in rec["tensors"] \
            or not rec["tensors"].endswith(".safetensors"):
        raise BundleError(f"{path}: not a distillation checkpoint record")
    return rec


def _load(folder: Path, fingerprint: dict[str, Any], student: torch.nn.Module,
          opt: torch.optim.Optimizer, gen: torch.Generator) -> tuple[int, list[float], float]:
    from edgeseq.checkpoint import _read_safetensors

    rec = read_state(folder)
    theirs = rec["fingerprint"] if isinstance(rec["fingerprint"], dict) else {}
    differ = [k for k in sorted(set(fingerprint) | set(theirs)) if fingerprint.get(k) != theirs.get(k)]
    if differ:
        raise BundleError(f"{folder}: the checkpoint is from another run (its "
                          f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''}); "
                          f"remove it or run without --resume")
    path = folder / rec["tensors"]
    if not path.is_file():
        raise BundleError(f"{path}: missing (named by {folder / STATE_FILE})")
    tensors = _read_safetensors(path)
    prefix = "student."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    from edgeseq.checkpoint import load_into

    load_into(student, own, path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": rec["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        gen.set_state(tensors["rng.data"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise BundleError(f"{path}: optimizer or generator state does not fit this run "
                          f"({str(e).splitlines()[0][:160]})") from None
    return int(rec["step"]), [float(x) for x in rec["losses"]], float(rec["elapsed_s"])
