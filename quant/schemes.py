"""What every backend's quantization shares: the families' sensitive weights.

Which ``--quant`` schemes a format offers is its backend's (``Backend.quant_schemes``); how the
weights are rewritten is the backend's ``quantize.py``.
"""
from __future__ import annotations

#: weights kept above the scheme by default, per family, and the lowest precision measured safe
#: for them. Mamba's x_proj/dt_proj produce the step size dt that scales the whole state update
#: (exp(dt A)); errors there compound along the stream: float under int8, int8 under int4 (the
#: gate agreement of the zoo Mamba did not drop against float). LMUFormer's Legendre matrices A
#: and B define the memory itself: a 4-bit A is no longer a delay line (digits agreement 0.35),
#: and even int8 A/B under int4 flipped 2 of 32 gate sequences: float always.
SENSITIVE = {"mamba": (["*x_proj*", "*dt_proj*"], "int8"),
             "lmuformer": (["memory_At*", "memory_Bt*"], "float")}


def sensitive_patterns(family: str) -> list[str]:
    """Glob patterns of the family's weights kept above the scheme by default."""
    return list(SENSITIVE.get(family, ([], "float"))[0])


def sensitive_floor(family: str) -> str:
    """``int8`` or ``float``: the lowest precision the family's sensitive layers may take."""
    return SENSITIVE.get(family, ([], "float"))[1]
