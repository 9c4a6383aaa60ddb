"""What every task's session shares: one stream over a loaded bundle.

Weights are shared, state is per stream (whisper.cpp splits context and state the same way): a
session is one stream over a ``LoadedModel``; ``fork()`` opens another, fresh stream on the same
weights. ``state_dict()`` is everything needed to resume the stream, as named numpy arrays
(safetensors-ready): the graphs' state under ``state.<name>`` plus what the task's session keeps
besides (``_stream_state``); ``load_state`` checks all of it before replacing anything, because a
resume file is untrusted input. ``reset`` starts a fresh stream.

A task's session subclasses :class:`BaseSession` and supplies ``reset``, ``_stream_state``,
``_read_stream_state`` and ``_resume``; ``edgeseq/tasks/<task>.py`` names the subclass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeseq import tokenize
from edgeseq.bundle import BundleError, Manifest
from edgeseq.registry import get_task
from edgeseq.runtime.backends.base import LoadedModel

STATE_PREFIX = "state."


class StateError(BundleError, ValueError):
    """A saved stream (``load_state``) that this bundle cannot resume; names the key."""


class BaseSession:
    """One stream of a bundle on one backend (subclassed per task)."""

    _state: Any

    def __init__(self, root: Path, manifest: Manifest, backend: str, model: LoadedModel):
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.model = model
        self.task = get_task(manifest.task)
        self.config = manifest.config
        self.tokenizer = tokenize.load(root, manifest.tokenizer)

    # -- the stream's lifetime ------------------------------------------------------------------
    def reset(self, batch: int = 1) -> None:
        """Start a fresh stream of ``batch`` rows."""
        raise NotImplementedError

    def fork(self) -> "BaseSession":
        """A new, fresh stream sharing this session's loaded weights."""
        return type(self)(self.root, self.manifest, self.backend, self.model)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume this stream, as named numpy arrays (safetensors-ready)."""
        out = {f"{STATE_PREFIX}{s.name}": a
               for s, a in zip(self.model.specs, self.model.to_numpy(self._state))}
        out.update(self._stream_state())
        return out

    def load_state(self, sd: dict[str, np.ndarray]) -> None:
        """Resume a stream saved by ``state_dict`` (possibly in another process).

        A resume file is untrusted input: every entry is checked (shape, dtype, finite values,
        token ids inside the vocabulary, ...) before anything is replaced, so a refused file
        leaves this stream as it was. Raises :class:`StateError` naming the key."""
        arrays, batch = self._read_model_state(sd)
        extra = self._read_stream_state(sd, batch)
        self._state = self.model.from_numpy(arrays)
        self._resume(batch, extra)

    # -- per task -------------------------------------------------------------------------------
    def _stream_state(self) -> dict[str, np.ndarray]:
        """What the session keeps besides the graphs' state (copies)."""
        raise NotImplementedError

    def _read_stream_state(self, sd: dict[str, np.ndarray], batch: int) -> dict[str, Any]:
        """``_stream_state``'s entries of ``sd``, checked; raises :class:`StateError`."""
        raise NotImplementedError

    def _resume(self, batch: int, extra: dict[str, Any]) -> None:
        """Take the checked entries (the graphs' state is in place already)."""
        raise NotImplementedError

    # -- shared checks --------------------------------------------------------------------------
    def _read_model_state(self, sd: dict[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
        """The graphs' state entries, checked against the bundle's specs: a named dimension
        (``batch``, a growing cache's ``past``) may have any size, the same in every entry."""
        arrays = []
        batch: int | None = None
        sizes: dict[str, int] = {}
        for s in self.model.specs:
            key = f"{STATE_PREFIX}{s.name}"
            if key not in sd:
                raise StateError(f"state_dict lacks {key}")
            a = np.asarray(sd[key])
            if a.ndim != len(s.shape) or a.dtype != np.dtype(s.dtype) \
                    or not _dims_match(a.shape[1:], s.shape[1:], sizes):
                raise StateError(f"state_dict {key}: shape {a.shape} dtype {a.dtype} does not "
                                 f"match the bundle's {s.shape} {s.dtype}")
            batch = a.shape[0] if batch is None else batch
            if a.shape[0] != batch or batch < 1:
                raise StateError(f"state_dict {key}: batch {a.shape[0]}, the other state "
                                 f"entries have {batch}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise StateError(f"state_dict {key}: holds NaN or inf")
            arrays.append(a)
        return arrays, batch or 1

    def _vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        return int(v) if isinstance(v, int) and v > 0 else None


def _dims_match(got: tuple[int, ...], want: tuple[Any, ...], sizes: dict[str, int]) -> bool:
    for n, w in zip(got, want):
        if isinstance(w, str):
            if sizes.setdefault(w, n) != n:
                return False
        elif n != w:
            return False
    return True


def read_int(sd: dict[str, np.ndarray], key: str, default: int, high: int | None = None) -> int:
    """A saved count (one integer >= 0, at most ``high``), or ``default`` when absent."""
    if key not in sd:
        return default
    v = np.asarray(sd[key])
    if v.dtype.kind not in "iu" or v.shape != (1,) or int(v[0]) < 0 \
            or (high is not None and int(v[0]) > high):
        bound = "" if high is None else f" and <= {high}"
        raise StateError(f"state_dict {key}: expected one integer >= 0{bound}, got shape "
                         f"{v.shape} dtype {v.dtype}")
    return int(v[0])


def read_float(sd: dict[str, np.ndarray], key: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """A saved float array of ``shape`` (None: any size), finite; a copy."""
    a = np.asarray(sd[key])
    if a.dtype.kind != "f" or a.ndim != len(shape) \
            or any(w is not None and n != w for n, w in zip(a.shape, shape)):
        want = ", ".join("n" if w is None else str(w) for w in shape)
        raise StateError(f"state_dict {key}: shape {a.shape} dtype {a.dtype}; expected float "
                         f"({want})")
    if not np.isfinite(a).all():
        raise StateError(f"state_dict {key}: holds NaN or inf")
    return a.copy()
