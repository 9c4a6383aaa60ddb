"""ExecuTorch's build side: all graphs as methods of one ``.pte`` program, delegated to XNNPACK.

One program with a method per graph lets ExecuTorch store weights that several methods read once
(its named data store deduplicates them). ExecuTorch plans memory ahead of time for the upper
bound of every dynamic dimension, so the batch is fixed to 1 (one stream per state; a loaded
program serves many streams; a batch such as beam search runs row by row) and the prefill chunk
is bounded by the graph's ``max_chunk``.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from edgeseq.bundle import StreamingGraph
from edgeseq.runtime.backends.executorch import ExecuTorchBackend

PTE_FILE = "model.pte"


def lower(graphs: dict[str, StreamingGraph], out: Path, dtype: str,
          quantized: bool = False) -> dict[str, str]:
    """``quantized``: the graphs hold torchao-quantized layers (``quantize.py``);
    their quantized embeddings are fused into ``quantized_decomposed`` kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from edgeseq.convert.export import export_graph, half_precision

    if dtype == "fp16":  # XNNPACK has fp16 kernels: weights and compute in fp16
        graphs = half_precision(graphs)
    elif dtype != "fp32":
        raise ValueError(f"unsupported dtype {dtype}")
    with _xnnpack_friendly_activations():
        programs = {name: export_graph(g, dynamic_batch=False, batch=1,
                                       chunk_max=g.max_chunk) for name, g in graphs.items()}
    et = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    config = ExecutorchBackendConfig(do_quant_fusion_and_const_prop=quantized)
    prog = et.to_executorch(config)
    (out / PTE_FILE).write_bytes(prog.buffer)
    # Planned activation memory per method (allocated when a method loads): the runtime's
    # pybindings do not expose it, and speculative decoding's memory plan needs it before
    # loading anything.
    planned = {plan.name: int(sum(plan.non_const_buffer_sizes))
               for plan in prog.executorch_program.execution_plan}
    (out / ExecuTorchBackend.side_files["planned_memory"]).write_text(json.dumps(planned, indent=1))
    return {name: PTE_FILE for name in graphs}


@contextmanager
def _xnnpack_friendly_activations() -> Iterator[None]:
    """Export transformers' tanh GELU (``gelu_new``: T5 v1.1, ByT5, the zoo typo fixer) with
    x * x * x for its x ** 3. XNNPACK has no cube: ``pow`` stays an ExecuTorch portable kernel,
    which calls std::pow per element and splits the delegated graph around it (the zoo typo
    fixer's encoder: 0.37 ms of its 1.5 ms call). The same function; ONNX export is left as it
    is (ONNX Runtime fuses the Pow form)."""
    import math

    import torch
    from transformers.activations import NewGELUActivation

    orig = NewGELUActivation.forward
    c = math.sqrt(2.0 / math.pi)

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * (x * x * x))))

    NewGELUActivation.forward = forward
    try:
        yield
    finally:
        NewGELUActivation.forward = orig
