"""The reference backend's build side: each graph a ``torch.export`` program (``<graph>.pt2``)."""
from __future__ import annotations

from pathlib import Path

from edgeseq.bundle import StreamingGraph


def lower(graphs: dict[str, StreamingGraph], out: Path, dtype: str) -> dict[str, str]:
    import torch

    from edgeseq.convert.export import export_graph, half_precision

    if dtype == "fp16":
        graphs = half_precision(graphs)
    files = {}
    for name, g in graphs.items():
        ep = export_graph(g, dynamic_batch=True)
        fname = f"{name}.pt2"
        torch.export.save(ep, str(out / fname))
        files[name] = fname
    return files
