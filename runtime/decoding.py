"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The settings default to a checkpoint's generation config (``SamplingConfig.from_generation``);
the filters are transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
``TopPLogitsWarper``, in that order. Sampling draws from a seeded ``numpy.random.Generator``
whose state is part of a session's ``state_dict``, so a paused and resumed stream samples the
same tokens as an unbroken one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeseq import generation
from edgeseq.limits import check_finite


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0          # 0: no top-k filter
    top_p: float = 1.0      # 1.0: no nucleus filter

    def __post_init__(self) -> None:
        # NaN passes every comparison below and would make every probability NaN (token 0)
        check_finite("temperature", self.temperature)
        check_finite("top_p", self.top_p)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_generation(cls, gen: dict[str, Any], do_sample: bool | None = None,
                        temperature: float | None = None, top_k: int | None = None,
                        top_p: float | None = None) -> "SamplingConfig":
        """The arguments given, else a generation config's (``gen``: a manifest's
        ``config["generation"]``), else transformers' defaults (top-k 50): a checkpoint that
        sets ``do_sample`` samples by default, as transformers' ``generate`` does."""
        def pick(value: Any, name: str) -> Any:
            return generation.field(gen, name) if value is None else value

        if not pick(do_sample, "do_sample"):
            return cls()  # greedy: transformers applies no warper either
        return cls(True, float(pick(temperature, "temperature")), int(pick(top_k, "top_k") or 0),
                   float(pick(top_p, "top_p")))


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution sampling draws from, after temperature, top-k and top-p. (b, v)"""
    x = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= cfg.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(-1, keepdims=True)
    return p


def next_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """(b, v) logits -> (b,) int64 token ids."""
    if not cfg.do_sample:
        return logits.argmax(-1).astype(np.int64)
    p = probabilities(logits, cfg)
    u = rng.random(p.shape[0])[:, None]
    idx = (np.cumsum(p, -1) < u).sum(-1)
    return np.minimum(idx, p.shape[-1] - 1).astype(np.int64)
