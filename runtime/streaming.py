"""Streaming as ``edgeseq run`` does it: timed token streams (first-token latency, tokens/s)
and their text, a piece per token."""
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
    # an array goes as it is (a compact prompt stays compact); a list becomes one stream's ids
    ids = prompt if isinstance(prompt, np.ndarray) else np.asarray(prompt, dtype=np.int64)
    for tok in session.stream(ids, max_new_tokens, **sampling):
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


class TextStream:
    """The text of a growing token stream, a piece per token, with constant work per token.

    Re-decoding every token so far on each new one (as ``edgeseq run`` did) slowed a long stream
    from 945 to 138 tokens/s within 30 s. Here ``decode`` sees only a window of recent tokens,
    and the pieces joined are exactly ``decode(all tokens)``, for any tokenizer whose text
    depends on nearby tokens only (byte tokenizers, byte-level BPE, SentencePiece with their
    clean-up rules), as HF's ``TextStreamer`` and ``tokenizers``' ``DecodeStream`` do:

    - text is held back while it may still change: a trailing U+FFFD (a UTF-8 character split
      across tokens) and a short tail from a space (clean-up rules such as `` .`` -> ``.``
      join a space to what follows it);
    - the window only moves to a token where decoding restarts cleanly: the window decoded
      alone must give the same tail of the text as before, at least ``TAIL`` characters long
      (so a character split across the cut has been completed, and no clean-up rule spans it)
      and not starting inside a character (U+FFFD), and the cut must lie in text already
      printed. Text only grows at the end, so a window that agrees now agrees from then on.
    """

    WINDOW = 8          # tokens kept behind the newest, at least, when the window moves
    REACH = 32          # how far back a restart point is looked for (TAIL 4-byte characters)
    TAIL = 4            # characters behind a space held back: the longest clean-up rule
    MAX_WINDOW = 1024   # a stream that never restarts cleanly (bytes that are not UTF-8)

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.toks: list[int] = []
        self.text = ""      # decode(self.toks)
        self.shown = ""     # the part of self.text already printed (a prefix of it)

    def push(self, tok: int) -> str:
        """The new piece of text that ``tok`` settles (often empty)."""
        self.toks.append(int(tok))
        self.text = self.decode(self.toks)
        out = ""
        if self.text.startswith(self.shown):
            stable = self._stable(self.text)
            if len(stable) > len(self.shown):
                out = stable[len(self.shown):]
                self.shown = stable
        if len(self.toks) >= 2 * self.WINDOW and len(self.toks) % (self.WINDOW // 2) == 0:
            # every few tokens: the window stays short (the decode of it is the per-token cost)
            self._move()
        if len(self.toks) > self.MAX_WINDOW:
            # no clean restart in a thousand tokens: print what there is and start afresh
            # (the only place the pieces may differ from decoding everything at once)
            out += self.finish()
            self.toks, self.text, self.shown = [], "", ""
        return out

    def finish(self) -> str:
        """The text held back at the end of the stream."""
        if not self.text.startswith(self.shown):
            return ""
        out = self.text[len(self.shown):]
        self.shown = self.text
        return out

    def _stable(self, text: str) -> str:
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        tail = text[max(0, end - self.TAIL):end]
        cut = next((i for i, c in enumerate(tail) if c.isspace()), None)
        return text[:end - len(tail) + cut] if cut is not None else text[:end]

    def _move(self) -> None:
        """Drop the window's oldest tokens, keeping at least ``WINDOW`` of them, if a clean
        restart point is there."""
        n = len(self.toks)
        for s in range(n - self.WINDOW, max(0, n - self.REACH), -1):
            rest = self.decode(self.toks[s:])
            at = len(self.text) - len(rest)
            if len(rest) < self.TAIL or rest[0] == "\ufffd" or at > len(self.shown) \
                    or not self.text.endswith(rest):
                continue
            self.toks = self.toks[s:]
            self.shown = rest[:len(self.shown) - at]
            self.text = rest
            return
