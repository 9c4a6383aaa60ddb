"""edgeseq: trained sequence models as stateful streaming graphs for edge devices.

``edgeseq.load(bundle, backend="ort"|"executorch"|"torch")`` opens a bundle written by
``edgeseq convert``; ``edgeseq.convert.convert`` writes one.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: Any, backend: str = "ort", threads: int | None = None,
         graphs: set[str] | None = None) -> Any:
    """Open a bundle; see :func:`edgeseq.runtime.session.load` (``graphs``: which graphs to
    load, e.g. ``{"prefill"}`` for one session that also serves a Mamba bundle's steps)."""
    from edgeseq.runtime.session import load as _load

    return _load(path, backend=backend, threads=threads, graphs=graphs)
