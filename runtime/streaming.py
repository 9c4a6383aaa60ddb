"""Timed streaming: what ``edgeseq run`` reports (first-token latency, tokens/s)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np


@dataclass
class StreamResult:
    tokens: list[int] = field(default_factory=list)
    first_token_ms: float = 0.0
    total_ms: float = 0.0
    prompt_tokens: int = 0
    #: time between consecutive tokens (ms), one entry per token after the first
    steps_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token (prefill excluded, as is usual)."""
        n = len(self.tokens) - 1
        dt = (self.total_ms - self.first_token_ms) / 1e3
        return n / dt if n > 0 and dt > 0 else 0.0

    @property
    def step_ms_p50(self) -> float | None:
        """Median time per token after the first. On a shared host a preempted process loses
        whole scheduler slices (milliseconds) to a few steps, which moves the mean but hardly
        the median: the rate a quiet host would see."""
        return float(np.median(self.steps_ms)) if self.steps_ms else None


def timed_stream(session: Any, prompt: Sequence[int], max_new_tokens: int,
                 on_token: Callable[[int], None] | None = None, **sampling: Any) -> StreamResult:
    res = StreamResult(prompt_tokens=len(prompt))
    t0 = last = time.perf_counter()
    for tok in session.stream(np.asarray(prompt, dtype=np.int64), max_new_tokens, **sampling):
        now = time.perf_counter()
        if not res.tokens:
            res.first_token_ms = (now - t0) * 1e3
        else:
            res.steps_ms.append((now - last) * 1e3)
        last = now
        res.tokens.append(int(tok[0]))
        if on_token:
            on_token(int(tok[0]))
    res.total_ms = (time.perf_counter() - t0) * 1e3
    return res
