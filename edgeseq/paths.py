"""Where edgeseq keeps what it derives on this machine (derived zoo models, the record of
verified bundles, the host's calibration): one root for all of them."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EDGESEQ_CACHE``, else ``$XDG_CACHE_HOME/edgeseq``, else ``~/.cache/edgeseq``."""
    if os.environ.get("EDGESEQ_CACHE"):
        return Path(os.environ["EDGESEQ_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeseq"
