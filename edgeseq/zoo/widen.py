"""Exact widening of a Mamba checkpoint: the same function, ``factor`` times the width.

Why: the zoo's ``mamba-bytes`` (4.2 MB of weights) fits in a CPU's caches, so a decoding step
there costs operator dispatch, not weight traffic, and a 16-token ``verify`` call costs about as
much as 8 steps: no draft can win on it (docs/benchmarks.md, "speculative decoding"). The
models speculative decoding is for are bound by memory bandwidth: each step reads every weight.
A model of that kind cannot be trained within the zoo's limits (a few MB, 15 minutes on two
cores), so ``mamba-bytes-x4`` is built from ``mamba-bytes`` by widening it exactly: the width of
Mamba-130M (d_model 768, d_inner 1536; 4 layers, 60 MB float32), the same next-byte
predictions, hence the same acceptance for a drafter trained against the small one.

The construction is Net2Net's function-preserving widening (Chen, Goodfellow & Shlens, 2016:
Net2WiderNet), with every unit copied ``factor`` times:

- every vector along d_model or d_inner is tiled (embeddings' columns, norm weights, the conv,
  dt_proj, A_log, D): each copy of a channel computes the same values as the original;
- a matrix that reads a tiled vector has its input columns tiled and divided by ``factor`` (the
  copies' sum is the original product); one that writes one has its rows tiled;
- RMSNorm over the tiled hidden state sees the same mean of squares, hence the same scale;
- dt_rank and d_state (and so x_proj's outputs and the SSM's B, C) keep their size.

The head is untied (it reads the tiled state divided by ``factor``; the embedding does not).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from edgeseq.bundle import BundleError
from edgeseq.checkpoint import load_state_dict, read_config

_COPIED = ("edgeseq_tokenizer.json", "generation_config.json")


def widen_state_dict(sd: dict[str, torch.Tensor], config: dict, factor: int
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """A transformers ``MambaForCausalLM`` state dict and config, ``factor`` times as wide."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if config.get("model_type") != "mamba":
        raise BundleError(f"widening is written for Mamba checkpoints, not "
                          f"{config.get('model_type')!r}")
    m, e = factor, int(config["intermediate_size"])

    def rows(w: torch.Tensor) -> torch.Tensor:   # a tiled output
        return torch.cat([w] * m, 0)

    def cols(w: torch.Tensor) -> torch.Tensor:   # reads a tiled input
        return torch.cat([w] * m, 1) / m

    sd = dict(sd)
    if "lm_head.weight" not in sd:               # tied in the source: untied here
        sd["lm_head.weight"] = sd["backbone.embeddings.weight"]
    out: dict[str, torch.Tensor] = {}
    for k, w in sd.items():
        if k == "backbone.embeddings.weight":
            out[k] = torch.cat([w] * m, 1)
        elif k == "lm_head.weight":
            out[k] = cols(w)
        elif k.endswith("in_proj.weight"):       # [x; z] each tiled
            out[k] = torch.cat([cols(rows(w[:e])), cols(rows(w[e:]))], 0)
        elif k.endswith("in_proj.bias"):
            out[k] = torch.cat([rows(w[:e]), rows(w[e:])], 0)
        elif k.endswith("x_proj.weight"):        # reads x; writes dt_rank + 2 d_state
            out[k] = cols(w)
        elif k.endswith("out_proj.weight"):
            out[k] = cols(rows(w))
        elif k.endswith(("norm.weight", "norm_f.weight", "conv1d.weight", "conv1d.bias",
                         "dt_proj.weight", "dt_proj.bias", "A_log", ".D", "out_proj.bias")):
            out[k] = rows(w)
        else:
            raise BundleError(f"widening: no rule for the weight {k!r} {tuple(w.shape)}")
    cfg = {**config, "hidden_size": int(config["hidden_size"]) * m, "intermediate_size": e * m,
           "tie_word_embeddings": False}
    return {k: v.contiguous() for k, v in out.items()}, cfg


def widen_checkpoint(src: Path, dst: Path, factor: int, stamp: dict | None = None) -> Path:
    """Write the widened checkpoint folder ``dst`` (via a temporary folder, then a rename);
    ``stamp`` goes into its ``derived_from.json``."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    sd, cfg = widen_state_dict(load_state_dict(src), read_config(src), factor)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in _COPIED:
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    if stamp is not None:
        (tmp / "derived_from.json").write_text(json.dumps(stamp))
    shutil.rmtree(dst, ignore_errors=True)
    try:
        tmp.rename(dst)
    except OSError:             # another process built it meanwhile: the same bytes
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
