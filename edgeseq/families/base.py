"""What every model family provides to the converter (one file per family registers one).

A family knows how to load a checkpoint folder into a *reference* PyTorch module (the model the
user trained, run exactly as its library runs it), and how to build *streaming graphs* from it:
pure modules whose recurrent or cached quantities are explicit inputs and outputs.

Causal-LM graph contract (state-space families):

- ``prefill``: ``input_ids`` (batch, chunk) int64 + ``state_in.*`` ->
  ``logits`` (batch, chunk, vocab) float32 + ``state_out.*``
- ``step``:    ``input_ids`` (batch,) int64 + ``state_in.*`` ->
  ``logits`` (batch, vocab) float32 + ``state_out.*``
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeseq.bundle import BundleError, StateSpec, StreamingGraph, TensorSpec


class Family:
    """Base class; subclasses register with ``@register_family("name")``."""

    name: str = "?"
    task: str = "causal_lm"
    #: ``model_type`` values of ``config.json`` that this family loads.
    model_types: tuple[str, ...] = ()

    def can_load(self, config: dict[str, Any]) -> bool:
        return config.get("model_type") in self.model_types

    def load(self, path: Path) -> Any:
        """Load the reference module (fp32, eval mode) from a checkpoint folder."""
        raise NotImplementedError

    def graphs(self, model: Any) -> dict[str, StreamingGraph]:
        """Build the streaming graphs (``prefill`` and ``step``) that share ``model``'s weights."""
        raise NotImplementedError

    def model_config(self, model: Any) -> dict[str, Any]:
        """What the runtime needs to know: ``vocab_size``, ``eos_token_id``, ``bos_token_id``."""
        raise NotImplementedError

    def reference_logits(self, model: Any, input_ids: Any) -> Any:
        """Full-sequence logits (batch, seq, vocab) of the reference in its parallel mode."""
        raise NotImplementedError

    def reference_greedy(self, model: Any, input_ids: Any, max_new_tokens: int) -> Any:
        """Greedy new tokens (batch, max_new_tokens) as the reference library generates them."""
        raise NotImplementedError

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        """Write a tiny random checkpoint whose outputs vary with its state (for tests)."""
        raise NotImplementedError


def lm_graph_specs(vocab_size: int, state: list[StateSpec]) -> tuple[
        list[TensorSpec], list[TensorSpec], list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of the causal-LM ``prefill`` and ``step`` graphs."""
    prefill_in = [TensorSpec("input_ids", ("batch", "chunk"), "int64")]
    prefill_out = [TensorSpec("logits", ("batch", "chunk", vocab_size), "float32")]
    step_in = [TensorSpec("input_ids", ("batch",), "int64")]
    step_out = [TensorSpec("logits", ("batch", vocab_size), "float32")]
    return prefill_in, prefill_out, step_in, step_out


def detect_family(config: dict[str, Any], path: Path) -> Any:
    """The registered family that loads this config, or a clear error listing what is supported."""
    from edgeseq.registry import families

    for cls in families().values():
        fam = cls()
        if fam.can_load(config):
            return fam
    supported = sorted({t for cls in families().values() for t in cls.model_types})
    arch = config.get("model_type") or config.get("architectures") or "none given"
    raise BundleError(f"{path}: unsupported architecture {arch!r} (model_type); "
                      f"supported: {', '.join(supported)}")
