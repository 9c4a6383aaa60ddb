"""Weight quantization of a bundle's graphs for ExecuTorch (XNNPACK), through torchao: the
build side, on the torch graphs before ``lower.py``.

Schemes (the same names as ONNX Runtime's, the same promise):

* ``int8``: linear layers ``8da8w``: per-channel symmetric int8 weights, int8 activations
  quantized dynamically per token; XNNPACK's QD8 x QC8W kernels. Embedding tables int8 per row
  (``quantized_decomposed::embedding_byte``).
* ``int4``: linear layers ``8da4w``: int4 weights with one scale per ``group_size`` input values
  and dynamic int8 activations; XNNPACK's QD8 x QB4W kernels, the scheme ExecuTorch's own LLM
  export uses on CPU. Embedding tables int4 per row group (``embedding_4bit``).

Scales are chosen by half-quadratic optimisation of the scales alone (``hqq_scale_only``, the
torchao algorithm ExecuTorch's LLM export defaults to): on the zoo Mamba it raised int4's
next-token agreement over the last quarter of the gate stream from 0.898 to 0.945 against plain
max-abs scales.

Modules are quantized in place on a deep copy of the graphs (the reference model stays fp32 for
the gate); a module that several graphs share (prefill and step read the same layers) is
quantized once and stays shared, so the program stores it once. State stays float32 at every
graph interface, and the layers matched by ``keep`` (module names, globbed) stay float.
Quantized embeddings run outside XNNPACK: the runtime needs ExecuTorch's quantized kernels
(``quantized_ops_lib``), which the edgeseq backend registers.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
from typing import Any

import torch
from torch import nn

from edgeseq.bundle import StreamingGraph
from edgeseq.runtime.backends.executorch import ExecuTorchBackend



def _configs(scheme: str, group_size: int) -> tuple[Any, Any, str]:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    bits = torch.int4 if scheme == "int4" else torch.int8
    gran = PerGroup(group_size) if scheme == "int4" else PerAxis(0)
    algo = "hqq_scale_only"
    linear = Int8DynamicActivationIntxWeightConfig(weight_dtype=bits, weight_granularity=gran,
                                                   intx_choose_qparams_algorithm=algo)
    table = IntxWeightOnlyConfig(weight_dtype=bits, granularity=gran,
                                 intx_choose_qparams_algorithm=algo)
    how = ("8da4w: int4 weights, symmetric, group " + str(group_size) if scheme == "int4"
           else "8da8w: int8 per-channel symmetric weights") + \
        ", dynamic int8 activations per token (XNNPACK); embedding tables " + \
        ("int4 per row group" if scheme == "int4" else "int8 per row") + \
        " (quantized_decomposed embedding kernels); scales by HQQ (scale only)"
    return linear, table, how


def quantize_graphs(graphs: dict[str, StreamingGraph], scheme: str, keep: list[str],
                    group_size: int = ExecuTorchBackend.int4_group,
                    sensitive: list[str] | None = None
                    ) -> tuple[dict[str, StreamingGraph], dict[str, Any]]:
    """Quantized deep copies of ``graphs``; returns them and a per-graph report.

    ``keep``: layers left in float; ``sensitive``: one step above the scheme (``8da8w`` under
    int4, float under int8), as the ONNX Runtime backend's ``quantize.py`` does."""
    from torchao.quantization import quantize_

    schemes = ExecuTorchBackend.quant_schemes
    if scheme not in schemes:
        raise ValueError(f"--quant {scheme} is not available on ExecuTorch (known: "
                         f"{', '.join(schemes)}); use --format onnx")
    sensitive = list(sensitive or [])
    if scheme != "int4":
        keep, sensitive = keep + sensitive, []
    linear_cfg, table_cfg, how = _configs(scheme, group_size)
    int8_linear = _configs("int8", group_size)[0]
    memo: dict[int, Any] = {}
    copies = {name: dataclasses.replace(g, module=copy.deepcopy(g.module, memo).eval())
              for name, g in graphs.items()}
    looked_up = _tables_looked_up(copies)
    done: dict[int, str] = {}  # id(module) -> what it became, for modules graphs share
    reports: dict[str, Any] = {}
    for name, g in copies.items():
        quantized, kept, promoted = [], [], []
        for fqn, m in list(g.module.named_modules()):
            if not isinstance(m, (nn.Linear, nn.Embedding)):
                continue
            pname = fqn + ".weight"
            if id(m) in done:
                {"float": kept, "int8": promoted}.get(done[id(m)], quantized).append(pname)
                continue
            k = m.weight.shape[-1]
            fits = scheme != "int4" or k % group_size == 0
            # a table whose weight is sliced or added directly (Whisper's positions), not looked
            # up, has no quantized kernel: it stays float
            fits = fits and (isinstance(m, nn.Linear) or id(m) in looked_up)
            if (_matches((pname, fqn), sensitive) and isinstance(m, nn.Linear)
                    and not _matches((pname, fqn), keep)):  # per channel: any K fits
                quantize_(m, int8_linear, filter_fn=lambda mod, _fqn, target=m: mod is target)
                done[id(m)] = "int8"
                promoted.append(pname)
                continue
            if _matches((pname, fqn), keep) or not fits:
                done[id(m)] = "float"
                kept.append(pname)
                continue
            if isinstance(m, nn.Embedding):
                # padding_idx only shapes gradients; in the traced lookup it would stop
                # ExecuTorch's fusion into its quantized embedding kernel
                m.padding_idx = None
            cfg = table_cfg if isinstance(m, nn.Embedding) else linear_cfg
            # quantize_ on the module itself: its filter sees the root with an empty name.
            quantize_(m, cfg, filter_fn=lambda mod, _fqn, target=m: mod is target)
            done[id(m)] = scheme
            quantized.append(pname)
        reports[name] = {"scheme": scheme, "how": how + ("; sensitive layers 8da8w (int8)"
                                                         if promoted else ""),
                         "quantized": sorted(quantized), "kept_float": sorted(kept)}
        if promoted:
            reports[name]["int8_sensitive"] = sorted(promoted)
    return copies, reports


def _matches(names: tuple[str, ...], patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(n, p) for n in names for p in patterns)


def _tables_looked_up(graphs: dict[str, StreamingGraph]) -> set[int]:
    """ids of the ``nn.Embedding`` modules whose forward (a row lookup) the graphs call."""
    from edgeseq.convert.export import example_args
    from edgeseq.convert.patch import flat_linear

    called: set[int] = set()
    hooks = []
    for g in graphs.values():
        for m in g.module.modules():
            if isinstance(m, nn.Embedding):
                hooks.append(m.register_forward_hook(
                    lambda mod, _i, _o: called.add(id(mod))))
    try:
        with torch.no_grad(), flat_linear():
            for g in graphs.values():
                _, args = example_args(g, dynamic_batch=False, batch=1, chunk_max=g.max_chunk)
                g.module(*args)
    finally:
        for h in hooks:
            h.remove()
    return called


def float_weight_bytes(graphs: dict[str, StreamingGraph]) -> int:
    """Bytes of the graphs' parameters and buffers in fp32, each shared tensor once."""
    seen: set[int] = set()
    total = 0
    for g in graphs.values():
        for t in [*g.module.parameters(), *g.module.buffers()]:
            if id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            total += t.numel() * 4
    return total
