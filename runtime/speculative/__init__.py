"""Memory-aware speculative decoding (see ``docs/speculative.md``): ``load(bundle, speculate=...,
memory_budget=...)`` opens a generating bundle with a draft source, a verifier and a memory plan."""
from edgeseq.runtime.speculative.session import SpeculativeSession, load

__all__ = ["SpeculativeSession", "load"]
