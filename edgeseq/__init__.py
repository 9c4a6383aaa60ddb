"""edgeseq: trained sequence models as stateful streaming graphs for edge devices.

``edgeseq.load(bundle, backend="ort"|"executorch"|"torch")`` opens a bundle written by
``edgeseq convert``; ``edgeseq.convert.convert`` writes one.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: Any, backend: str = "ort", threads: int | None = None) -> Any:
    """Open a bundle; see :func:`edgeseq.runtime.session.load`."""
    from edgeseq.runtime.session import load as _load

    return _load(path, backend=backend, threads=threads)
