"""Streaming sequence classification (LMUFormer bundles): constant work and memory per frame.

A bundle has two graphs with the same state: ``step`` (one frame) and ``chunk`` (k frames). The
session feeds whole chunks through ``chunk`` and the rest frame by frame, and keeps the state, so
a sequence can arrive in pieces of any size. Outputs lag the input by the manifest's
``lookahead`` frames (the centred convolutions of the patch embedding look that far ahead);
``finish`` feeds that many flush frames so the last frames get their predictions, exactly as the
parallel model pads the sequence's end.

Early exit (LMUFormer's "decide before the sequence ends"): after each frame the running
prediction is known. ``exit_frame`` is the first frame from which the prediction passes a
confidence and never changes again; ``decided_frame`` is the online rule a device can apply (the
first frame that passes the confidence).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseq.bundle import Manifest
from edgeseq.limits import check_finite_array
from edgeseq.runtime.backends.base import LoadedModel
from edgeseq.runtime.base_session import BaseSession, StateError, read_float, read_int


@dataclass
class Classification:
    label: int
    probs: list[float]
    frames: int
    running: np.ndarray = field(repr=False)  # (frames, classes) logits after each frame

    def running_probs(self) -> np.ndarray:
        z = self.running - self.running.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    def exit_frame(self, confidence: float) -> int | None:
        """First frame (0-based) whose prediction has probability >= ``confidence`` and equals
        every later frame's prediction (the final class); None if there is none."""
        p = self.running_probs()
        pred = p.argmax(-1)
        stays = np.flip(np.cumprod(np.flip(pred == pred[-1]))).astype(bool)
        ok = np.flatnonzero(stays & (p.max(-1) >= confidence))
        return int(ok[0]) if ok.size else None

    def decided_frame(self, confidence: float) -> int | None:
        """First frame whose running prediction reaches ``confidence`` (an online exit rule)."""
        ok = np.flatnonzero(self.running_probs().max(-1) >= confidence)
        return int(ok[0]) if ok.size else None


class ClassifierSession(BaseSession):
    """One stream (batch of rows) through a classification bundle.

    The stream is the graphs' state, the running logits of the frames ready so far (``running``
    returns all of them) and the count of frames fed: ``state_dict`` saves all three."""

    def __init__(self, root: Path, manifest: Manifest, backend: str, model: LoadedModel):
        super().__init__(root, manifest, backend, model)
        self.features = int(self.config["input"]["features"])
        self.lookahead = int(self.config["lookahead"])
        self.chunk = int(self.config.get("chunk") or 1)
        self.labels = list(self.config.get("labels") or [])
        self.reset()

    def reset(self, rows: int = 1) -> None:
        self.rows = rows
        self._state = self.model.init_state(rows)
        self._out: list[np.ndarray] = []  # logits of frames whose prediction is ready
        self.frames_in = 0
        self.finished = False

    def _stream_state(self) -> dict[str, np.ndarray]:
        return {"running": self.running(),
                "frames_in": np.array([self.frames_in], dtype=np.int64),
                "finished": np.array([int(self.finished)], dtype=np.int64)}

    def _read_stream_state(self, sd: dict[str, np.ndarray], batch: int) -> dict[str, Any]:
        frames_in = read_int(sd, "frames_in", 0)
        running = (read_float(sd, "running", (batch, None, int(self.config["num_classes"])))
                   if "running" in sd else np.zeros((batch, 0, int(self.config["num_classes"])),
                                                    np.float32))
        if running.shape[1] > frames_in + self.lookahead:
            raise StateError(f"state_dict running: {running.shape[1]} ready frames, more than "
                             f"the {frames_in} fed and {self.lookahead} flushed")
        return {"running": running.astype(np.float32), "frames_in": frames_in,
                "finished": bool(read_int(sd, "finished", 0, 1))}

    def _resume(self, batch: int, extra: dict[str, Any]) -> None:
        self.rows = batch
        self._out = [extra["running"]] if extra["running"].shape[1] else []
        self.frames_in, self.finished = extra["frames_in"], extra["finished"]

    def _run(self, frames: np.ndarray, valid: np.ndarray) -> None:
        graph = "step" if frames.shape[1] == 1 else "chunk"
        out, self._state = self.model.run(graph, {"frames": frames, "valid": valid}, self._state)
        # finite inputs can still overflow inside the graph (frames of 1e38): stop rather than
        # report NaN probabilities
        check_finite_array(out["logits"], f"graph {graph}")
        ready = out["ready"][0] > 0.5  # the same for every row
        if ready.any():
            self._out.append(out["logits"][:, ready])

    def _feed(self, frames: np.ndarray, valid: float) -> None:
        n = frames.shape[1]
        k = self.chunk
        i = 0
        while n - i >= k and k > 1:
            self._run(frames[:, i:i + k], np.full((self.rows, k), valid, np.float32))
            i += k
        for j in range(i, n):
            self._run(frames[:, j:j + 1], np.full((self.rows, 1), valid, np.float32))

    def push(self, frames: np.ndarray) -> np.ndarray:
        """Feed frames (n, features) or (rows, n, features); returns the running logits of the
        frames that became ready, (rows, m, classes) (m lags n by the lookahead)."""
        if self.finished:
            raise ValueError("this stream is finished; call reset() to start another")
        x = self._check(frames)
        before = len(self._out)
        self._feed(x, 1.0)
        self.frames_in += x.shape[1]
        return self._ready_since(before)

    def finish(self) -> np.ndarray:
        """Flush the lookahead: the last frames' running logits, (rows, lookahead, classes)."""
        before = len(self._out)
        if self.frames_in:
            self._feed(np.zeros((self.rows, self.lookahead, self.features), np.float32), 0.0)
        self.finished = True
        return self._ready_since(before)

    def running(self) -> np.ndarray:
        """All ready running logits so far, (rows, frames, classes)."""
        return self._ready_since(0)

    def _ready_since(self, before: int) -> np.ndarray:
        """Running logits of the calls from ``before`` on (not the whole history: a stream fed
        frame by frame would otherwise copy everything on every push)."""
        new = self._out[before:]
        if not new:
            return np.zeros((self.rows, 0, int(self.config["num_classes"])), np.float32)
        return np.concatenate(new, axis=1)

    def classify(self, frames: np.ndarray) -> Classification:
        """A whole sequence (n, features): feed it, flush, and return the final prediction."""
        x = self._check(frames)
        if x.shape[0] != 1:
            raise ValueError("classify takes one sequence (frames, features)")
        self.reset(1)
        self.push(x)
        self.finish()
        run = self.running()[0]
        p = np.exp(run[-1] - run[-1].max())
        p /= p.sum()
        return Classification(int(p.argmax()), [float(v) for v in p], run.shape[0], run)

    def _check(self, frames: np.ndarray) -> np.ndarray:
        x = np.asarray(frames)
        if x.dtype.kind not in "fiub":
            raise ValueError(f"frames must be numbers, got dtype {x.dtype}")
        # before the cast: float64 past float32's range would turn into inf below
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError("frames contain NaN or infinity")
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
        if x.ndim == 1 and self.features == 1:
            x = x[:, None]
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[2] != self.features:
            raise ValueError(f"frames must be (frames, {self.features}) (time x features); "
                             f"got shape {tuple(np.shape(frames))}")
        if x.shape[0] != self.rows:
            if self.frames_in:
                raise ValueError(f"this stream has {self.rows} rows, got {x.shape[0]}")
            self.reset(x.shape[0])
        if x.shape[1] == 0:
            raise ValueError("no frames given")
        if not np.isfinite(x).all():
            raise ValueError("frames exceed float32's range (about 3.4e38)")
        return x

    def label_name(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)
